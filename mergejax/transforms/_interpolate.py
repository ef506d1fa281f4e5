"""Interpolation primitives: lerp, SLERP, NuSLERP, MultiSLERP, Karcher, Model Stock.

Every factory here returns a *reducing* `MergeTransformation`: it takes the
stacked models (leaves ``[K, ...]``) and returns **merged parameters** (leaves
``[...]``), not a delta, so a method is the primitive alone and needs no
``apply_to_base`` after it. Math is float32; `mergejax.merge` casts the result
to the base's dtypes.

How the base enters. ``update(updates, state, params)`` receives the base model
as ``params`` (`mergejax.merge` passes ``base=``, or None):

=================  ============  =========================================
primitive          models (K)    base (``params``)
=================  ============  =========================================
lerp, slerp        exactly 1     required: the ``t = 0`` endpoint
nearswap           exactly 1     required: the model swapped towards
arcee_fusion       exactly 1     required: the model fused into
nuslerp            exactly 2     optional: if given, interpolate the task
                                 vectors and add the base back
multislerp         >= 1          optional: as nuslerp
karcher            >= 1          ignored (list the base among the models to
                                 average it in, as mergekit does)
model_stock        >= 2          required: the anchor
=================  ============  =========================================

``nuslerp_reduce`` and ``multislerp_reduce`` take ``use_base=False`` to ignore a given base,
e.g. after an explicit `task_vectors` step in a chain.

Numeric knobs (``t``, weights, thresholds, tolerances, iteration counts) live in
the state as arrays, so ``jax.vmap`` over them sweeps in one compiled call;
only the vector layout (``flatten``, ``axis``, ``filter_wise``) and conventions
are static.

Layouts. mergekit's per-row options act on the **last** axis of PyTorch
``(out, in)`` weights. A Flax ``Dense`` kernel is ``(in, out)``, so the same
vectors lie along ``axis=0`` there. Every per-row primitive takes ``axis``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _select as select

F32 = jnp.float32
Weights = float | Sequence[float] | jax.Array | None


# ----------------------------------------------------------------------------
# helpers


def _num_models(updates: Any) -> int:
  leaves = jax.tree.leaves(updates)
  if not leaves:
    raise ValueError('updates has no array leaves.')
  return leaves[0].shape[0]


def _check_count(name: str, k: int, *, exactly: int | None = None,
                 at_least: int | None = None, what: str = '') -> None:
  if exactly is not None and k != exactly:
    raise ValueError(
        f'{name} needs exactly {exactly} model(s) besides the base, got K={k}. '
        f'{what}')
  if at_least is not None and k < at_least:
    raise ValueError(
        f'{name} needs at least {at_least} models besides the base, got K={k}. '
        f'{what}')


def _check_weight_sum(w: jax.Array, name: str) -> None:
  # Concrete weights only: traced sweeps cannot be checked before running.
  if checks.is_concrete(w) and w.ndim and abs(float(jnp.sum(w))) < 1e-12:
    raise ValueError(f'{name}: weights {w.tolist()} sum to zero, so normalizing '
                     'them divides by zero.')


def _need_base(name: str, params: Any) -> None:
  if params is None:
    raise ValueError(f'{name}: ' + base.NO_PARAMS_MSG)


def _norm(x: jax.Array, axis=-1, keepdims=False) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def _to_vectors(x: jax.Array, *, flatten: bool, axis: int, path: str,
                lead: int = 0) -> tuple[jax.Array, Any]:
  """Reshapes ``x`` so its vectors lie along the last axis.

  ``lead`` leading axes (the model axis) are kept in front. Returns the
  reshaped array and an ``undo`` function, which restores the layout of an
  array with the same vectors and any number of leading axes (``lead`` many).
  """
  shape = x.shape
  core = shape[lead:]
  if flatten or len(core) < 2:
    # Whole tensor as one vector (also 0-D/1-D leaves in per-row mode).
    y = x.reshape(shape[:lead] + (1, -1))
    return y, lambda r: r.reshape(r.shape[:lead] + core)
  nd = len(core)
  if not -nd <= axis < nd:
    raise ValueError(
        f'Leaf {path!r} has shape {core}; axis={axis} is out of range. Use '
        'axis=-1 for PyTorch (out, in) weights, axis=0 for Flax (in, out) '
        'kernels.')
  ax = lead + axis % nd
  y = jnp.moveaxis(x, ax, -1)
  moved = y.shape
  y = y.reshape(shape[:lead] + (-1, moved[-1]))
  return y, lambda r: jnp.moveaxis(r.reshape(r.shape[:lead] + moved[lead:]),
                                   -1, ax)


# ----------------------------------------------------------------------------
# lerp


class LerpState(NamedTuple):
  t: jax.Array


def lerp_reduce(t: float | jax.Array) -> base.MergeTransformation:
  """Linear interpolation from the base (``t = 0``) to the one model (``t = 1``).

  ``out = (1 - t) * base + t * model``. Reducing: ``[1, ...] -> [...]``; needs
  the base as ``params``. ``t`` is traced (sweeps vmap); values outside [0, 1]
  extrapolate.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.merge(mj.transforms.lerp_reduce(0.25), {'w': jnp.zeros(2)}, [{'w': jnp.ones(2) * 4}])['w']
    Array([1., 1.], dtype=float32)
  """
  t = checks.hparam(t, 't')
  return base.MergeTransformation(lambda params: LerpState(t),
                                  base.static_fn.of(_lerp_update))


def _lerp_update(updates, state, params=None, *, key=None):
  del key
  _check_count('lerp', _num_models(updates), exactly=1,
               what='Interpolate between two fine-tunes with nuslerp.')
  _need_base('lerp', params)
  t = state.t

  def fn(u, p):
    a, b = p.astype(F32), u[0].astype(F32)
    return (1 - t) * a + t * b

  return jax.tree.map(fn, updates, params), state


# ----------------------------------------------------------------------------
# slerp (mergekit `slerp_reduce`)


class SlerpState(NamedTuple):
  t: jax.Array
  dot_threshold: jax.Array


SLERP_NORM_EPS = 1e-8


def slerp_reduce(t: float | jax.Array, *, dot_threshold: float | jax.Array = 0.9995
          ) -> base.MergeTransformation:
  """Spherical interpolation from the base (``t = 0``) to the model (``t = 1``).

  mergekit ``slerp_reduce`` semantics, per leaf, on the whole tensor flattened:
  norms ``<= 1e-8`` are replaced by 1; ``dot = clip(<a/|a|, b/|b|>, -1, 1)``;
  if ``|dot| > dot_threshold`` (near-parallel *or* near-antiparallel) the
  result is ``lerp_reduce``; otherwise
  ``sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b`` applied to the
  **un-normalized** tensors. Reducing: ``[1, ...] -> [...]``, base required.

  Args:
    t: interpolation factor (traced).
    dot_threshold: the lerp-fallback threshold (traced; mergekit 0.9995).

  Returns:
    A `MergeTransformation`; its state holds ``t`` and ``dot_threshold``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base, ft = {'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}
    >>> mj.merge(mj.transforms.slerp_reduce(0.5), base, [ft])['w']
    Array([0.7071..., 0.7071...], dtype=float32)
  """
  t = checks.hparam(t, 't')
  thr = checks.hparam(dot_threshold, 'dot_threshold', low=0.0, high=1.0)
  return base.MergeTransformation(lambda params: SlerpState(t, thr),
                                  base.static_fn.of(_slerp_update))


def slerp_coefficients(dot: jax.Array, t: jax.Array, threshold: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """``(c_a, c_b)`` so that ``slerp = c_a a + c_b b`` (lerp where ``|dot| > thr``)."""
  linear = jnp.abs(dot) > threshold
  theta = jnp.arccos(jnp.where(linear, 0.0, dot))
  sin_theta = jnp.sin(theta)
  # A zero sine only happens when the fallback is disabled (threshold >= 1);
  # take lerp there too rather than return NaN.
  linear = linear | (sin_theta <= 0)
  safe = jnp.where(linear, 1.0, sin_theta)
  ca = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / safe)
  cb = jnp.where(linear, t, jnp.sin(t * theta) / safe)
  return ca, cb


def _slerp_update(updates, state, params=None, *, key=None):
  del key
  _check_count('slerp', _num_models(updates), exactly=1,
               what='mergekit slerp takes the base and one other model; for '
               'two fine-tunes use nuslerp, for more multislerp.')
  _need_base('slerp', params)

  def fn(u, p):
    a, b = p.astype(F32), u[0].astype(F32)
    na, nb = _norm(a.reshape(-1)), _norm(b.reshape(-1))
    na = jnp.where(na > SLERP_NORM_EPS, na, 1.0)
    nb = jnp.where(nb > SLERP_NORM_EPS, nb, 1.0)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1.0, 1.0)
    ca, cb = slerp_coefficients(dot, state.t, state.dot_threshold)
    return ca * a + cb * b

  return jax.tree.map(fn, updates, params), state


# ----------------------------------------------------------------------------
# nuslerp (mergekit `nuslerp_reduce`)


class NuslerpState(NamedTuple):
  weights: jax.Array  # () or [2]


NUSLERP_NORM_EPS = 1e-7
NUSLERP_COLINEAR_EPS = 1e-8
NUSLERP_WEIGHT_EPS = 1e-6


def nuslerp_reduce(weight: Weights = None, *, flatten: bool = True,
            row_wise: bool = False, axis: int | None = None,
            use_base: bool = True) -> base.MergeTransformation:
  """SLERP between two models with ``t = w_1 / (w_0 + w_1)`` (mergekit ``nuslerp_reduce``).

  With a base (``params``): ``base + slerp_t(theta_a - base, theta_b - base)``;
  without: ``slerp_t(theta_a, theta_b)``. ``t = 0.5`` if ``|w_0 + w_1| < 1e-6``.
  Per vector: ``u = x / max(|x|, 1e-7)``, ``c = clip(<u_a, u_b>, -1, 1)``; if
  ``1 - c^2 <= 1e-16`` lerp, else ``(sin((1-t) th) a + sin(t th) b)/sin th``.
  Unlike `slerp_reduce` there is no 0.9995 threshold. Reducing: ``[2, ...] -> [...]``.

  Args:
    weight: two weights (or one for both; None means equal, ``t = 0.5``).
    flatten: treat each tensor as one vector (mergekit ``nuslerp_flatten``).
    row_wise: with ``flatten=False``, take vectors along axis 0 instead of
      the last axis (mergekit ``nuslerp_row_wise``, PyTorch layout).
    axis: with ``flatten=False``, the axis the vectors lie along, overriding
      ``row_wise``: mergekit's default (``-1`` of ``(out, in)``) is ``axis=0``
      for a Flax ``(in, out)`` kernel. 0-D/1-D leaves are one vector.
    use_base: interpolate task vectors when a base is given; False
      interpolates the updates as they come.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([2., 0.])}, {'w': jnp.array([0., 2.])}]
    >>> mj.merge(mj.transforms.nuslerp_reduce([1., 1.]), None, fts)['w']
    Array([1.414..., 1.414...], dtype=float32)
  """
  if axis is not None and row_wise:
    raise ValueError('nuslerp: give either row_wise=True or axis=..., not both.')
  if axis is None:
    axis = 0 if row_wise else -1
  w = checks.hparam(1.0 if weight is None else weight, 'weight')
  return base.MergeTransformation(
      lambda params: NuslerpState(w),
      base.static_fn.of(_nuslerp_update, flatten=flatten, axis=int(axis),
                        use_base=use_base))


def nuslerp_vectors(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  """mergekit's per-vector NuSLERP along the last axis (float32 math)."""
  ua = a / jnp.maximum(_norm(a, keepdims=True), NUSLERP_NORM_EPS)
  ub = b / jnp.maximum(_norm(b, keepdims=True), NUSLERP_NORM_EPS)
  c = jnp.clip(jnp.sum(ua * ub, axis=-1, keepdims=True), -1.0, 1.0)
  colinear = (1 - c * c) <= NUSLERP_COLINEAR_EPS**2
  theta = jnp.arccos(jnp.where(colinear, 0.0, c))
  safe = jnp.where(colinear, 1.0, jnp.sin(theta))
  sph = (jnp.sin((1 - t) * theta) * a + jnp.sin(t * theta) * b) / safe
  return jnp.where(colinear, (1 - t) * a + t * b, sph)


