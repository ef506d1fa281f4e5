"""Per-matrix reductions shared by the SVD-based merges.

Per-matrix methods (TSV-M, Iso-C, Iso-CTS, KnOTS, WIDEN) follow FusionBench's
rule for which leaves are matrices: every leaf whose per-model shape is 2-D,
minus ``exclude``; other leaves (biases, norms, conv kernels unless
``conv='reshape'``) are reduced by the explicit ``other`` rule, ``'mean'`` by
default as in FusionBench (``'sum'`` and ``'zero'`` — keep the base — are the
alternatives). Conv kernels are averaged by default (FusionBench parity);
``conv='reshape'`` merges them as ``(kh*kw*in, out)`` matrices.
"""

from __future__ import annotations

import jax.numpy as jnp
from mergejax._src import modelaxis
from mergejax._src import paths
from mergejax.transforms import _subspace as subspace


OTHER_RULES = ('mean', 'sum', 'zero')


def static_mask(mask):
  """Makes a path mask hashable for `static_fn` (lists become tuples)."""
  if mask is None or isinstance(mask, str) or callable(mask):
    return mask
  return tuple(mask)


def check_other(other):
  if other not in OTHER_RULES:
    raise ValueError(f'other must be one of {OTHER_RULES}, got {other!r}.')
  return other


def reduce_other(x, other):
  if other == 'mean':
    return modelaxis.model_mean(x)
  if other == 'sum':
    return modelaxis.model_sum(x)
  return jnp.zeros(x.shape[1:], x.dtype)


def per_matrix(updates, *, fn, exclude, conv, other, what):
  """Reduces the model axis: ``fn(path, [K, m, n]) -> [m, n]`` on matrices."""
  flat = paths.flatten_to_dict(updates)
  mats = set(subspace.matrix_paths(flat, exclude=exclude, conv=conv, what=what))
  out = {}
  for p, x in flat.items():
    if p in mats:
      out[p] = fn(p, subspace.to_matrix(x, conv)).reshape(x.shape[1:])
    else:
      out[p] = reduce_other(x, other)
  return paths.unflatten_like(updates, out)
