"""Sparsifiers of task vectors: magnitude trim, DARE, Model Breadcrumbs, DELLA.

Every step here is *per model*: ``[K, ...] -> [K, ...]``, each model with its own
density (a scalar for all, or one per model as mergekit allows). Densities and
the other knobs are float32 arrays in the state, so sweeps over them vmap in one
compiled call. Magnitude selections use the radix select of
`mergejax.transforms._select` (no sort of whole tensors: ~100x faster on CPU).

Rescaling after a drop comes in the conventions of the peers:

* ``'l1'``: one scalar per tensor and model, ``||delta||_1 / ||kept||_1``, so
  the L1 norm is preserved exactly (skipped when either norm is below 1e-7).
  mergekit's ``rescale: true`` since PR #505 (Feb 2025).
* ``'inverse_density'``: divide the kept entries by the keep probability
  (DARE paper, FusionBench; unbiased in expectation). For DELLA the per-entry
  probability ``p_i`` is used (``'inverse_prob'``, the DELLA paper).
* ``None``: no rescale.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax.transforms import _select as select

Hparam = float | Sequence[float] | jax.Array

# mergekit's `rescaled_masked_tensor` skips the rescale below this norm.
RESCALE_EPS = 1e-7


def _choice(value: Any, name: str, allowed: tuple[Any, ...]) -> Any:
  if value not in allowed:
    raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
  return value


def _density(density: Hparam) -> jax.Array:
  return checks.hparam(density, 'density', low=0.0, high=1.0,
                       low_inclusive=False)


def keep_count(rho: jax.Array, n: int, *, count: str = 'mergekit'
               ) -> jax.Array:
  """Number of entries a density keeps out of ``n`` (int32, traceable).

  ``'mergekit'``: ``max(1, int(rho * n))`` for ``0 < rho < 1``, ``n`` for
  ``rho >= 1`` and 0 for ``rho <= 0`` (`mergekit.sparsify.magnitude`).
  ``'fusionbench'``: ``int(rho * n) + 1`` (FusionBench's TIES keeps the entries
  ``>=`` the ``(n - int(rho n))``-th smallest), capped at ``n``.
  ``'floor'``: ``int(rho * n)`` (Model Breadcrumbs' target, which may be 0).

  ``rho * n`` is float32 (densities are traced): a tiny snap makes decimal
  densities exact (``0.7 * 10 -> 7``) on tensors up to ~2**19 entries; above
  that the count is within float32 rounding (relative ~1e-7) of ``int(rho n)``.
  """
  x = rho * jnp.float32(n)
  k = jnp.floor(x + min(n * 2.0**-23, 1e-2)).astype(jnp.int32)
  if count == 'mergekit':
    k = jnp.maximum(k, 1)
  elif count == 'fusionbench':
    k = k + 1
  k = jnp.where(rho >= 1, n, jnp.where(rho <= 0, 0, k))
  return jnp.clip(k, 0, n)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  """A per-model ``[K]`` vector shaped to broadcast against ``[K, ...]``."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def rescale_l1(delta: jax.Array, kept: jax.Array) -> jax.Array:
  """mergekit's L1 rescale, per model: ``kept * |delta|_1 / |kept|_1``.

  Args:
    delta: ``[K, ...]`` before the drop.
    kept: ``[K, ...]`` after the drop (dropped entries zero).

  Returns:
    ``kept`` rescaled so each model's L1 norm equals ``delta``'s; a model whose
    norm (before or after) is below 1e-7 is returned unscaled, as mergekit does.
  """
  return modelaxis.model_map(_rescale_l1_one, delta, kept)


def _rescale_l1_one(delta: jax.Array, kept: jax.Array) -> jax.Array:
  before = jnp.sum(jnp.abs(delta))
  after = jnp.sum(jnp.abs(kept))
  ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
  s = jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)
  return kept * s.astype(kept.dtype)


def apply_mask(delta: jax.Array, keep: jax.Array, prob: jax.Array,
               rescale: str | None) -> jax.Array:
  """Zeroes ``delta`` where not ``keep`` and rescales (shared by DARE/DELLA).

  Args:
    delta: ``[K, ...]`` task vectors.
    keep: bool mask shaped like ``delta``.
    prob: keep probabilities: a scalar, one per model (``[K]``, DARE),
      or per entry (shaped like ``delta``, DELLA); used by
      ``'inverse_density'`` and ``'inverse_prob'``.
    rescale: ``'l1'``, ``'inverse_density'``, ``'inverse_prob'`` or None.

  Returns:
    The sparsified ``[K, ...]`` array.
  """
  p = jnp.asarray(prob, delta.dtype)
  if p.ndim == 0:
    p = jnp.broadcast_to(p, delta.shape[:1])
  return modelaxis.model_map(
      lambda d, m, pp: _apply_mask_one(d, m, pp, rescale), delta, keep, p)


