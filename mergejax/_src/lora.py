"""Merging LoRA adapters as factor pairs, without materialising full deltas.

A LoRA update of a Flax kernel ``(in, out)`` is a `LoRA` pair with
``delta = a @ b``: ``a (in, r)``, ``b (r, out)``. From PEFT (PyTorch,
``delta_W = B A`` with ``lora_A (r, in)``, ``lora_B (out, r)``) the mapping is
``a = lora_A.T``, ``b = (scaling * lora_B).T``, so that ``(B A).T = a @ b``.

An adapter is any pytree whose LoRA-adapted leaves are `LoRA` nodes (other
leaves, e.g. trained biases, are merged by a weighted sum). Methods:

* `lora_svd`: the best rank-``rank`` approximation of ``sum_i w_i a_i b_i``
  computed from QR factors of the concatenated factors, in
  ``O((in + out) K r)`` memory: the ``in x out`` delta is never formed.
* `lora_lego`: LoRA-LEGO (Zhao et al. 2025): rank-wise clustering of all
  ``K r`` rank-one units into ``rank`` clusters with k-means; each cluster's
  merged unit is the mean of its members.

`lora_from_delta` turns dense deltas (e.g. the task vectors of fully
fine-tuned models) into adapters by truncated SVD of each matrix leaf.

Both return adapters (factor pairs). Use them with `merge_lora`, which checks
the pairs (ranks must agree within a pair and across adapters, naming the
leaf) and runs the transformation under jit; with ``rank`` equal to the input
rank they also run through ``mergejax.merge(tx, None, adapters)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax._src import subspace


class LoRA(NamedTuple):
  """A low-rank update ``a @ b`` of a Flax kernel (see the module docstring)."""
  a: jax.Array  # (in, r)
  b: jax.Array  # (r, out)


def _is_lora(x):
  return isinstance(x, LoRA)


def lora_delta(adapter: Any) -> Any:
  """Materialises every `LoRA` node as the dense ``a @ b`` (float32)."""
  return jax.tree.map(
      lambda x: (x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)
                 if _is_lora(x) else x), adapter, is_leaf=_is_lora)


def lora_from_delta(delta: Any, rank: int | None) -> Any:
  """Best rank-``rank`` `LoRA` factors of every 2-D leaf of a dense delta.

  Each matrix leaf ``tau (in, out)`` (Flax layout, e.g. a task vector
  ``theta_t - theta_0``) becomes ``LoRA(a, b)`` from its truncated SVD
  ``tau ~ U_r S_r V_r^T``: ``a = U_r S_r^(1/2)`` ``(in, r)``, ``b = S_r^(1/2)
  V_r^T`` ``(r, out)``, the best rank-``r`` approximation in Frobenius and
  spectral norm (Eckart-Young), with the singular values split evenly between
  the factors. Other leaves (biases, scalars, conv kernels) stay dense, as
  `lora_svd` and `lora_lego` merge dense leaves directly. The SVD runs in
  float32; factors come back in the leaf's dtype.

  Args:
    delta: a pytree of dense arrays.
    rank: static rank of every factor pair; None means each matrix's full rank
      ``min(in, out)`` (then ``a @ b`` reproduces the leaf up to rounding).

  Returns:
    The pytree with `LoRA` nodes in place of the 2-D leaves.

  Raises:
    ValueError: naming the leaf, when ``rank`` is below 1 or above
      ``min(in, out)`` of a matrix leaf.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tau = {'w': jnp.outer(jnp.arange(1., 4.), jnp.ones(2)), 'b': jnp.ones(2)}
    >>> ad = mj.lora_from_delta(tau, rank=1)
    >>> ad['w'].a.shape, ad['w'].b.shape, ad['b'].shape
    ((3, 1), (1, 2), (2,))
    >>> bool(jnp.allclose(mj.lora_delta(ad)['w'], tau['w'], atol=1e-5))
    True
  """
  if rank is not None and (int(rank) != rank or rank < 1):
    raise ValueError(f'lora_from_delta: rank must be a positive int or None, '
                     f'got {rank!r}.')

  def one(path, x):
    x = jnp.asarray(x)
    if x.ndim != 2:
      return x
    n_in, n_out = x.shape
    full = min(n_in, n_out)
    rk = full if rank is None else int(rank)
    if rk > full:
      raise ValueError(
          f'lora_from_delta: rank {rk} is impossible for leaf '
          f'{paths.path_str(path)!r} of shape {tuple(x.shape)}: at most '
          f'{full}. Lower the rank or pass rank=None (each leaf\'s full rank).')
    u, s, vh = subspace.svd(x)
    sq = jnp.sqrt(s[:rk])
    return LoRA((u[:, :rk] * sq[None]).astype(x.dtype),
                (sq[:, None] * vh[:rk]).astype(x.dtype))

  return jax.tree_util.tree_map_with_path(one, delta)


def check_lora(adapters: Sequence[Any]) -> None:
  """Checks LoRA pairs: ``a (..., in, r)`` / ``b (..., r, out)``, same ranks.

  Raises:
    ValueError: naming the leaf, for mismatched ranks inside a pair or across
      adapters, or for adapters with different trees.
  """
  ref = None
  for idx, ad in enumerate(adapters):
    nodes = {paths.path_str(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(ad, is_leaf=_is_lora)[0]}
    for p, x in nodes.items():
      if not _is_lora(x):
        continue
      if x.a.ndim < 2 or x.b.ndim < 2 or x.a.shape[-1] != x.b.shape[-2]:
        raise ValueError(
            f'adapters[{idx}] LoRA leaf {p!r}: a has shape {tuple(x.a.shape)} '
            f'and b {tuple(x.b.shape)}, but a must be (in, r) and b (r, out) '
            'with the same r. From PEFT use a = lora_A.T, b = lora_B.T.')
    if ref is None:
      ref = nodes
      continue
    if set(nodes) != set(ref):
      raise ValueError(
          f'adapters[{idx}] has leaves {sorted(set(nodes) ^ set(ref))[:5]} '
          'that adapters[0] lacks or vice versa: adapt the same modules.')
    for p, x in nodes.items():
      r0 = ref[p]
      if _is_lora(x) != _is_lora(r0):
        raise ValueError(f'adapters[{idx}] leaf {p!r} is LoRA in one adapter '
                         'and dense in another.')
      if _is_lora(x) and (x.a.shape != r0.a.shape or x.b.shape != r0.b.shape):
        raise ValueError(
            f'adapters[{idx}] LoRA leaf {p!r} has rank {x.a.shape[-1]} '
            f'(a {tuple(x.a.shape)}, b {tuple(x.b.shape)}) but adapters[0] has '
            f'rank {r0.a.shape[-1]} (a {tuple(r0.a.shape)}, b '
            f'{tuple(r0.b.shape)}). Stacking needs equal ranks: zero-pad the '
            'smaller adapter to the larger rank (a with zero columns, b with '
            'zero rows), which leaves its delta unchanged.')


@functools.partial(jax.jit, static_argnames=('update',))
def _run(update, adapters, state, key):
  stacked = jax.tree.map(lambda *xs: jnp.stack([x.astype(jnp.float32)
                                                for x in xs]), *adapters)
  return update(stacked, state, None, key=key)


def merge_lora(tx: base.MergeTransformation, adapters: Sequence[Any],
               key: jax.Array | None = None, *, return_state: bool = False):
  """Merges LoRA adapters with ``tx`` (`lora_svd` / `lora_lego`), under jit.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> ad = [{'w': mj.LoRA(jnp.ones((3, 1)), jnp.ones((1, 2)))}] * 2
    >>> out = mj.merge_lora(mj.methods.lora_svd(), ad)
    >>> mj.lora_delta(out)['w'].round(4)
    Array([[2., 2.],
           [2., 2.],
           [2., 2.]], dtype=float32)
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError('merge_lora: no adapters given.')
  check_lora(adapters)
  state = tx.init(adapters[0])
  out, state = _run(tx.update, adapters, state, key)
  return (out, state) if return_state else out


