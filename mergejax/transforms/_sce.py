"""SCE steps: select entries by variance across models, weight by energy.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _consensus as consensus
from mergejax._src import modelaxis
from mergejax.transforms import _select as select

Hparam = float | Sequence[float] | jax.Array


class SceSelectState(NamedTuple):
  select_topk: jax.Array


def sce_select(select_topk: Hparam = 1.0) -> base.MergeTransformation:
  """SCE's "select": keeps the entries with the largest variance across models.

  ``[K, ...] -> [K, ...]``, one mask shared by all models, per leaf: ``k =
  int(count_nonzero(var) * select_topk)`` entries of largest population
  variance survive (mergekit ``sce_mask``; ``select_topk >= 1`` keeps all).
  """
  s = checks.hparam(select_topk, 'select_topk', low=0.0)
  return base.MergeTransformation(lambda params: SceSelectState(s),
                                  base.static_fn.of(_sce_select_update))


def _sce_select_update(updates, state, params=None, *, key=None):
  del params, key
  frac = state.select_topk

  def one(u):
    mu = modelaxis.model_mean(u)
    var = modelaxis.model_mean(modelaxis.model_map(
        lambda x: jnp.square(x - mu), u))
    nz = jnp.sum(var != 0, dtype=jnp.int32)
    k = jnp.floor(nz.astype(jnp.float32) * frac).astype(jnp.int32)
    mask = select.topk_mask(var, k) | (frac >= 1)
    return jnp.where(mask[None] & (frac > 0), u, jnp.zeros((), u.dtype))

  return jax.tree.map(one, updates), state


def sce_merge() -> base.MergeTransformation:
  """SCE's "calculate" and "erase": a reducing step (mergekit ``sce``).

  Weights ``omega_i = mean(x_i^2) / sum_j mean(x_j^2)`` per leaf (``1/K`` if
  the sum is below 1e-6), unweighted sum-sign election (`elect_sign`'s rule),
  then ``sum_i omega_i m_i x_i / max(sum_i omega_i m_i, 1e-6)``.
  """
  return base.stateless(_sce_merge)


def _sce_merge(updates, params, *, key):
  del params, key

  def one(u):
    n_models = u.shape[0]
    msq = jnp.mean(jnp.square(u).reshape(n_models, -1), axis=1)
    tot = jnp.sum(msq)
    omega = jnp.where(jnp.abs(tot) < 1e-6, 1.0 / n_models,
                      msq / jnp.where(tot == 0, 1.0, tot))
    m = consensus.sign_agreement([u])[0]
    ew = modelaxis.model_map(lambda mi, o: jnp.where(mi, o, 0.0), m, omega)
    return modelaxis.model_sum(modelaxis.model_map(jnp.multiply, u, ew)) / (
        jnp.maximum(modelaxis.model_sum(ew), 1e-6))

  return jax.tree.map(one, updates)