def _apply_mask_one(delta, keep, prob, rescale):
  kept = jnp.where(keep, delta, jnp.zeros((), delta.dtype))
  if rescale == 'l1':
    return _rescale_l1_one(delta, kept)
  if rescale in ('inverse_density', 'inverse_prob'):
    return kept / jnp.where(prob > 0, prob, jnp.ones((), prob.dtype))
  return kept


# ---------------------------------------------------------------- trim


class TrimState(NamedTuple):
  density: jax.Array  # () or [K]


def trim(density: Hparam, *, scope: str = 'tensor', exact: bool = True,
         count: str = 'mergekit', rescale: str | None = None
         ) -> base.MergeTransformation:
  """Keeps each model's largest-magnitude entries (TIES' "trim" step).

  ``[K, ...] -> [K, ...]``. With ``scope='tensor'`` every leaf keeps its own top
  ``k = max(1, int(density * n))`` entries (mergekit ``sparsify.magnitude``);
  with ``scope='global'`` the top-k is taken over all leaves the step sees at
  once (the TIES paper and FusionBench trim the whole task vector; restrict the
  leaves with `mergejax.masked`). FusionBench keeps ``int(density * n) + 1``
  entries and every entry tied with the threshold: ``count='fusionbench',
  exact=False``.

  Args:
    density: fraction of entries kept, in (0, 1]; one value, or one per model.
      1 keeps everything.
    scope: ``'tensor'`` (per leaf) or ``'global'`` (over all leaves).
    exact: keep exactly k entries, ties at the threshold broken by position
      (lowest first); False keeps all ties.
    count: ``'mergekit'`` or ``'fusionbench'`` (see `keep_count`).
    rescale: None, or ``'l1'`` (mergekit ``rescale: true``; per leaf).

  Returns:
    A `MergeTransformation` with state `TrimState`.

  Raises:
    ValueError: for a concrete density outside (0, 1] or an unknown option.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.trim(0.5)
    >>> tx.update({'w': jnp.array([[1., -4., 2., 3.]])}, tx.init(None))[0]
    {'w': Array([[ 0., -4.,  0.,  3.]], dtype=float32)}
  """
  _choice(scope, 'trim scope', ('tensor', 'global'))
  _choice(count, 'trim count', ('mergekit', 'fusionbench'))
  _choice(rescale, 'trim rescale', (None, 'l1'))
  rho = _density(density)
  return base.MergeTransformation(
      lambda params: TrimState(rho),
      base.static_fn.of(_trim_update, scope=scope, exact=exact, count=count,
                        rescale=rescale))


def _trim_update(updates, state, params=None, *, key=None, scope, exact, count,
                 rescale):
  del params, key
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, state
  n_models = leaves[0].shape[0]
  rho = checks.per_model(state.density, n_models, 'density')
  if scope == 'tensor':
    masks = []
    for u in leaves:
      ks = keep_count(rho, u[0].size, count=count)
      masks.append(select.batched_topk_masks([u], ks, exact=exact)[0])
  else:
    ks = keep_count(rho, sum(u[0].size for u in leaves), count=count)
    masks = select.batched_topk_masks(leaves, ks, exact=exact)
  out = [apply_mask(u, m, 1.0, rescale) for u, m in zip(leaves, masks)]
  return jax.tree.unflatten(treedef, out), state


# ---------------------------------------------------------------- DARE


class DareState(NamedTuple):
  density: jax.Array  # () or [K]


NO_KEY_MSG = (
    '{name} draws a random mask and needs a PRNG key: pass one, e.g. '
    'mergejax.merge(tx, base, models, key=jax.random.key(0)).')


def dare(density: Hparam, *, rescale: str | None = 'l1'
         ) -> base.MergeTransformation:
  """DARE: drops entries at random (keep probability ``density``) and rescales.

  ``[K, ...] -> [K, ...]``; each entry of each model is kept independently with
  probability ``density`` (a Bernoulli mask from the explicit key; the key is
  folded with the leaf index and split per model).

  Args:
    density: keep probability in (0, 1]; one value, or one per model. 1 keeps
      everything (no draw matters).
    rescale: ``'l1'`` (mergekit since PR #505: preserve each tensor's L1 norm
      exactly), ``'inverse_density'`` (DARE paper and FusionBench: divide by
      the density; unbiased in expectation) or None.

  Returns:
    A `MergeTransformation` with state `DareState`; ``update`` needs ``key``.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.dare(0.5, rescale='l1')
    >>> u = {'w': jnp.arange(1., 9.)[None]}
    >>> out, _ = tx.update(u, tx.init(None), key=jax.random.key(0))
    >>> float(jnp.abs(out['w']).sum())  # the L1 norm is preserved
    36.0
  """
  _choice(rescale, 'dare rescale', (None, 'l1', 'inverse_density'))
  rho = _density(density)
  return base.MergeTransformation(
      lambda params: DareState(rho),
      base.static_fn.of(_dare_update, rescale=rescale))


