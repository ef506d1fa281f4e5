"""Interpolation curves and barriers, activation matching, REPAIR and BatchNorm reset."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths
from mergejax.permute import _solvers as solvers_lib


# --------------------------------------------------------------------------- #
# Barrier.
# --------------------------------------------------------------------------- #
def lerp_params(a: Any, b: Any, lam: jax.Array) -> Any:
  """``(1 - lam) a + lam b`` leafwise (float32 arithmetic, a's dtypes)."""
  return jax.tree.map(lambda x, y: ((1 - lam) * x.astype(jnp.float32) + lam *
                                    y.astype(jnp.float32)).astype(x.dtype), a, b)


class Barrier(NamedTuple):
  """``barrier`` (per metric), the ``lambdas`` and the ``curve`` values."""
  barrier: Any
  lambdas: jax.Array
  curve: Any


def interpolation_barrier(metric_fn: Callable[[Any], Any], a: Any, b: Any, *,
                          num: int = 25, relative_to: str = 'endpoints'
                          ) -> Barrier:
  """Loss (or error) along ``(1 - lam) a + lam b`` and its barrier, vmapped over lam.

  ``relative_to='endpoints'`` (Git Re-Basin): ``max_lam L(lam) - (L(0) + L(1))/2``;
  ``'chord'``: ``max_lam [L(lam) - ((1 - lam) L(0) + lam L(1))]``. For accuracy
  pass the error ``1 - acc`` so that higher is worse.

  Args:
    metric_fn: ``params -> scalar`` or a pytree of scalars (e.g.
      ``{'loss': …, 'error': …}``); jax-traceable.
    a: endpoint at lam = 0.
    b: endpoint at lam = 1 (already aligned to ``a`` for a matched barrier).
    num: number of lambdas in ``linspace(0, 1, num)``.
    relative_to: ``'endpoints'`` or ``'chord'``.

  Returns:
    A `Barrier`; ``curve`` leaves have shape ``[num]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> r = permute.interpolation_barrier(lambda p: jnp.sum(p['w'] ** 2),
    ...                                   {'w': jnp.array([1.])}, {'w': jnp.array([-1.])},
    ...                                   num=3)
    >>> r.curve, r.barrier
    (Array([1., 0., 1.], dtype=float32), Array(0., dtype=float32))
  """
  if relative_to not in ('endpoints', 'chord'):
    raise ValueError(f"relative_to must be 'endpoints' or 'chord', got {relative_to!r}.")
  lams = jnp.linspace(0.0, 1.0, num)
  curve = jax.jit(jax.vmap(lambda l: metric_fn(lerp_params(a, b, l))))(lams)

  def barrier(c):
    if relative_to == 'endpoints':
      return jnp.max(c) - 0.5 * (c[0] + c[-1])
    return jnp.max(c - ((1 - lams) * c[0] + lams * c[-1]))

  return Barrier(jax.tree.map(barrier, curve), lams, curve)


# --------------------------------------------------------------------------- #
# Activation matching.
# --------------------------------------------------------------------------- #
class _Moments(NamedTuple):
  n: Any
  sa: Any
  sb: Any
  saa: Any
  sbb: Any
  sab: Any


def as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


def activation_statistics(features_fn, reference, other, batches: Iterable[Any]
                          ) -> dict[str, list[_Moments]]:
  """Streams first and second moments of paired features over ``batches``."""
  step = jax.jit(lambda x: (features_fn(reference, x), features_fn(other, x)))
  acc: dict[str, list] = {}
  for x in batches:
    fa, fb = step(x)
    for g in fa:
      for i, (a, b) in enumerate(zip(as_list(fa[g]), as_list(fb[g]))):
        a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
        b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
        m = _Moments(a.shape[0], a.sum(0), b.sum(0), (a * a).sum(0),
                     (b * b).sum(0), a.T @ b)
        lst = acc.setdefault(g, [])
        if i < len(lst):
          lst[i] = _Moments(*(u + v for u, v in zip(lst[i], m)))
        else:
          lst.append(m)
  return acc


def _similarity(m: _Moments, kind: str) -> np.ndarray:
  mu_a, mu_b = m.sa / m.n, m.sb / m.n
  if kind == 'cross_moment':  # E[a b^T], Git Re-Basin's MLP script
    return m.sab / m.n
  cov = m.sab / m.n - np.outer(mu_a, mu_b)
  if kind == 'covariance':
    return cov
  std_a = np.sqrt(np.maximum(m.saa / m.n - mu_a ** 2, 0)) + 1e-8
  std_b = np.sqrt(np.maximum(m.sbb / m.n - mu_b ** 2, 0)) + 1e-8
  return cov / np.outer(std_a, std_b)


def activation_matching(features_fn: Callable[[Any, Any], Mapping[str, Any]],
                        reference: Any, other: Any, batches: Iterable[Any], *,
                        similarity: str = 'correlation', solver: str = 'scipy',
                        return_costs: bool = False):
  """Matches hidden units by the similarity of their activations on data.

  Each group is matched once, independently (no coordinate descent), by one
  LAP on the summed similarity of all its feature sites.

  Args:
    features_fn: ``features_fn(params, x) -> {group: features}`` where
      ``features`` is ``[..., n]`` (the last axis is the group's units) or a
      list of such arrays (e.g. every residual add of a stream group), whose
      similarities are summed.
    reference: model A.
    other: model B (unaligned).
    batches: an iterable of inputs ``x``.
    similarity: ``'correlation'`` (Pearson, default), ``'covariance'`` or
      ``'cross_moment'`` (``E[a b^T]``).
    solver: LAP solver (`solve_assignment`).
    return_costs: also return ``{group: similarity matrix}``.

  Returns:
    ``{group: perm}`` (aligning ``other`` to ``reference`` with
    `apply_permutation`), and the costs if ``return_costs``.
  """
  stats = activation_statistics(features_fn, reference, other, batches)
  perms, costs = {}, {}
  for g, moments in stats.items():
    c = sum(_similarity(m, similarity) for m in moments)
    costs[g] = jnp.asarray(c, jnp.float32)
    perms[g] = solvers_lib.solve_assignment(c, solver)
  return (perms, costs) if return_costs else perms


# --------------------------------------------------------------------------- #
# REPAIR and BatchNorm reset.
# --------------------------------------------------------------------------- #
def _unit_stats(preact_fn, params, batches, layer):
  s = ss = 0.0
  n = 0
  fn = jax.jit(lambda p, x: preact_fn(p, x)[layer])
  for x in batches:
    z = np.asarray(fn(params, x), np.float64)
    z = z.reshape(-1, z.shape[-1])
    s, ss, n = s + z.sum(0), ss + (z * z).sum(0), n + z.shape[0]
  mu = s / n
  return mu, np.sqrt(np.maximum(ss / n - mu ** 2, 0.0))


def repair(preact_fn: Callable[[Any, Any], Mapping[str, Any]], merged: Any,
           endpoints: Sequence[Any], batches: Iterable[Any] | Callable[[], Iterable[Any]],
           *, layers: Sequence[str], weights: Sequence[float] | None = None,
           eps: float = 1e-6) -> Any:
  """REPAIR: restores per-unit pre-activation statistics of a merged network.

  Targets ``mu* = sum_i w_i mu_i``, ``sigma* = sum_i w_i sigma_i`` from the
  endpoints; for each layer in order (earlier corrections change later
  statistics) the merged layer's measured ``mu, sigma`` are mapped onto the
  targets by folding ``z -> (sigma*/sigma)(z - mu) + mu*`` into its kernel and
  bias (the exact variant, with a forward pass of the merged net per layer).

  Args:
    preact_fn: ``preact_fn(params, x) -> {layer: z}`` with the layer's
      pre-activations ``[..., n]``, e.g. the Dense outputs before the ReLU.
    merged: the merged params.
    endpoints: the aligned endpoint params.
    batches: inputs (a re-iterable, or a zero-argument function returning one).
    layers: module paths (e.g. ``['Dense_0', 'Dense_1']``) whose ``kernel``
      (last axis = units) and ``bias`` are rescaled, in forward order.
    weights: interpolation weights of the endpoints (default uniform).
    eps: floor on the measured std.

  Returns:
    The repaired params.
  """
  get = batches if callable(batches) else (lambda: batches)
  w = np.full(len(endpoints), 1 / len(endpoints)) if weights is None else np.asarray(weights)
  flat = dict(paths.flatten_to_dict(merged))
  for layer in layers:
    stats = [_unit_stats(preact_fn, e, get(), layer) for e in endpoints]
    mu_t = sum(wi * s[0] for wi, s in zip(w, stats))
    sd_t = sum(wi * s[1] for wi, s in zip(w, stats))
    cur = paths.unflatten_like(merged, flat)
    mu, sd = _unit_stats(preact_fn, cur, get(), layer)
    scale = sd_t / np.maximum(sd, eps)
    kpath, bpath = _find(flat, layer, 'kernel'), _find(flat, layer, 'bias')
    k = flat[kpath]
    flat[kpath] = (k * jnp.asarray(scale, k.dtype).reshape(
        (1,) * (k.ndim - 1) + (-1,))).astype(k.dtype)
    b = flat[bpath]
    flat[bpath] = jnp.asarray(scale * (np.asarray(b, np.float64) - mu) + mu_t, b.dtype)
  return paths.unflatten_like(merged, flat)


def _find(flat, layer, leaf):
  for p in (f'{layer}/{leaf}', f'params/{layer}/{leaf}'):
    if p in flat:
      return p
  raise ValueError(f'repair: no leaf {layer}/{leaf} in the params; layers must '
                   f'name Dense/Conv modules, e.g. {sorted(flat)[:4]}.')


def reset_batch_stats(apply_train_fn: Callable[[Any, Any], tuple[Any, Any]],
                      variables: Any, batches: Iterable[Any]) -> Any:
  """Recomputes BatchNorm running statistics as exact averages over ``batches``.

  Flax's ``BatchNorm`` updates ``batch_stats`` by an EMA with a fixed
  momentum ``m``: ``new = m old + (1 - m) batch``. Running each batch once from
  zero stats and once from unit stats recovers both ``m`` and the batch's
  statistics, so the reset is exact (a cumulative average: the batch means
  averaged, the variance as ``E[var_b] + Var[mean_b]``) whatever ``m`` is.

  Args:
    apply_train_fn: ``(variables, x) -> (outputs, {'batch_stats': ...})``, e.g.
      ``lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])``.
    variables: ``{'params': ..., 'batch_stats': ...}`` of the merged model.
    batches: an iterable of inputs.

  Returns:
    ``variables`` with recomputed ``batch_stats``.
  """
  stats0 = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  stats1 = jax.tree.map(jnp.ones_like, variables['batch_stats'])

  @jax.jit
  def one(x):
    v0 = dict(variables, batch_stats=stats0)
    v1 = dict(variables, batch_stats=stats1)
    s0 = apply_train_fn(v0, x)[1]['batch_stats']
    s1 = apply_train_fn(v1, x)[1]['batch_stats']
    frac = jax.tree.map(lambda a, b: 1.0 - (b - a), s0, s1)  # 1 - momentum
    return jax.tree.map(lambda a, f: a / f, s0, frac)

  acc = None
  n = 0
  for x in batches:
    st = one(x)
    flat = paths.flatten_to_dict(st)
    sq = {p: (v ** 2 if p.endswith('mean') else v) for p, v in flat.items()}
    acc = sq if acc is None else {p: acc[p] + sq[p] for p in acc}
    if n == 0:
      means = {p: v for p, v in flat.items() if p.endswith('mean')}
    else:
      means = {p: means[p] + flat[p] for p in means}
    n += 1
  out = {}
  for p in acc:
    if p.endswith('mean'):
      out[p] = means[p] / n
    else:  # var: E[var_b] + E[mean_b^2] - E[mean_b]^2
      mp = p[:-3] + 'mean'
      out[p] = acc[p] / n + acc[mp] / n - (means[mp] / n) ** 2
  return dict(variables, batch_stats=paths.unflatten_like(variables['batch_stats'], out))