def _nuslerp_update(updates, state, params=None, *, key=None, flatten, axis,
                    use_base):
  del key
  _check_count('nuslerp', _num_models(updates), exactly=2,
               what='For one model use slerp (with the base), for more '
               'multislerp or karcher.')
  w = checks.per_model(state.weights, 2, 'nuslerp weight')
  total = w[0] + w[1]
  t = jnp.where(jnp.abs(total) < NUSLERP_WEIGHT_EPS, 0.5,
                w[1] / jnp.where(jnp.abs(total) < NUSLERP_WEIGHT_EPS, 1.0, total))
  relative = use_base and params is not None

  def fn(path, u, p=None):
    x = u.astype(F32)
    if relative:
      x = x - p.astype(F32)[None]
    v, undo = _to_vectors(x, flatten=flatten, axis=axis, path=path, lead=1)
    out = undo(nuslerp_vectors(v[0], v[1], t)[None])[0]
    return out + p.astype(F32) if relative else out

  if relative:
    out = paths.tree_map_with_path(fn, updates, params)
  else:
    out = paths.tree_map_with_path(fn, updates)
  return out, state


# ----------------------------------------------------------------------------
# multislerp (mergekit `multislerp_reduce`)


class MultislerpState(NamedTuple):
  weights: jax.Array  # () or [K]
  eps: jax.Array