def _leaf_keys(key: jax.Array, leaf: int, n_models: int) -> jax.Array:
  return jax.random.split(jax.random.fold_in(key, leaf), n_models)


def _dare_update(updates, state, params=None, *, key=None, rescale):
  del params
  if key is None:
    raise ValueError(NO_KEY_MSG.format(name='dare'))
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, state
  n_models = leaves[0].shape[0]
  rho = checks.per_model(state.density, n_models, 'density')
  out = []
  for j, u in enumerate(leaves):
    keys = _leaf_keys(key, j, n_models)
    keep = modelaxis.model_map(
        lambda kk, r, s=u.shape[1:]: jax.random.uniform(kk, s) < r, keys, rho)
    out.append(apply_mask(u, keep, rho, rescale))
  return jax.tree.unflatten(treedef, out), state


# ---------------------------------------------------------------- breadcrumbs


class BreadcrumbsState(NamedTuple):
  density: jax.Array  # () or [K]
  gamma: jax.Array  # () or [K]


def breadcrumbs_prune(density: Hparam, gamma: Hparam = 0.01, *,
                rescale: str | None = None) -> base.MergeTransformation:
  """Model Breadcrumbs: drops the top-``gamma`` outliers and the smallest entries.

  ``[K, ...] -> [K, ...]``, per leaf and model, mergekit 0.1.5 semantics
  (`sparsify.magnitude_outliers`): with ``n`` entries, ``target =
  int(density n)`` entries are kept, ``n_top = int(gamma n)``: the entries of
  descending magnitude rank ``(drop, drop + target]`` survive, where ``drop =
  min(n_top, n - target)``. So ``gamma = 0`` (or a tensor of fewer than
  ``1/gamma`` entries) is plain magnitude trimming to ``target`` (which may be
  0, unlike `trim`), and ``density >= 1`` returns the tensor unchanged. mergekit
  up to 0.1.4 zeroed the whole tensor when ``n_top == 0``; that is not
  reproduced. Two radix selects, no sort.

  Args:
    density: fraction kept, in (0, 1]; one value, or one per model.
    gamma: fraction of largest entries dropped as outliers, in [0, 1).
    rescale: None (mergekit default) or ``'l1'``.

  Returns:
    A `MergeTransformation` with state `BreadcrumbsState`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.breadcrumbs_prune(0.5, gamma=0.25)
    >>> tx.update({'w': jnp.array([[1., -4., 2., 3.]])}, tx.init(None))[0]
    {'w': Array([[0., 0., 2., 3.]], dtype=float32)}
  """
  _choice(rescale, 'breadcrumbs rescale', (None, 'l1'))
  rho = _density(density)
  g = checks.hparam(gamma, 'gamma', low=0.0, high=1.0, high_inclusive=False)
  return base.MergeTransformation(
      lambda params: BreadcrumbsState(rho, g),
      base.static_fn.of(_breadcrumbs_update, rescale=rescale))


def _breadcrumbs_update(updates, state, params=None, *, key=None, rescale):
  del params, key
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, state
  n_models = leaves[0].shape[0]
  rho = checks.per_model(state.density, n_models, 'density')
  gamma = checks.per_model(state.gamma, n_models, 'gamma')
  out = []
  for u in leaves:
    n = u[0].size
    target = keep_count(rho, n, count='floor')
    n_top = jnp.floor(gamma * jnp.float32(n) + min(n * 2.0**-23, 1e-2))
    n_top = jnp.clip(n_top.astype(jnp.int32), 0, n)
    drop = jnp.minimum(n_top, n - target)
    upper = select.batched_topk_masks([u], drop + target)[0]
    outliers = select.batched_topk_masks([u], drop)[0]
    kept = jnp.where(upper & ~outliers, u, jnp.zeros((), u.dtype))
    if rescale == 'l1':
      kept = rescale_l1(u, kept)
    out.append(jnp.where(_bcast(rho >= 1, u), u, kept))
  return jax.tree.unflatten(treedef, out), state


# ---------------------------------------------------------------- DELLA


class DellaState(NamedTuple):
  density: jax.Array  # () or [K]
  epsilon: jax.Array  # () or [K]


