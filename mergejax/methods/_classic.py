"""Linear averaging and task arithmetic."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _reduce as reduce

Weights = float | Sequence[float] | jax.Array | None


def linear(weight: Weights = None, *, normalize: bool = True
           ) -> base.MergeTransformation:
  """mergekit ``linear``: ``sum_i w_i theta_i`` (``/ sum_i w_i`` if normalize).

  The base model plays no part (merge with ``base=None``, or list the base
  among ``models`` to average it in, as mergekit does).

  Args:
    weight: one weight per model (or one for all); None means equal weights.
    normalize: divide by the weight sum (mergekit default True).

  Raises:
    ValueError: if ``normalize`` and the (concrete) weights sum to zero, where
      mergekit would silently return inf/NaN.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([0.])}, {'w': jnp.array([4.])}]
    >>> mj.merge(mj.methods.linear(weight=[1., 3.]), None, fts)['w']
    Array([3.], dtype=float32)

  References:
    mergekit (``linear``). https://github.com/arcee-ai/mergekit
  """
  if normalize and weight is not None:
    w = checks.hparam(weight, 'weight')
    if checks.is_concrete(w) and abs(float(np.sum(np.asarray(w)))) < 1e-8:
      raise ValueError(f'linear: weights {np.asarray(w).tolist()} sum to zero; '
                       'normalize=True would divide by zero.')
  return reduce.weighted_sum(weight, normalize=normalize)


def passthrough(scale: float | jax.Array | None = None
                ) -> base.MergeTransformation:
  """mergekit ``passthrough``: the one model's tensor, times ``scale`` if given.

  What layer stacking ("frankenmerges") and model copies are made of: each
  output tensor comes from exactly one input. The base model plays no part.

  Args:
    scale: a factor (or a one-element list, as the command line passes
      per-model parameters); None leaves the tensor as it is.

  Raises:
    ValueError: at merge time, when more than one model is given.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.merge(mj.methods.passthrough(0.5), None, [{'w': jnp.array([4.])}])['w']
    Array([2.], dtype=float32)

  References:
    mergekit (``passthrough``). https://github.com/arcee-ai/mergekit
  """
  return base.chain(base.MergeTransformation(
      base.init_empty_state, base.static_fn.of(_exactly_one)),
                    reduce.weighted_sum(1.0 if scale is None else scale))


def _exactly_one(updates, state, params=None, *, key=None):
  del params, key
  k = jax.tree.leaves(updates)[0].shape[0]
  if k != 1:
    raise ValueError(f'passthrough takes exactly one model per tensor, got {k}; '
                     'give one source per slice (layer stacking) or use a '
                     'merge method that combines models.')
  return updates, state


def average() -> base.MergeTransformation:
  """Uniform average of the models (FusionBench ``simple_average``)."""
  return reduce.mean()


def task_arithmetic(weight: Weights = None, *, lambda_: float | jax.Array = 1.0,
                    normalize: bool = False) -> base.MergeTransformation:
  """Task arithmetic: ``theta_0 + lambda * sum_i w_i tau_i`` (mergekit semantics).

  With ``normalize`` the sum is divided by ``sum_i w_i``. FusionBench's
  ``task_arithmetic`` is ``weight=None, lambda_=0.3``.

  Args:
    weight: per-model weights (mergekit requires them; None means 1).
    lambda_: scaling of the merged task vector (mergekit ``lambda``, 1.0).
    normalize: divide by the weight sum (mergekit default False).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.ones(1)}
    >>> fts = [{'w': jnp.array([2.])}, {'w': jnp.array([4.])}]
    >>> mj.merge(mj.methods.task_arithmetic(lambda_=0.5), base, fts)['w']
    Array([3.], dtype=float32)

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
      https://arxiv.org/abs/2212.04089
  """
  return base.chain(reduce.task_vectors(),
                    reduce.weighted_sum(weight, normalize=normalize),
                    reduce.scale(lambda_), reduce.apply_to_base())