def multislerp_reduce(weight: Weights = None, *, normalize_weights: bool = True,
               eps: float | jax.Array = 1e-8, use_base: bool = True
               ) -> base.MergeTransformation:
  """Barycentric interpolation on the hypersphere (mergekit ``multislerp_reduce``).

  Whole tensor flattened. ``x_i`` = model ``i`` (minus the base if one is
  given); ``u_i = x_i / (|x_i| + eps)``; ``m = sum w_i u_i`` normalized; one
  tangent-space step ``r = sum w_i (u_i - <u_i, m> m)``, ``l = |r| + eps``,
  ``y = m cos l + r sin l / l``; ``out = (sum w_i |x_i|) y`` (+ base). With
  one model the model is returned unchanged. Reducing: ``[K, ...] -> [...]``.

  Where ``|m| < eps`` (antipodal inputs whose weights cancel), two models
  fall back to ``w_0 x_0 + w_1 x_1`` (+ base) as in mergekit; with more
  models mergekit raises, which a jitted merge cannot, so mergejax returns the
  same weighted sum ``sum w_i x_i`` (+ base) there.

  Args:
    weight: per-model weights (None means equal).
    normalize_weights: divide the weights by their sum (mergekit default).
    eps: numerical floor (traced; mergekit 1e-8).
    use_base: as in `nuslerp_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([2., 0.])}, {'w': jnp.array([0., 2.])}]
    >>> mj.merge(mj.transforms.multislerp_reduce(), None, fts)['w']
    Array([1.414..., 1.414...], dtype=float32)
  """
  w = checks.hparam(1.0 if weight is None else weight, 'weight')
  if normalize_weights:
    _check_weight_sum(w, 'multislerp')
  e = checks.hparam(eps, 'eps', low=0.0)
  return base.MergeTransformation(
      lambda params: MultislerpState(w, e),
      base.static_fn.of(_multislerp_update, normalize_weights=normalize_weights,
                        use_base=use_base))


