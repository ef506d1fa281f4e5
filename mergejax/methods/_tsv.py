"""TSV-M.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _subspace as subspace
from mergejax.transforms import _matrix as matrix
from mergejax.methods import _common as common


class TSVState(NamedTuple):
  weights: jax.Array  # per-task scale applied before the SVDs


def tsv(alpha: float | jax.Array = 1.0, *, weights: Any = None,
        exclude: Any = None, conv: str = 'none',
        other: str = 'mean') -> base.MergeTransformation:
  """TSV-M, task singular vectors merge (Gargiulo et al. 2025; FusionBench TSVM).

  Per matrix: each task's top ``k = int(r / K)`` singular triplets are
  concatenated, the concatenated ``U`` and ``V^T`` are replaced by their
  orthogonal polar factors, and ``tau = U_perp diag(S_cat) V_perp^T``;
  ``theta = theta_0 + alpha tau``. Transpose-equivariant (layout-free).

  Args:
    alpha: global scale of the merged task vector (traced).
    weights: optional per-task scales applied to each ``tau_i`` before the SVD
      (FusionBench's list-valued ``alpha``); traced.
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` (conv kernels go to ``other``) or ``'reshape'``.
    other: rule for non-matrix leaves: ``'mean'`` (FusionBench), ``'sum'``,
      ``'zero'``.

  Raises:
    ValueError: naming the leaf, if a matrix has fewer singular values than
      tasks (``int(r / K) = 0``); exclude it.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.tsv(), base, fts)['w']
    Array([[3., 0.],
           [0., 1.]], dtype=float32)

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
      Model Merging", CVPR 2025.
      https://arxiv.org/abs/2412.00081
  """
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  step = base.MergeTransformation(
      lambda params: TSVState(w),
      base.static_fn.of(_tsv_update, exclude=matrix.static_mask(exclude), conv=conv,
                        other=matrix.check_other(other)))
  return common.finish(step, alpha)


def tsv_matrix(x: jax.Array, path: str = '<matrix>') -> jax.Array:
  """TSV-M of stacked matrices ``[K, m, n] -> [m, n]`` (FusionBench's rule)."""
  k_models, m, n = x.shape
  r = min(m, n)
  k = int(r * (1 / k_models))  # FusionBench: int(s.shape[0] * sv_reduction)
  if k == 0:
    raise ValueError(
        f'tsv: leaf {path!r} is a {m}x{n} matrix with {r} singular values, '
        f'fewer than the {k_models} tasks, so no task keeps a singular vector. '
        'Add it to `exclude` (it is then merged by `other`).')
  u, s, vh = subspace.truncated_svd(x, k)
  u_cat = jnp.transpose(u, (1, 0, 2)).reshape(m, k_models * k)
  s_cat = s.reshape(k_models * k)
  vh_cat = vh.reshape(k_models * k, n)
  return (subspace.polar(u_cat) * s_cat[None, :]) @ subspace.polar(vh_cat)


def _tsv_update(updates, state, params=None, *, key=None, exclude, conv, other):
  del params, key
  k = jax.tree.leaves(updates)[0].shape[0]
  w = checks.per_model(state.weights, k, 'weights')
  updates = jax.tree.map(
      lambda x: x * w.reshape((-1,) + (1,) * (x.ndim - 1)), updates)
  out = matrix.per_matrix(updates, fn=lambda p, x: tsv_matrix(x, p), exclude=exclude,
                    conv=conv, other=other, what='tsv')
  return out, state
