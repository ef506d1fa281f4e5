"""KnOTS.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import paths
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _subspace as subspace
from mergejax.transforms import _matrix as matrix
from mergejax.methods import _common as common


class KnotsState(NamedTuple):
  inner: Any


def knots(inner: base.MergeTransformation | None = None, *,
          lambda_: float | jax.Array = 1.0, eps: float = 1e-4,
          layout: str = 'auto', exclude: Any = None, conv: str = 'none',
          other: str = 'mean') -> base.MergeTransformation:
  """KnOTS (Stoica et al. 2025): merge task updates in a shared SVD basis.

  Per matrix, in PyTorch orientation: ``[tau_1 | ... | tau_K] = U S V^T``
  (concatenated along the input axis, FusionBench ``subspace_alignment``),
  components with ``S <= eps`` dropped (zeroed), ``V^T`` split into per-task
  blocks ``V_i^T`` so that ``tau_i = U S V_i^T``. ``inner`` merges the stacked
  blocks ``[K, r, in]`` (e.g. a TIES reducer), and ``tau = U S V_merged^T``.
  ``theta = theta_0 + lambda tau``. SVDs run in float32 (FusionBench: float64).

  Args:
    inner: a base-free reducer of stacked blocks (``[K, ...] -> [...]``), e.g.
      ``mj.transforms.weighted_sum()`` (default; KnOTS-TA equals task arithmetic) or a
      TIES chain without ``task_vectors``/``apply_to_base``.
    lambda_: scale (traced).
    eps: singular-value cut-off (static).
    layout: ``'auto'`` (default: each leaf's orientation from its name,
      ``…weight`` ``(out, in)`` as in PyTorch / Hugging Face checkpoints,
      else ``(in, out)`` as Flax kernels), ``'in_out'`` or ``'out_in'``.
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'``.
    other: rule for non-matrix leaves (applied to task vectors).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.eye(2)}, {'w': jnp.ones((2, 2))}]
    >>> mj.merge(mj.methods.knots(), base, fts)['w'].round(4)
    Array([[2., 1.],
           [1., 2.]], dtype=float32)

  References:
    Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025.
      https://arxiv.org/abs/2410.19735
  """
  inner = reduce.weighted_sum() if inner is None else inner
  subspace.check_layout(layout)
  step = base.MergeTransformation(
      lambda params: KnotsState(inner.init(None)),
      base.static_fn.of(_knots_update, inner=inner.update, eps=float(eps),
                        layout=layout, exclude=matrix.static_mask(exclude),
                        conv=conv, other=matrix.check_other(other)))
  return common.finish(step, lambda_)


def _knots_update(updates, state, params=None, *, key=None, inner, eps, layout,
                  exclude, conv, other):
  del params
  flat = paths.flatten_to_dict(updates)
  mats = subspace.matrix_paths(flat, exclude=exclude, conv=conv, what='knots')
  blocks, factors = {}, {}
  for p in mats:
    w = subspace.to_out_in(subspace.to_matrix(flat[p], conv),
                           subspace.leaf_layout(p, layout))
    k, m, n = w.shape
    cat = jnp.transpose(w, (1, 0, 2)).reshape(m, k * n)  # [tau_1 | ... | tau_K]
    u, s, vh = subspace.svd(cat)
    s = jnp.where(s > eps, s, 0.0)
    factors[p] = (u, s)
    blocks[p] = jnp.transpose(vh.reshape(-1, k, n), (1, 0, 2))  # [K, r, in]
  if blocks:
    merged, inner_state = inner(blocks, state.inner, None, key=key)
  else:  # no matrix leaf: nothing for the inner merge (only `other` leaves)
    merged, inner_state = {}, state.inner
  out = {}
  for p, x in flat.items():
    if p in factors:
      u, s = factors[p]
      y = subspace.from_out_in((u * s[None]) @ merged[p],
                               subspace.leaf_layout(p, layout))
      out[p] = y.reshape(x.shape[1:])
    else:
      out[p] = matrix.reduce_other(x, other)
  return paths.unflatten_like(updates, out), KnotsState(inner_state)
