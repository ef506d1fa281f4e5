"""DOGE-TA: task arithmetic with a data-free, subspace-projected correction."""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.transforms import _doge as doge_lib
from mergejax.transforms import _reduce as reduce


def doge_ta(lamda: float | jax.Array = 0.07, *,
            density: float | jax.Array = 0.3,
            learning_rate: float | jax.Array = 1e-4, steps: int = 400,
            subspace: int = 6, projection: str = 'gradient',
            layout: str = 'auto', include: Any = None, exclude: Any = None,
            other: str = 'zero') -> base.MergeTransformation:
  """DOGE-TA: masked task arithmetic plus a correction learnt without data.

  Per matrix, a shared correction ``delta`` of the task vectors is optimised
  by Adam so that each task's rows keep their inner products with the merged
  update, with every gradient projected off the tasks' shared output
  subspace; then ``theta = theta_0 + sum_i lam_i (tau_i + delta) * M_i`` with
  ``lam_i = lamda / ||tau_i||_F`` per matrix and ``M_i`` the global top-k mask
  of the raw ``tau_i`` (see `mergejax.transforms.doge_reduce` for the loss
  and the details). The defaults are FusionBench's (``lamda`` 0.07,
  ``K = 30`` i.e. ``density=0.3``, ``subspace`` 6, Adam at 1e-4 for 400
  steps per matrix); leaves that are not merged matrices keep the base
  (``other='zero'``, as FusionBench), ``other='mean'`` gives them task
  arithmetic with ``lambda = 1 / K`` instead. ``lamda``, ``density`` and
  ``learning_rate`` are traced, so a sweep over them vmaps in one compile.

  Args:
    lamda: each task's contribution norm before masking (traced).
    density: fraction of each task vector kept, in (0, 1] (traced).
    learning_rate: Adam's learning rate (traced).
    steps: Adam steps per matrix (static).
    subspace: the subspace holds ``min(out, in) // subspace`` directions
      (static).
    projection: ``'gradient'`` (FusionBench: project each gradient) or
      ``'update'`` (also project Adam's update, so ``delta`` stays exactly
      orthogonal to the shared subspace).
    layout: ``'auto'``, ``'in_out'`` (Flax) or ``'out_in'`` (PyTorch).
    include: path mask of the 2-D leaves to merge (None: all); FusionBench's
      CLIP filter is ``include=r'encoder.*weight$', exclude='layer_norm'``.
    exclude: path mask of 2-D leaves merged by ``other`` instead.
    other: ``'zero'`` (keep the base), ``'mean'`` or ``'sum'``.

  Returns:
    A `MergeTransformation` of full models.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([[3., 0.], [0., 4.]]), 'b': jnp.ones(2)},
    ...        {'w': jnp.array([[0., 1.], [2., 0.]]), 'b': jnp.ones(2)}]
    >>> out = mj.merge(mj.methods.doge_ta(steps=10), base, fts)
    >>> out['w'].shape, out['b']  # the bias keeps the base
    ((2, 2), Array([0., 0.], dtype=float32))

  References:
    Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective
      Gradient Descent", ICML 2025. https://arxiv.org/abs/2501.01230
  """
  return base.chain(
      reduce.task_vectors(),
      doge_lib.doge_reduce(lamda=lamda, density=density,
                           learning_rate=learning_rate, steps=steps,
                           subspace=subspace, projection=projection,
                           layout=layout, include=include, exclude=exclude,
                           other=other),
      reduce.apply_to_base())
