"""Task vectors, weighted reductions over the model axis, scaling, and the base."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis

# mergekit replaces a near-zero weight sum by 1 when normalizing task vectors.
WEIGHT_SUM_EPS = 1e-8


def task_vectors() -> base.MergeTransformation:
  """Subtracts the base model from every stacked model: ``tau_i = theta_i - theta_0``.

  ``[K, ...] -> [K, ...]``; needs the base as ``params``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.task_vectors()
    >>> tx.update({'w': jnp.array([[3.], [5.]])}, tx.init(None), {'w': jnp.ones(1)})[0]
    {'w': Array([[2.],
           [4.]], dtype=float32)}
  """
  return base.stateless(_task_vectors)


def _task_vectors(updates, params, *, key):
  del key
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  return jax.tree.map(
      lambda u, p: modelaxis.model_map(lambda x: x - p.astype(x.dtype), u),
      updates, params)


class WeightedSumState(NamedTuple):
  weights: jax.Array  # () or [K]


def weighted_sum(weights: float | Sequence[float] | jax.Array | None = None,
                 *, normalize: bool = False) -> base.MergeTransformation:
  """Reduces the model axis: ``sum_i w_i u_i`` (divided by ``sum_i w_i`` if normalize).

  ``[K, ...] -> [...]`` (the reducing step). With ``normalize`` a weight sum
  with ``|sum w| < 1e-8`` is replaced by 1, as mergekit's task-vector methods
  do (mergekit ``linear`` instead divides by zero; ``mergejax.methods.linear``
  raises for it).

  Args:
    weights: one weight for all models, or one per model; None means 1.
    normalize: divide by the weight sum (a weighted mean).

  Returns:
    A `MergeTransformation` whose state holds the weights as an array.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.weighted_sum([1., 3.], normalize=True)
    >>> tx.update({'w': jnp.array([[0.], [4.]])}, tx.init(None))[0]
    {'w': Array([3.], dtype=float32)}
  """
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  return base.MergeTransformation(
      lambda params: WeightedSumState(w),
      base.static_fn.of(_weighted_sum_update, normalize=normalize))


def _weighted_sum_update(updates, state, params=None, *, key=None, normalize):
  del params, key
  leaves = jax.tree.leaves(updates)
  k = leaves[0].shape[0]
  w = checks.per_model(state.weights, k, 'weights')
  denom = jnp.sum(w)
  denom = jnp.where(jnp.abs(denom) < WEIGHT_SUM_EPS, 1.0, denom)

  def reduce(u):
    s = modelaxis.model_sum(u, w)
    return s / denom.astype(u.dtype) if normalize else s

  return jax.tree.map(reduce, updates), state


def mean() -> base.MergeTransformation:
  """Reduces the model axis by an unweighted mean (``[K, ...] -> [...]``)."""
  return weighted_sum(normalize=True)


class ScaleState(NamedTuple):
  factor: jax.Array


def scale(factor: float | jax.Array = 1.0) -> base.MergeTransformation:
  """Multiplies every update by ``factor`` (e.g. task arithmetic's lambda).

  Works before or after the reduction. ``factor`` is a traced array, so a sweep
  over it vmaps without recompiling.
  """
  f = checks.hparam(factor, 'scale factor')
  return base.MergeTransformation(lambda params: ScaleState(f),
                                  base.static_fn.of(_scale_update))


def _scale_update(updates, state, params=None, *, key=None):
  del params, key
  return jax.tree.map(lambda u: u * state.factor.astype(u.dtype), updates), state


def apply_to_base() -> base.MergeTransformation:
  """Adds the (reduced) updates to the base and casts back to its dtypes.

  ``[...] -> [...]``; the arithmetic is float32.
  """
  return base.stateless(_apply_to_base)


def _apply_to_base(updates, params, *, key):
  del key
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  return jax.tree.map(
      lambda u, p: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype),
      updates, params)