class LoRAMergeState(NamedTuple):
  weights: jax.Array


def _map_lora(updates, fn_lora, fn_dense):
  return jax.tree.map(lambda x: fn_lora(x) if _is_lora(x) else fn_dense(x),
                      updates, is_leaf=_is_lora)


def lora_svd(weights: Any = None, *, rank: int | None = None
             ) -> base.MergeTransformation:
  """Rank-``rank`` SVD merge of ``sum_i w_i a_i b_i`` from the factors alone.

  With ``A = [w_1 a_1 | ... | w_K a_K]`` and ``B = [b_1; ...; b_K]``,
  ``A = Q_a R_a``, ``B^T = Q_b R_b``, ``R_a R_b^T = U S V^T`` (a ``Kr x Kr``
  SVD); the result is ``a = Q_a U_k S_k^(1/2)``, ``b = S_k^(1/2) V_k^T Q_b^T``,
  the best rank-k approximation of the summed delta (Eckart-Young). With
  ``rank >= K r`` it is exact. Dense leaves get ``sum_i w_i x_i``.

  Args:
    weights: per-adapter weights (traced); None means 1 (a plain sum).
    rank: static output rank (None: the input rank, so the result has the
      adapters' shapes). Must not exceed ``min(in, out, K r)``.
  """
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  return base.MergeTransformation(lambda params: LoRAMergeState(w),
                                  base.static_fn.of(_lora_svd_update, rank=rank))


