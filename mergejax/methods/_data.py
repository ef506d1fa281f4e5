"""Data-informed merges: Fisher merging and RegMean.

Each takes statistics computed once on a little data (`mergejax.stats`) and is
then an ordinary transformation over them.
"""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.transforms import _fisher as fisher_lib
from mergejax.transforms import _regmean as regmean_lib


def fisher_merging(fishers: Any, *, epsilon: float | jax.Array = 1e-6,
                   normalize: bool = True) -> base.MergeTransformation:
  """Fisher merging: the Fisher-weighted average of the models' weights.

  ``theta = sum_i c_i F_i theta_i / sum_i c_i F_i`` per entry with each
  model's diagonal Fisher ``F_i`` (`mergejax.stats.fisher_diagonal`), floored
  at ``epsilon`` and, with ``normalize``, scaled by the inverse of its global
  norm (FusionBench's defaults). See `mergejax.transforms.fisher_weighted_sum`.
  Pass the base as ``base`` or None: the base is not used.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([0., 4.])}, {'w': jnp.array([2., 0.])}]
    >>> equal = [{'w': jnp.ones(2)}] * 2  # equal Fishers: the plain average
    >>> mj.merge(mj.methods.fisher_merging(equal), None, fts)['w']
    Array([1., 2.], dtype=float32)

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging",
      NeurIPS 2022. https://arxiv.org/abs/2111.09832
  """
  return fisher_lib.fisher_weighted_sum(fishers, epsilon=epsilon,
                                        normalize=normalize)


def regmean(grams: Any, *, alpha: float | jax.Array = 0.95,
            ridge: float | jax.Array = 0.0) -> base.MergeTransformation:
  """RegMean: per linear layer, the weights that best reproduce every model.

  For each kernel with input Grams ``G_i`` (`mergejax.stats.input_grams`):
  ``W = (sum_i G~_i)^-1 sum_i G~_i W_i`` with off-diagonal entries of each
  ``G_i`` shrunk by ``alpha``; every other leaf is the plain mean of the
  models (FusionBench's rule, biases included). See
  `mergejax.transforms.regmean_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'k': jnp.array([[2.]]), 'b': jnp.array([1.])},
    ...        {'k': jnp.array([[4.]]), 'b': jnp.array([3.])}]
    >>> grams = [{'k': jnp.array([[3.]])}, {'k': jnp.array([[1.]])}]
    >>> out = mj.merge(mj.methods.regmean(grams), None, fts)
    >>> out['k'], out['b']
    (Array([[2.5]], dtype=float32), Array([2.], dtype=float32))

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
      Models", ICLR 2023. https://arxiv.org/abs/2212.09849
  """
  return regmean_lib.regmean_reduce(grams, alpha=alpha, ridge=ridge)
