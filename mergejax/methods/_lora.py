"""LoRA merges on factor pairs: LoRA-SVD and LoRA-LEGO.

Both return adapters (`mergejax.transforms.LoRA` pairs); run them with
`mergejax.transforms.merge_lora`.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _subspace as subspace
from mergejax.transforms import _lora as lora_lib


class LoRAMergeState(NamedTuple):
  weights: jax.Array


def _map_lora(updates, fn_lora, fn_dense):
  return jax.tree.map(lambda x: fn_lora(x) if lora_lib.is_lora(x) else fn_dense(x),
                      updates, is_leaf=lora_lib.is_lora)


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

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
      https://arxiv.org/abs/2106.09685
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
          jax.tree_util.tree_flatten_with_path(updates, is_leaf=lora_lib.is_lora)[0]}

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
    return lora_lib.LoRA(qa @ (u[:, :rk] * sq[None]), (sq[:, None] * vh[:rk]) @ qb.T)

  out = {p: (one(p, x) if lora_lib.is_lora(x)
             else jnp.tensordot(w, x, axes=1)) for p, x in flat.items()}
  treedef = jax.tree.structure(updates, is_leaf=lora_lib.is_lora)
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
  its norm is restored to the members' mean norm (a reading of the paper's
  parameter reweighting; uncertain). The merged adapter has ``rank`` units,
  scaled by ``scale`` (traced). Dense leaves are averaged.

  Args:
    rank: number of clusters = output rank (static; None: the input rank).
    iters: Lloyd iterations (static).
    scale: output scale of the merged delta (traced).
    reweight: restore each centroid's norm.

  References:
    Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of
      LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025.
      https://arxiv.org/abs/2409.16167
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
          jax.tree_util.tree_flatten_with_path(updates, is_leaf=lora_lib.is_lora)[0]}
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
    return lora_lib.LoRA(cent[:, :n_in].T * sc, cent[:, n_in:] * jnp.sqrt(
        jnp.abs(state.scale)))

  out = {p: (one(p, x) if lora_lib.is_lora(x) else jnp.mean(x, axis=0))
         for p, x in flat.items()}
  treedef = jax.tree.structure(updates, is_leaf=lora_lib.is_lora)
  return (jax.tree.unflatten(treedef, [out[p] for p in flat]),
          LoRALegoState(state.scale, assignments))