def _lora_svd_update(updates, state, params=None, *, key=None, rank):
  del params, key
  leaves = jax.tree.leaves(updates)
  k = leaves[0].shape[0]
  w = checks.per_model(state.weights, k, 'weights')
  flat = {paths.path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_lora)[0]}

  def one(path, x):
    a, b = x.a, x.b  # [K, in, r], [K, r, out]
    _, n_in, r = a.shape
    n_out = b.shape[-1]
    rk = r if rank is None else rank
    if rk > min(n_in, n_out, k * r) or rk < 1:
      raise ValueError(
          f'lora_svd: rank {rk} is impossible for LoRA leaf {path!r} (in='
          f'{n_in}, out={n_out}, {k} adapters of rank {r}: at most '
          f'{min(n_in, n_out, k * r)}).')
    a_cat = jnp.transpose(a * w[:, None, None], (1, 0, 2)).reshape(n_in, k * r)
    b_cat = b.reshape(k * r, n_out)
    qa, ra = subspace.qr(a_cat)
    qb, rb = subspace.qr(b_cat.T)
    u, s, vh = subspace.svd(ra @ rb.T)
    sq = jnp.sqrt(s[:rk])
    return LoRA(qa @ (u[:, :rk] * sq[None]), (sq[:, None] * vh[:rk]) @ qb.T)

  out = {p: (one(p, x) if _is_lora(x)
             else jnp.tensordot(w, x, axes=1)) for p, x in flat.items()}
  treedef = jax.tree.structure(updates, is_leaf=_is_lora)
  return jax.tree.unflatten(treedef, [out[p] for p in flat]), state


class LoRALegoState(NamedTuple):
  scale: jax.Array
  assignments: Any = None  # per LoRA leaf [K * r] cluster ids


def lora_lego(rank: int | None = None, *, iters: int = 25,
              scale: float | jax.Array = 1.0,
              reweight: bool = True) -> base.MergeTransformation:
  """LoRA-LEGO: rank-wise clustering of LoRA units (Zhao et al. 2025).

  Every adapter's rank-one unit ``j`` is a "minimal semantic unit"
  ``(a[:, j], b[j, :])``. All ``K r`` units of a leaf are clustered with
  k-means (deterministic farthest-point initialisation, ``iters`` Lloyd
  steps) on the concatenated vectors; each unit's sign is fixed first so that
  ``(a, b)`` and ``(-a, -b)``, which give the same update, fall together.
  Cluster ``c``'s merged unit is the mean of its members; with ``reweight``
  its norm is restored to the members' mean norm (our reading of the paper's
  parameter reweighting; uncertain). The merged adapter has ``rank`` units,
  scaled by ``scale`` (traced). Dense leaves are averaged.

  Args:
    rank: number of clusters = output rank (static; None: the input rank).
    iters: Lloyd iterations (static).
    scale: output scale of the merged delta (traced).
    reweight: restore each centroid's norm.
  """
  s = checks.hparam(scale, 'scale')
  return base.MergeTransformation(
      lambda params: LoRALegoState(s),
      base.static_fn.of(_lego_update, rank=rank, iters=int(iters),
                        reweight=bool(reweight)))


