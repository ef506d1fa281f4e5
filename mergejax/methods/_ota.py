"""OTA merging: curvature from the fine-tunes' own Adam state."""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.transforms import _curvature as curv
from mergejax.transforms import _reduce as reduce


def ota(second_moments: Any, *, power: float = 0.5,
        epsilon: float | jax.Array = 1e-8, normalize: str = 'none',
        graft_density: float | jax.Array | None = 0.1,
        compress: bool = False) -> base.MergeTransformation:
  """OTA merging: Fast Fisher Grafting, then a curvature-weighted average.

  Each fine-tune's second moment ``nu_i`` (Adam's running mean of squared
  gradients, saved with it) is a diagonal curvature proxy. With
  ``graft_density`` each task vector first keeps only its edits of largest
  ``nu_i tau_i^2`` per tensor (`mergejax.transforms.fisher_graft`); the
  grafted task vectors are then averaged with weights ``nu_i ** power +
  epsilon`` (`mergejax.transforms.ota_reduce`), and ``theta = theta_0 +
  tau``. ``compress`` replaces every matrix ``nu`` by its rank-1 row/column
  factorisation first (`mergejax.transforms.factored_second_moments`), the
  memory-light variant: ``m + n`` floats per ``m x n`` matrix.

  The steps follow the authors' code (``ota`` and ``ffg`` in their mergekit
  fork); grafting by a per-tensor density rather than an absolute saliency
  threshold keeps the setting independent of the gradients' scale.

  Args:
    second_moments: Adam's ``nu`` per model: a list of K trees like the params
      (e.g. ``optax.tree_utils.tree_get(opt_state, 'nu')``) or one tree with a
      leading model axis.
    power: exponent of the curvature weights (0.5: Adam's preconditioner).
    epsilon: floor of the weights (traced).
    normalize: ``'none'`` or ``'global'`` (each model's weights divided by
      their mean per tensor).
    graft_density: fraction of each task vector kept per tensor (traced;
      authors' default 0.1); None skips grafting.
    compress: use the rank-1 factorisation of every matrix ``nu``.

  Returns:
    A `MergeTransformation` of full models.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> nu = [{'w': jnp.array([9., 1.])}, {'w': jnp.array([1., 9.])}]
    >>> tx = mj.methods.ota(nu, epsilon=0.0, graft_density=None)
    >>> mj.merge(tx, base, fts)['w']
    Array([0.75, 0.75], dtype=float32)

  References:
    Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed
      Model Merging", 2025. https://arxiv.org/abs/2509.11167
  """
  if compress:
    if isinstance(second_moments, (list, tuple)):
      second_moments = [curv.factored_second_moments(m) for m in second_moments]
    else:
      second_moments = curv.factored_second_moments(second_moments)
  steps = [reduce.task_vectors()]
  if graft_density is not None:
    steps.append(curv.fisher_graft(second_moments, graft_density))
  steps += [curv.ota_reduce(second_moments, power=power, epsilon=epsilon,
                            normalize=normalize), reduce.apply_to_base()]
  return base.chain(*steps)
