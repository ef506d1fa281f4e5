"""R-TSVM: TSV-M with outlier reweighting and spectrum-adaptive ranks.

The two steps are `mergejax.transforms.outlier_reweight` and
`mergejax.transforms.tsv_reduce`; their module docstring says how they read
the paper.
"""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.transforms import _rtsvm as rtsvm_lib
from mergejax.transforms import _reduce as reduce


# ----------------------------------------------------------------------------
# Outlier reweighting (a per-model step).


# ----------------------------------------------------------------------------
# TSV-M reduction with spectrum-adaptive ranks.


# ----------------------------------------------------------------------------
# The named method.


def rtsvm(alpha: float | jax.Array = 1.0, *,
          quantile: float | jax.Array = 0.99,
          energy: float | jax.Array = 0.95, exclude: Any = None,
          conv: str = 'none', other: str = 'mean') -> base.MergeTransformation:
  """R-TSVM: TSV-M with outlier reweighting and spectrum-adaptive ranks.

  ``tau_i = theta_i - theta_0`` -> `outlier_reweight` ``(quantile)`` (every
  leaf) -> `tsv_reduce` ``(energy)`` -> ``theta_0 + alpha tau``. The two
  steps are a design read from Yang et al. (2025)'s "outlier-aware parameter
  weighting" and "sparsity-adaptive rank selection" (only the abstract was
  available; see the module docstring). ``quantile=1, energy=1`` is exactly
  `tsv` (TSV-M). Every numeric knob is traced; the slot size ``int(r / K)``
  is static.

  Args:
    alpha: scale of the merged task vector (traced).
    quantile: per task and leaf, entries above this magnitude quantile are
      shrunk onto it (traced, ``[0, 1]``; 1 disables it).
    energy: fraction of each task matrix's squared Frobenius norm its kept
      singular triplets must reach (traced, ``(0, 1]``; 1 disables it).
    exclude: path mask of 2-D leaves not treated as matrices.
    conv: ``'none'`` or ``'reshape'``.
    other: rule for non-matrix leaves (``'mean'``, ``'sum'``, ``'zero'``).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.rtsvm(quantile=1.0, energy=1.0), base, fts)['w']
    Array([[3., 0.],
           [0., 1.]], dtype=float32)

  References:
    Yang et al., "Mix Data or Merge Models? Balancing the Helpfulness, Honesty,
      and Harmlessness of Large Language Model via Model Merging", 2025.
      https://arxiv.org/abs/2502.06876
  """
  return base.named_chain(
      ('tv', reduce.task_vectors()),
      ('reweight', rtsvm_lib.outlier_reweight(quantile)),
      ('tsv', rtsvm_lib.tsv_reduce(energy, exclude=exclude, conv=conv, other=other)),
      ('scale', reduce.scale(alpha)),
      ('add', reduce.apply_to_base()))