def _kmeans(x, n_clusters, iters):
  """Deterministic k-means on rows of ``x [N, d]``; returns (centroids, ids)."""
  sq = jnp.sum(x * x, axis=1)
  first = jnp.argmax(sq)
  cent = jnp.zeros((n_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
  dmin = jnp.sum(jnp.square(x - x[first][None]), axis=1)

  def pick(c, carry):
    cent, dmin = carry
    i = jnp.argmax(dmin)
    cent = cent.at[c].set(x[i])
    dmin = jnp.minimum(dmin, jnp.sum(jnp.square(x - x[i][None]), axis=1))
    return cent, dmin

  cent, _ = jax.lax.fori_loop(1, n_clusters, pick, (cent, dmin))

  def assign(cent):
    d = sq[:, None] - 2 * x @ cent.T + jnp.sum(cent * cent, axis=1)[None]
    return jnp.argmin(d, axis=1)

  def lloyd(_, cent):
    ids = assign(cent)
    onehot = jax.nn.one_hot(ids, n_clusters, dtype=x.dtype)  # [N, C]
    cnt = jnp.sum(onehot, axis=0)
    new = (onehot.T @ x) / jnp.maximum(cnt, 1.0)[:, None]
    return jnp.where(cnt[:, None] > 0, new, cent)

  cent = jax.lax.fori_loop(0, iters, lloyd, cent)
  return cent, assign(cent)


def _lego_update(updates, state, params=None, *, key=None, rank, iters,
                 reweight):
  del params, key
  flat = {paths.path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_lora)[0]}
  assignments = {}

  def one(path, x):
    a, b = x.a, x.b
    k, n_in, r = a.shape
    n_out = b.shape[-1]
    rk = r if rank is None else rank
    if rk < 1 or rk > k * r:
      raise ValueError(f'lora_lego: rank {rk} is impossible for LoRA leaf '
                       f'{path!r}: there are {k * r} units ({k} adapters of '
                       f'rank {r}).')
    ua = jnp.transpose(a, (0, 2, 1)).reshape(k * r, n_in)
    ub = b.reshape(k * r, n_out)
    # Canonical sign: the largest-magnitude entry of a is positive.
    piv = jnp.take_along_axis(ua, jnp.argmax(jnp.abs(ua), axis=1)[:, None],
                              axis=1)
    sgn = jnp.where(piv < 0, -1.0, 1.0)
    units = jnp.concatenate([ua * sgn, ub * sgn], axis=1)
    cent, ids = _kmeans(units, rk, iters)
    if reweight:
      onehot = jax.nn.one_hot(ids, rk, dtype=units.dtype)
      norms = jnp.linalg.norm(units, axis=1)
      mean_norm = (onehot.T @ norms) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
      cn = jnp.linalg.norm(cent, axis=1)
      cent = cent * (mean_norm / jnp.maximum(cn, 1e-30))[:, None]
    assignments[path] = ids
    sc = jnp.sqrt(jnp.abs(state.scale)) * jnp.sign(state.scale)
    return LoRA(cent[:, :n_in].T * sc, cent[:, n_in:] * jnp.sqrt(
        jnp.abs(state.scale)))

  out = {p: (one(p, x) if _is_lora(x) else jnp.mean(x, axis=0))
         for p, x in flat.items()}
  treedef = jax.tree.structure(updates, is_leaf=_is_lora)
  return (jax.tree.unflatten(treedef, [out[p] for p in flat]),
          LoRALegoState(state.scale, assignments))