def _multislerp_update(updates, state, params=None, *, key=None,
                       normalize_weights, use_base):
  del key
  k = _num_models(updates)
  _check_count('multislerp', k, at_least=1)
  w = checks.per_model(state.weights, k, 'multislerp weight')
  if normalize_weights:
    w = w / jnp.sum(w)
  eps = state.eps
  relative = use_base and params is not None

  def fn(u, p=None):
    if k == 1:
      return u[0].astype(F32)
    p32 = p.astype(F32) if relative else None
    x = u.astype(F32)
    if relative:
      x = x - p32[None]
    xf = x.reshape(k, -1)
    norms = _norm(xf, keepdims=True)  # [K, 1]
    units = xf / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    dots = jnp.sum(units * mean[None], axis=-1, keepdims=True)
    tangent = jnp.sum((units - dots * mean[None]) * w[:, None], axis=0)
    ell = _norm(tangent) + eps
    y = mean * jnp.cos(ell) + tangent * (jnp.sin(ell) / ell)
    out = y * jnp.sum(norms[:, 0] * w)
    out = jnp.where(degenerate, jnp.sum(xf * w[:, None], axis=0), out)
    out = out.reshape(u.shape[1:])
    return out + p32 if relative else out

  out = (jax.tree.map(fn, updates, params) if relative
         else jax.tree.map(fn, updates))
  return out, state


