"""WUDI merging: data-free, optimised against each task vector's own inputs."""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.methods import _common as common
from mergejax.transforms import _wudi as wudi_lib


def wudi(lambda_: float | jax.Array = 1.0, *, steps: int = 400,
         learning_rate: float | jax.Array = 1e-5, solver: str = 'adam',
         layout: str = 'auto', exclude: Any = None,
         other: str = 'mean') -> base.MergeTransformation:
  """WUDI: the merged task vector that least disturbs each task's inputs.

  Task vectors stand in for the inputs each task saw (their rows span them),
  so no data is needed: per matrix, ``tau`` minimises
  ``sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2`` (see
  `mergejax.transforms.wudi_reduce`), other leaves are averaged, and
  ``theta = theta_0 + lambda_ tau``. The defaults are FusionBench's (Adam from
  the sum of task vectors, 400 steps at learning rate 1e-5, no ``lambda_``:
  1.0); ``solver='closed_form'`` returns the minimiser itself.

  Args:
    lambda_: scale of the merged task vector (traced; FusionBench: 1).
    steps: Adam steps (static).
    learning_rate: Adam's learning rate (traced).
    solver: ``'adam'`` or ``'closed_form'``.
    layout: ``'auto'``, ``'in_out'`` (Flax) or ``'out_in'`` (PyTorch).
    exclude: path mask of 2-D leaves merged by ``other`` instead.
    other: ``'mean'``, ``'sum'`` or ``'zero'`` for non-matrix leaves.

  Returns:
    A `MergeTransformation` of full models.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.array([[1., 1.], [0., 0.]])},
    ...        {'w': jnp.array([[1., 0.], [0., 0.]])}]
    >>> w = mj.merge(mj.methods.wudi(solver='closed_form'), base, fts)['w']
    >>> bool(jnp.allclose(w, jnp.array([[1., 0.5], [0., 0.]]), atol=1e-5))
    True

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding
      Data-Free Model Merging via Task Vectors", ICML 2025.
      https://arxiv.org/abs/2503.08099
  """
  return common.finish(
      wudi_lib.wudi_reduce(steps=steps, learning_rate=learning_rate,
                           solver=solver, layout=layout, exclude=exclude,
                           other=other), lambda_)
