"""Iso-C and Iso-CTS.
"""

from __future__ import annotations

from typing import Any
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax.transforms import _subspace as subspace
from mergejax.transforms import _matrix as matrix
from mergejax.methods import _common as common


def iso_c(alpha: float | jax.Array = 1.0, *, exclude: Any = None,
          conv: str = 'none', other: str = 'mean') -> base.MergeTransformation:
  """Iso-C (Marczak et al. 2025): flatten the spectrum of the summed task matrix.

  Per matrix ``M = sum_i tau_i = U S V^T``; ``tau = U (mean(S) I) V^T``;
  ``theta = theta_0 + alpha tau``. FusionBench default ``alpha`` 1.0 (its docs
  use 1.5). Transpose-equivariant.

  Args:
    alpha: scale (traced).
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'``.
    other: rule for non-matrix leaves (``'mean'`` as FusionBench).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.iso_c(), base, fts)['w']
    Array([[2., 0.],
           [0., 2.]], dtype=float32)

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
      and Task-Specific Subspaces", ICML 2025.
      https://arxiv.org/abs/2502.04959
  """
  step = base.stateless(_iso_c, exclude=matrix.static_mask(exclude), conv=conv,
                        other=matrix.check_other(other))
  return common.finish(step, alpha)


def iso_c_matrix(x: jax.Array) -> jax.Array:
  """Iso-C of stacked matrices ``[K, m, n] -> [m, n]``."""
  u, s, vh = subspace.svd(jnp.sum(x, axis=0))
  return (u * jnp.mean(s)) @ vh


def _iso_c(updates, params, *, key, exclude, conv, other):
  del params, key
  return matrix.per_matrix(updates, fn=lambda p, x: iso_c_matrix(x), exclude=exclude,
                     conv=conv, other=other, what='iso_c')


def iso_cts(alpha: float | jax.Array = 1.0, *,
            common_space_fraction: float = 0.8, layout: str = 'auto',
            exclude: Any = None, conv: str = 'none',
            other: str = 'mean') -> base.MergeTransformation:
  """Iso-CTS: common and task-specific subspaces with a flat spectrum.

  Per matrix (FusionBench ``iso_cts``, in PyTorch ``(out, in)`` orientation):
  the top ``k_c`` output-side singular vectors of ``sum_i tau_i`` form the
  common space; each task's residual ``tau_i - U_c U_c^T tau_i`` contributes
  its top ``d = (r - k_c) / K`` triplets; the concatenated bases are
  polar-orthogonalised and every singular value is set to the mean.
  ``k_c = r - round((r - int(r f)) / K) K`` (round half to even, as Python).

  Not transpose-equivariant: ``layout`` says which axis of a leaf is the
  output. Flax kernels are ``(in, out)`` (``'in_out'``); PyTorch weights
  ``(out, in)`` (``'out_in'``); ``'auto'`` (default) tells them apart by
  the leaf's name.

  Args:
    alpha: scale (traced).
    common_space_fraction: ``f``, static (it sets ranks); FusionBench 0.8.
    layout: ``'auto'`` (default: each leaf's orientation from its name,
      ``…weight`` ``(out, in)`` as in PyTorch / Hugging Face checkpoints,
      else ``(in, out)`` as Flax kernels), ``'in_out'`` or ``'out_in'``.
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'`` (reshaped kernels are ``in_out``).
    other: rule for non-matrix leaves.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.iso_cts(), base, fts)['w']
    Array([[2., 0.],
           [0., 2.]], dtype=float32)

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
      and Task-Specific Subspaces", ICML 2025.
      https://arxiv.org/abs/2502.04959
  """
  if not 0.0 < float(common_space_fraction) <= 1.0:
    raise ValueError('common_space_fraction must lie in (0, 1], got '
                     f'{common_space_fraction}.')
  subspace.check_layout(layout)
  step = base.stateless(_iso_cts, fraction=float(common_space_fraction),
                        layout=layout, exclude=matrix.static_mask(exclude), conv=conv,
                        other=matrix.check_other(other))
  return common.finish(step, alpha)


def iso_cts_matrix(w: jax.Array, fraction: float,
                   path: str = '<matrix>') -> jax.Array:
  """Iso-CTS of stacked PyTorch-oriented matrices ``[K, out, in] -> [out, in]``."""
  k_models, m, n = w.shape
  r = min(m, n)
  k_c = int(r * fraction)
  k_c = r - round((r - k_c) / k_models) * k_models
  if k_c < 1:
    raise ValueError(
        f'iso_cts: leaf {path!r} ({m}x{n}, rank {r}) leaves no common space '
        f'for {k_models} tasks with common_space_fraction={fraction}. Raise '
        'the fraction or exclude the leaf.')
  d = int((r - k_c) / k_models)
  u, s, vh = subspace.svd(jnp.sum(w, axis=0))
  u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
  us, ss, vhs = [], [], []
  if d > 0:
    w_ts = w - u_c[None] @ (u_c.T[None] @ w)
    ut, st, vht = subspace.truncated_svd(w_ts, d)
    us.append(jnp.transpose(ut, (1, 0, 2)).reshape(m, k_models * d))
    ss.append(st.reshape(-1))
    vhs.append(vht.reshape(k_models * d, n))
  u_cat = jnp.concatenate(us + [u_c], axis=1)
  s_cat = jnp.concatenate(ss + [s_c])
  vh_cat = jnp.concatenate(vhs + [vh_c], axis=0)
  return (subspace.polar(u_cat) * jnp.mean(s_cat)) @ subspace.polar(vh_cat)


def _iso_cts(updates, params, *, key, fraction, layout, exclude, conv, other):
  del params, key

  def fn(p, x):
    lay = subspace.leaf_layout(p, layout)
    y = iso_cts_matrix(subspace.to_out_in(x, lay), fraction, p)
    return subspace.from_out_in(y, lay)

  return matrix.per_matrix(updates, fn=fn, exclude=exclude, conv=conv, other=other,
                     what='iso_cts')