# ----------------------------------------------------------------------------
# karcher (mergekit `karcher_reduce`)


class KarcherState(NamedTuple):
  weights: jax.Array  # () or [K]
  max_iter: jax.Array  # int32
  tol: jax.Array


def karcher_reduce(*, weights: Weights = None, max_iter: int | jax.Array = 10,
            tol: float | jax.Array = 1e-5) -> base.MergeTransformation:
  """Karcher (Frechet) mean of the models' directions on the sphere, times a mean norm.

  mergekit ``karcher_reduce``, per leaf on the flattened tensor: units
  ``u_i = x_i/|x_i|``; inputs with ``|x_i| <= tol`` are left out of the
  direction (their alphas renormalized); start at the normalized weighted mean
  of the units; Riemannian gradient steps
  ``T = sum a_i (th_i/sin th_i)(u_i - cos th_i mu)`` (terms with
  ``th_i < tol`` skipped) until ``|T| < tol`` or ``max_iter`` steps;
  ``out = (sum_i a_i |x_i|) mu`` over **all** inputs. The base is not used:
  list it among the models to average it in, as mergekit does. Reducing:
  ``[K, ...] -> [...]``; the loop is a ``lax.while_loop`` (jits and vmaps).

  Args:
    weights: None gives mergekit's ``a_i = 1/K`` (mergekit's karcher ignores
      per-model weights); otherwise ``a_i = w_i / sum w`` (a weighted Karcher
      mean, the paper's general form).
    max_iter: iteration cap (traced int; mergekit 10).
    tol: convergence / validity tolerance (traced; mergekit 1e-5).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([2., 0.])}, {'w': jnp.array([0., 4.])}]
    >>> mj.merge(mj.transforms.karcher_reduce(), None, fts)['w']
    Array([2.121..., 2.121...], dtype=float32)
  """
  w = checks.hparam(1.0 if weights is None else weights, 'weights', low=0.0)
  _check_weight_sum(w, 'karcher')
  it = jnp.asarray(max_iter, jnp.int32)
  if checks.is_concrete(it) and int(it) < 0:
    raise ValueError(f'max_iter must be >= 0, got {int(it)}.')
  tl = checks.hparam(tol, 'tol', low=0.0)
  return base.MergeTransformation(lambda params: KarcherState(w, it, tl),
                                  base.static_fn.of(_karcher_update))