def della_prune(density: Hparam, epsilon: Hparam = 0.15, *, rescale: str | None = 'l1',
          axis: int | None = 1) -> base.MergeTransformation:
  """DELLA (MAGPRUNE): random drop with magnitude-ranked keep probabilities.

  ``[K, ...] -> [K, ...]``. Within each row, the entry of ascending magnitude
  rank ``r`` (0-based, row length ``L``) is kept with probability
  ``p = (density - epsilon) + 2 epsilon r / (L - 1)``: the smallest with
  ``density - epsilon``, the largest with ``density + epsilon``
  (mergekit ``sparsify.della_magprune``; ``density >= 1`` is unchanged).

  Rows run along ``axis`` of each (per-model) leaf. mergekit ranks along dim 1
  of PyTorch-layout weights, i.e. along the *input* axis of a linear layer
  ``(out, in)``: ``axis=1`` reproduces it on torch-layout (safetensors)
  tensors. A Flax kernel is ``(in, out)`` (conv ``(kh, kw, in, out)``): use
  ``axis=-2`` for the same rows. Leaves with fewer than 2 dims are one row, as
  in mergekit; ``axis=None`` makes every leaf one row.

  Args:
    density: mean keep probability, in (0, 1]; one value or one per model.
    epsilon: half-width of the probability range; for ``density < 1`` it must
      satisfy ``0 < density - epsilon`` and ``density + epsilon < 1``.
    rescale: ``'l1'`` (mergekit since PR #505), ``'inverse_prob'`` (DELLA
      paper: divide each kept entry by its own ``p``) or None.
    axis: the ranking axis (see above).

  Returns:
    A `MergeTransformation` with state `DellaState`; ``update`` needs ``key``.

  Raises:
    ValueError: for concrete values breaking the ranges above.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.della_prune(0.5, 0.4, rescale=None, axis=None)
    >>> u = {'w': jnp.arange(1., 101.)[None]}
    >>> out, _ = tx.update(u, tx.init(None), key=jax.random.key(0))
    >>> out['w'].shape
    (1, 100)
  """
  _choice(rescale, 'della rescale', (None, 'l1', 'inverse_prob'))
  rho = _density(density)
  eps = checks.hparam(epsilon, 'epsilon', low=0.0)
  if checks.is_concrete(rho) and checks.is_concrete(eps):
    r, e = np.broadcast_arrays(np.asarray(rho), np.asarray(eps))
    bad = (r < 1) & ((r - e <= 0) | (r + e >= 1))
    if np.any(bad):
      raise ValueError(
          f'della: epsilon {np.asarray(eps).tolist()} with density '
          f'{np.asarray(rho).tolist()} gives keep probabilities outside (0, 1); '
          'choose epsilon < density and density + epsilon < 1 (mergekit '
          'raises the same error).')
  return base.MergeTransformation(
      lambda params: DellaState(rho, eps),
      base.static_fn.of(_della_update, rescale=rescale, axis=axis))


def della_probs(x: jax.Array, rho: jax.Array, eps: jax.Array,
                axis: int | None) -> jax.Array:
  """DELLA keep probabilities for one model's leaf ``x`` (same shape)."""
  if axis is None or x.ndim < 2:
    rows = x.reshape(1, -1)
    back = lambda r: r.reshape(x.shape)
  else:
    moved = jnp.moveaxis(x, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    back = lambda r: jnp.moveaxis(r.reshape(moved.shape), -1, axis)
  length = rows.shape[-1]
  # The keep probability is linear in the exact within-row rank, so a per-row
  # sort is needed: a radix histogram would cost a 65536-bin table per row,
  # more work than sorting rows of a few thousand entries. Rows are short, so
  # this is O(n log L), not a whole-tensor sort.
  order = jnp.argsort(jnp.abs(rows), axis=-1, stable=True)
  ranks = jax.vmap(lambda o: jnp.zeros(length, jnp.int32).at[o].set(
      jnp.arange(length, dtype=jnp.int32)))(order)
  rank_norm = ranks.astype(jnp.float32) / max(length - 1, 1)
  probs = (rho - eps) + 2 * eps * rank_norm
  return back(probs)


def _della_update(updates, state, params=None, *, key=None, rescale, axis):
  del params
  if key is None:
    raise ValueError(NO_KEY_MSG.format(name='della'))
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, state
  n_models = leaves[0].shape[0]
  rho = checks.per_model(state.density, n_models, 'density')
  eps = checks.per_model(state.epsilon, n_models, 'epsilon')
  out = []
  for j, u in enumerate(leaves):
    keys = _leaf_keys(key, j, n_models)
    probs = jax.vmap(lambda x, r, e: della_probs(x, r, e, axis))(u, rho, eps)
    keep = jax.vmap(lambda kk, p: jax.random.uniform(kk, p.shape) < p)(keys, probs)
    kept = apply_mask(u, keep, probs, rescale)
    r = _bcast(rho, u)
    out.append(jnp.where(r >= 1, u, jnp.where(r <= 0, 0.0, kept)).astype(u.dtype))
  return jax.tree.unflatten(treedef, out), state
