"""Twin-Merging.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _select as select
from mergejax.transforms import _subspace as subspace
from mergejax.methods import _common as common


class TwinState(NamedTuple):
  """Shared model plus exclusive vectors ``v_t = compress(theta_t - theta*)``.

  ``twins`` holds, per leaf of ``shared_model``, either a `SVDBasis`
  ``(u [K, m, r], s [K, r], vh [K, r, n])`` — the factorised rank-r exclusive
  part of every task for matrix leaves with ``compress='svd'``
  (``v_t = (u_t * s_t) @ vh_t``, reshaped to the leaf's shape) — or a dense
  ``[K, ...]`` array (1-D leaves, and ``compress='magnitude'``).
  """
  shared: Any
  shared_model: Any = None  # theta*, float32
  twins: Any = None  # per leaf: SVDBasis or [K, ...]

  @property
  def num_tasks(self) -> int:
    return jax.tree.leaves(self.twins)[0].shape[0]

  def task_delta(self, base_params, i):
    return jax.tree.map(lambda s, v, b: s + twin_dense_leaf(v, s.shape, i) - b,
                        self.shared_model, self.twins,
                        jax.tree.map(lambda x: x.astype(jnp.float32),
                                     base_params))


def twin_dense_leaf(v: Any, shape: tuple[int, ...], i: int | jax.Array
                    ) -> jax.Array:
  """Task ``i``'s dense exclusive vector from one leaf of `TwinState.twins`."""
  if isinstance(v, subspace.SVDBasis):
    u, s, vh = (jnp.take(f, i, axis=0) for f in v)
    return ((u * s[None, :]) @ vh).reshape(shape)
  return jnp.take(v, i, axis=0)


def _mix_leaf(theta, v, w):
  """``theta + sum_t w_t v_t`` for one leaf, from factors when there are any."""
  if isinstance(v, subspace.SVDBasis):
    # U diag(w (x) s) V^T over the concatenated ranks: one [m, K r] @ [K r, n]
    # product, never K dense matrices.
    delta = jnp.einsum('kmr,kr,krn->mn', v.u, w[:, None] * v.s, v.vh)
    return theta + delta.reshape(theta.shape)
  return theta + jnp.tensordot(w, v, axes=1)


def twin(shared: base.MergeTransformation | None = None, *,
         density: float = 0.1, compress: str = 'svd') -> base.MergeTransformation:
  """Twin-Merging (Lu et al. 2024): shared merge plus compressed exclusive parts.

  ``theta* = shared(models)`` (default task arithmetic with lambda 0.29, as
  the reference config); ``v_t = compress(theta_t - theta*)`` where
  ``'svd'`` keeps the top ``max(1, int(density r))`` singular triplets of
  every matrix (rank >= 3 leaves are viewed as ``(prod(shape[:-1]),
  shape[-1])``) and *stores them factorised* (`SVDBasis`, ``r (m + n + 1)``
  numbers per task instead of ``m n``), and ``'magnitude'`` the top
  ``int(density n)`` entries per tensor (dense); 1-D leaves are kept in
  full, as in the reference. `merge` returns ``theta*``; the state
  (`TwinState`) holds the exclusive parts. At inference, mix them per input
  with router weights: `twin_mix` (``theta(x) = theta* + sum_t w_t(x)
  v_t``), `twin_apply` (any model, one mixed model per input) or
  `twin_dense` (a dense layer with the mix fused into the matmul); a router
  is trained with `twin_train_router`.

  Args:
    shared: a full merge method producing ``theta*``.
    density: fraction kept by ``compress`` (static: it sets ranks).
    compress: ``'svd'`` or ``'magnitude'``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((4, 4))}
    >>> fts = [{'w': jnp.eye(4)}, {'w': -jnp.eye(4)}]
    >>> _, st = mj.merge(mj.methods.twin(density=0.25), base, fts,
    ...                  return_state=True)
    >>> st.twins['w'].u.shape, st.twins['w'].vh.shape   # rank 1 per task
    ((2, 4, 1), (2, 1, 4))

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  if compress not in ('svd', 'magnitude'):
    raise ValueError(f"compress must be 'svd' or 'magnitude', got {compress!r}.")
  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f'density must lie in (0, 1], got {density}.')
  # Default shared merge: task arithmetic with the paper's lambda 0.29.
  shared = (common.finish(reduce.weighted_sum(), 0.29) if shared is None
            else shared)
  return base.MergeTransformation(
      lambda params: TwinState(shared.init(params)),
      base.static_fn.of(_twin_update, shared=shared.update,
                        density=float(density), compress=compress))


def _twin_update(updates, state, params=None, *, key=None, shared, density,
                 compress):
  theta, shared_state = shared(updates, state.shared, params, key=key)
  theta = jax.tree.map(lambda x: x.astype(jnp.float32), theta)
  diff = jax.tree.map(lambda x, s: x - s[None], updates, theta)

  def comp(v):
    if v.ndim <= 2:  # 1-D (or scalar) leaves: kept in full
      return v
    if compress == 'svd':
      mat = v.reshape(v.shape[0], -1, v.shape[-1])
      r = max(1, int(density * min(mat.shape[-2:])))
      return subspace.SVDBasis(*subspace.truncated_svd(mat, r))
    n = v[0].size
    k = int(density * n)
    return jax.vmap(lambda y: jnp.where(select.topk_mask(y, k), y, 0.0))(v)

  twins = jax.tree.map(comp, diff)
  return theta, TwinState(shared_state, theta, twins)


def twin_mix(state: Any, weights: jax.Array) -> Any:
  """Twin-Merging parameters for router weights: ``theta* + sum_t w_t v_t``.

  Factorised exclusive parts are mixed as ``U diag(w (x) s) V^T`` (one
  product over the concatenated ranks), so no per-task dense matrix is built.

  Args:
    state: the state from ``merge(twin(...), ..., return_state=True)``.
    weights: ``[K]`` (one input) or ``[B, K]`` (a batch: returns ``[B, ...]``
      leaves; for large batches use `twin_dense` / `twin_apply` instead).

  Returns:
    The mixed parameters (float32).

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  s = common.find_state(state)
  if not isinstance(s, TwinState):
    raise ValueError('twin_mix needs the state of a twin(...) merge.')
  weights = jnp.asarray(weights, jnp.float32)
  k = s.num_tasks
  if weights.ndim not in (1, 2) or weights.shape[-1] != k:
    raise ValueError(f'twin_mix: weights must have shape [{k}] or [B, {k}] '
                     f'(one weight per task), got {weights.shape}.')

  def one(w):
    return jax.tree.map(lambda th, v: _mix_leaf(th, v, w), s.shared_model,
                        s.twins)
  return one(weights) if weights.ndim == 1 else jax.vmap(one)(weights)