def karcher_vectors(xs: Sequence[jax.Array], alphas: jax.Array,
                    max_iter: jax.Array, tol: jax.Array) -> list[jax.Array]:
  """Karcher means of several stacks ``x`` ``[K, n]`` (one per leaf), weights ``[K]``.

  Each stack is its own problem with its own stopping rule, but stacks of the
  same size are batched (``vmap``) and all of them iterate in **one**
  ``lax.while_loop`` (a finished stack is frozen): compile time grows with the
  number of distinct leaf sizes, not the number of leaves.
  """
  groups: dict[int, list[int]] = {}
  for idx, x in enumerate(xs):
    groups.setdefault(x.shape[-1], []).append(idx)
  order = list(groups.values())

  def prepare(x):
    norms = _norm(x, keepdims=True)  # [K, 1]
    units = jnp.where(norms == 0, 0.0, x / jnp.where(norms == 0, 1.0, norms))
    valid = norms[:, 0] > tol
    va = jnp.where(valid, alphas, 0.0)
    any_valid = jnp.any(valid)
    na = va / jnp.where(any_valid, jnp.sum(va), 1.0)
    mean = jnp.sum(units * na[:, None], axis=0)
    mnorm = _norm(mean)
    first = units[jnp.argmax(valid)]
    mean = jnp.where(mnorm < tol, first,
                     mean / jnp.where(mnorm < tol, 1.0, mnorm))
    return norms[:, 0], units, valid, na, any_valid, mean

  def step(mu, done, units, valid, na):
    dot = jnp.clip(units @ mu, -1.0, 1.0)  # [K]
    theta = jnp.arccos(dot)
    use = valid & (theta >= tol)
    coef = jnp.where(use, na * theta / jnp.where(use, jnp.sin(theta), 1.0), 0.0)
    tangent = jnp.sum(coef[:, None] * (units - dot[:, None] * mu[None]), axis=0)
    tn = _norm(tangent)
    fin = tn < tol
    new = jnp.cos(tn) * mu + jnp.sin(tn) * (tangent / jnp.where(fin, 1.0, tn))
    un = _norm(new)
    new = jnp.where(un > tol, new / jnp.where(un > tol, un, 1.0), new)
    return jnp.where(done | fin, mu, new), done | fin

  prep = [jax.vmap(prepare)(jnp.stack([xs[i] for i in g])) for g in order]
  vstep = jax.vmap(step)

  def cond(carry):
    i, _, dones = carry
    return (i < max_iter) & ~jnp.all(jnp.concatenate(dones))

  def body(carry):
    i, mus, dones = carry
    new = [vstep(mu, done, p[1], p[2], p[3])
           for mu, done, p in zip(mus, dones, prep)]
    return (i + 1, tuple(n[0] for n in new), tuple(n[1] for n in new))

  init = (jnp.int32(0), tuple(p[5] for p in prep),
          tuple(jnp.zeros(len(g), bool) for g in order))
  _, means, _ = jax.lax.while_loop(cond, body, init)
  out: list[jax.Array] = [None] * len(xs)  # type: ignore[list-item]
  for g, mean, (norms, _, _, _, any_valid, _) in zip(order, means, prep):
    scale = jnp.sum(alphas[None] * norms, axis=1, keepdims=True)  # [G, 1]
    res = jnp.where(any_valid[:, None], scale * mean, 0.0)
    for row, idx in enumerate(g):
      out[idx] = res[row]
  return out


def _karcher_update(updates, state, params=None, *, key=None):
  del params, key
  k = _num_models(updates)
  w = checks.per_model(state.weights, k, 'karcher weights')
  alphas = w / jnp.sum(w)
  leaves, treedef = jax.tree.flatten(updates)
  if k == 1:  # mergekit returns a single input unchanged
    return jax.tree.unflatten(treedef, [u[0].astype(F32) for u in leaves]), state
  means = karcher_vectors([u.astype(F32).reshape(k, -1) for u in leaves],
                          alphas, state.max_iter, state.tol)
  out = [m.reshape(u.shape[1:]) for m, u in zip(means, leaves)]
  return jax.tree.unflatten(treedef, out), state


# ----------------------------------------------------------------------------
# model stock


MODEL_STOCK_CONVENTIONS = ('mergekit', 'fusionbench')


def model_stock_ratio(tau: jax.Array, *, convention: str = 'mergekit'
                      ) -> jax.Array:
  """Model Stock's interpolation ratio ``t`` from task vectors ``tau`` ``[K, R, n]``.

  ``t = K c / (1 + (K - 1) c)`` per row (``[R, 1]``), where ``c`` is

  * ``'mergekit'``: the **mean of the pairwise cosines**
    ``<a, b> / max(|a||b|, 1e-6)`` (clipped to [-1, 1]); ``t = 0`` where
    ``|1 + (K-1) c| < 1e-6``; negative ``c`` is not clamped;
  * ``'fusionbench'``: the **cosine of the mean pairwise angle**, cosines
    ``<a, b> / (|a||b| + 1e-8)``, and ``t = K c / ((K-1) c + 1 + 1e-8)``.

  The two agree for K = 2 and differ for K >= 3.
  """
  if convention not in MODEL_STOCK_CONVENTIONS:
    raise ValueError(f'model_stock convention must be one of '
                     f'{MODEL_STOCK_CONVENTIONS}, got {convention!r}.')
  k = tau.shape[0]
  if k < 2:
    raise ValueError(f'model_stock needs at least 2 models besides the base, '
                     f'got K={k}.')
  gram = jnp.einsum('irn,jrn->rij', tau, tau)  # [R, K, K]
  norms = _norm(tau)  # [K, R]
  nn = jnp.einsum('ir,jr->rij', norms, norms)
  iu, ju = jnp.triu_indices(k, 1)
  if convention == 'mergekit':
    cos = jnp.clip(gram / jnp.maximum(nn, 1e-6), -1.0, 1.0)[:, iu, ju]
    c = jnp.mean(cos, axis=-1, keepdims=True)  # [R, 1]
    den = 1 + (k - 1) * c
    singular = jnp.abs(den) < 1e-6
    return jnp.where(singular, 0.0, k * c / jnp.where(singular, 1.0, den))
  cos = jnp.clip(gram / (nn + 1e-8), -1.0, 1.0)[:, iu, ju]
  c = jnp.cos(jnp.mean(jnp.arccos(cos), axis=-1, keepdims=True))
  return k * c / ((k - 1) * c + 1 + 1e-8)


