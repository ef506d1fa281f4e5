"""TALL masks and Consensus merging.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _masks as masks_lib
from mergejax.transforms import _reduce as reduce


class TallMaskState(NamedTuple):
  """TALL masks: ``theta_i = theta_0 + m_i * tau_MTL``."""
  tall_lambda: jax.Array
  masks: Any = None  # [K, ...] bool, after update
  mtl: Any = None  # the multi-task vector tau_MTL

  @property
  def num_tasks(self) -> int:
    return jax.tree.leaves(self.masks)[0].shape[0]

  def task_delta(self, base_params, i):
    del base_params
    return jax.tree.map(lambda m, t: jnp.where(jnp.take(m, i, axis=0), t, 0.0), self.masks,
                        self.mtl)


def tall_masks(tall_lambda: float | jax.Array = 0.6, *,
               formula: str = 'paper') -> base.MergeTransformation:
  """TALL masks (Wang et al. 2024): per-task masks on the multi-task vector.

  ``tau_MTL = sum_i tau_i``; ``m_i = |tau_i| > lambda_i |tau_MTL - tau_i|``;
  task model ``i`` is ``theta_0 + m_i * tau_MTL`` (rebuild it with
  `reconstruct`). The masks and ``tau_MTL`` live in the returned state
  (`TallMaskState`); the model `merge` returns is ``theta_0 + tau_MTL``.

  Args:
    tall_lambda: lambda, one or one per task (traced); FusionBench 0.6, the
      paper picks it per task from {0.2, ..., 0.6} on validation data.
    formula: ``'paper'`` or ``'fusion_bench'`` (FusionBench 0.2.33 compares
      ``|theta_0 - tau_i|``, see `masks.tall_masks_fusion_bench`).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> out, st = mj.merge(mj.methods.tall_masks(), base, fts, return_state=True)
    >>> mj.methods.reconstruct(st, base, 0)['w']
    Array([1., 0.], dtype=float32)

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and
      Compression", ICML 2024.
      https://arxiv.org/abs/2405.07813
  """
  if formula not in masks_lib.FORMULAS:
    raise ValueError(f'formula must be one of {masks_lib.FORMULAS}, got '
                     f'{formula!r}.')
  lam = checks.hparam(tall_lambda, 'tall_lambda', low=0.0)
  step = base.MergeTransformation(
      lambda params: TallMaskState(lam),
      base.static_fn.of(_tall_update, formula=formula))
  return base.named_chain(('tv', reduce.task_vectors()), ('tall', step),
                          ('add', reduce.apply_to_base()))


def _tall(updates, lam, params, formula):
  k = jax.tree.leaves(updates)[0].shape[0]
  lam = checks.per_model(lam, k, 'tall_lambda')
  mtl = jax.tree.map(lambda x: jnp.sum(x, axis=0), updates)
  if formula == 'paper':
    m = masks_lib.compute_tall_masks(updates, mtl, lam)
  else:
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    m = masks_lib.tall_masks_fusion_bench(updates, mtl, params, lam)
  return m, mtl


def _tall_update(updates, state, params=None, *, key=None, formula):
  del key
  m, mtl = _tall(updates, state.tall_lambda, params, formula)
  return mtl, TallMaskState(state.tall_lambda, m, mtl)


class ConsensusState(NamedTuple):
  lambda_: jax.Array
  k: jax.Array
  tall: TallMaskState
  consensus: Any = None  # bool mask, after update


def consensus(lambda_: float | jax.Array = 0.3, *, k: float | jax.Array = 2,
              tall_lambda: float | jax.Array = 0.6,
              formula: str = 'paper') -> base.MergeTransformation:
  """Consensus merging (Wang et al. 2024): drop weights fewer than k tasks use.

  TALL masks ``m_i`` (see `tall_masks`), then ``c = [sum_i m_i >= k]`` and
  ``theta = theta_0 + lambda (c * tau_MTL)`` with ``tau_MTL = sum_i tau_i``.
  ``k = 2`` removes catastrophic and selfish weights; ``k = 0`` is task
  arithmetic. The TALL masks stay in the state, so `reconstruct` also works.

  Args:
    lambda_: scale of the masked multi-task vector (traced; tune it as for
      task arithmetic, FusionBench's TA default 0.3).
    k: minimum number of tasks (traced).
    tall_lambda: TALL mask lambda(s) (traced).
    formula: ``'paper'`` or ``'fusion_bench'`` (TALL mask formula).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 1.])}, {'w': jnp.array([1., 0.])}]
    >>> mj.merge(mj.methods.consensus(1.0), base, fts)['w']
    Array([2., 0.], dtype=float32)

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and
      Compression", ICML 2024.
      https://arxiv.org/abs/2405.07813
  """
  lam = checks.hparam(lambda_, 'lambda_')
  kk = checks.hparam(k, 'k', low=0.0)
  tl = checks.hparam(tall_lambda, 'tall_lambda', low=0.0)
  step = base.MergeTransformation(
      lambda params: ConsensusState(lam, kk, TallMaskState(tl)),
      base.static_fn.of(_consensus_update, formula=formula))
  return base.named_chain(('tv', reduce.task_vectors()), ('consensus', step),
                          ('add', reduce.apply_to_base()))


def _consensus_update(updates, state, params=None, *, key=None, formula):
  del key
  m, mtl = _tall(updates, state.tall.tall_lambda, params, formula)
  c = masks_lib.consensus_mask(m, state.k)
  out = jax.tree.map(lambda cm, t: state.lambda_ * jnp.where(cm, t, 0.0), c,
                     mtl)
  tall = TallMaskState(state.tall.tall_lambda, m, mtl)
  return out, ConsensusState(state.lambda_, state.k, tall, c)