def model_stock_reduce(*, filter_wise: bool = False, convention: str = 'mergekit',
                axis: int = -1) -> base.MergeTransformation:
  """Model Stock: ``out = t * mean_i(theta_i) + (1 - t) * base``.

  ``t`` comes from the angle between the task vectors (`model_stock_ratio`),
  per tensor, or per row with ``filter_wise``. Reducing:
  ``[K, ...] -> [...]`` with ``K >= 2``; needs the base (the anchor).

  Args:
    filter_wise: one ratio per vector along ``axis`` (mergekit
      ``filter_wise``; 0-D/1-D leaves are one row) instead of one per tensor.
    convention: ``'mergekit'`` (mean of cosines) or ``'fusionbench'``
      (cosine of the mean angle); see `model_stock_ratio`.
    axis: with ``filter_wise``, the axis the vectors lie along: mergekit's
      ``-1`` of a PyTorch ``(out, in)`` weight is ``axis=0`` of a Flax
      ``(in, out)`` kernel.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> mj.merge(mj.transforms.model_stock_reduce(), base, fts)['w']  # orthogonal: t = 0
    Array([0., 0.], dtype=float32)
  """
  if convention not in MODEL_STOCK_CONVENTIONS:
    raise ValueError(f'model_stock convention must be one of '
                     f'{MODEL_STOCK_CONVENTIONS}, got {convention!r}.')
  return base.MergeTransformation(
      base.init_empty_state,
      base.static_fn.of(_model_stock_update, filter_wise=filter_wise,
                        convention=convention, axis=int(axis)))


def _model_stock_update(updates, state, params=None, *, key=None, filter_wise,
                        convention, axis):
  del key
  k = _num_models(updates)
  _check_count('model_stock', k, at_least=2,
               what='mergekit requires the base plus >= 2 models.')
  _need_base('model_stock', params)

  def fn(path, u, p):
    x, p32 = u.astype(F32), p.astype(F32)
    v, undo = _to_vectors(x, flatten=not filter_wise, axis=axis, path=path,
                          lead=1)
    v0, _ = _to_vectors(p32[None], flatten=not filter_wise, axis=axis,
                        path=path, lead=1)
    t = model_stock_ratio(v - v0, convention=convention)  # [R, 1]
    out = t * jnp.mean(v, axis=0) + (1 - t) * v0[0]
    return undo(out[None])[0]

  return paths.tree_map_with_path(fn, updates, params), state


# ----------------------------------------------------------------------------
# nearswap (mergekit `nearswap_reduce`)


class NearswapState(NamedTuple):
  t: jax.Array


def nearswap_reduce(t: float | jax.Array) -> base.MergeTransformation:
  """mergekit ``nearswap_reduce``: take the model's value where it is near the base.

  ``w = clip(t / max(|base - model|, 1e-6), 0, 1)``;
  ``out = w * model + (1 - w) * base``. Entries within ``t`` of each other
  take the model's value; far-apart entries stay near the base. Reducing:
  ``[1, ...] -> [...]``, base required.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base, ft = {'w': jnp.array([0., 0.])}, {'w': jnp.array([0.1, 2.])}
    >>> mj.merge(mj.transforms.nearswap_reduce(0.5), base, [ft])['w']
    Array([0.1, 0.5], dtype=float32)
  """
  # A negative distance selects nothing (w = 0 everywhere): a typo, not a merge.
  t = checks.hparam(t, 't', low=0.0)
  return base.MergeTransformation(lambda params: NearswapState(t),
                                  base.static_fn.of(_nearswap_update))


def _nearswap_update(updates, state, params=None, *, key=None):
  del key
  _check_count('nearswap', _num_models(updates), exactly=1)
  _need_base('nearswap', params)

  def fn(u, p):
    a, b = p.astype(F32), u[0].astype(F32)
    w = jnp.clip(state.t / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a

  return jax.tree.map(fn, updates, params), state


# ----------------------------------------------------------------------------
# arcee fusion (mergekit `arcee_fusion_reduce`)


def arcee_fusion_reduce(*, axis: int = -1) -> base.MergeTransformation:
  """mergekit ``arcee_fusion_reduce``: keep the model's changes with outlying importance.

  Per row along ``axis`` (mergekit: the last axis of PyTorch weights; use
  ``axis=0`` for Flax ``(in, out)`` kernels): ``p = softmax(model) + 1e-8``,
  ``q = softmax(base) + 1e-8``, ``KL = sum p log(p/q)``; importance
  ``I = |model - base| * KL``; threshold ``median + 1.5 (Q3 - Q1)`` with
  quantiles taken as the sorted element ``int(q (n - 1))``;
  ``out = base + [I >= thr] (model - base)``. Quantiles are exact here (a
  sort for small tensors, radix selects above 65536 entries); mergekit
  estimates them from 10^6 random samples (with replacement) for tensors
  larger than that, so results differ there. Reducing: ``[1, ...] -> [...]``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((1, 8))}
    >>> ft = {'w': jnp.array([[0., 0., 0., 0., 0., 0., 0., 3.]])}
    >>> mj.merge(mj.transforms.arcee_fusion_reduce(), base, [ft])['w']
    Array([[0., 0., 0., 0., 0., 0., 0., 3.]], dtype=float32)
  """
  return base.MergeTransformation(
      base.init_empty_state, base.static_fn.of(_arcee_update, axis=int(axis)))


# Below this size one sort is cheaper (to compile and to run) than three
# two-pass radix selects; above it the selects win by a wide margin on CPU.
_SORT_MAX = 1 << 16


def _sorted_elements(x: jax.Array, js: Sequence[int]) -> list[jax.Array]:
  """The elements at 0-based indices ``js`` of ``sort(x)``, for ``x >= 0``."""
  if x.size <= _SORT_MAX:
    s = jnp.sort(x.reshape(-1))
    return [s[j] for j in js]
  return [select.kth_largest_magnitude(x, x.size - j) for j in js]


def _arcee_update(updates, state, params=None, *, key=None, axis):
  del key
  _check_count('arcee_fusion', _num_models(updates), exactly=1)
  _need_base('arcee_fusion', params)

  def fn(path, u, p):
    a, b = p.astype(F32), u[0].astype(F32)
    if a.ndim == 0:
      return b  # one entry: it is its own outlier threshold
    v, undo = _to_vectors(jnp.stack([a, b]), flatten=False, axis=axis,
                          path=path, lead=1)
    va, vb = v[0], v[1]
    pb = jax.nn.softmax(vb, axis=-1) + 1e-8
    qa = jax.nn.softmax(va, axis=-1) + 1e-8
    kl = jnp.sum(pb * jnp.log(pb / qa), axis=-1, keepdims=True)
    # KL >= 0 exactly (equal total masses); clamp rounding negatives so the
    # magnitude-based radix select orders the importances correctly.
    imp = jnp.abs(vb - va) * jnp.maximum(kl, 0.0)
    n = imp.size
    q1, med, q3 = _sorted_elements(
        imp, [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)])
    thr = med + 1.5 * (q3 - q1)
    out = va + jnp.where(imp >= thr, vb - va, 0.0)
    return undo(out[None])[0]

  return paths.tree_map_with_path(fn, updates, params), state
