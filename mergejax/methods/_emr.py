"""EMR.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax.transforms import _reduce as reduce


class EMRState(NamedTuple):
  """EMR: ``theta_i = theta_0 + r_i (m_i * tau_uni)``."""
  unified: Any = None  # tau_uni
  masks: Any = None  # [K, ...] bool
  rescalers: jax.Array | None = None  # [K]

  @property
  def num_tasks(self) -> int:
    return self.rescalers.shape[0]

  def task_delta(self, base_params, i):
    del base_params
    r = jnp.take(self.rescalers, i)
    return jax.tree.map(lambda m, t: r * jnp.where(jnp.take(m, i, axis=0), t, 0.0),
                        self.masks, self.unified)


def emr() -> base.MergeTransformation:
  """EMR merging (Huang et al. 2024): elect, mask, rescale (FusionBench rule).

  ``gamma = sign(sum_i tau_i)`` with 0 counted as -1; ``m_i = [tau_i gamma >
  0]``; ``tau_uni = gamma max_i |m_i tau_i|``; ``r_i = sum_leaves mean|tau_i| /
  sum_leaves mean|m_i tau_uni|``. Task model ``i`` is ``theta_0 + r_i (m_i
  tau_uni)`` (`reconstruct`); the state (`EMRState`) holds ``tau_uni``, the
  masks and the rescalers. The one model `merge` returns is the average of
  the K task models.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([2., 1.])}, {'w': jnp.array([1., -3.])}]
    >>> out, st = mj.merge(mj.methods.emr(), base, fts, return_state=True)
    >>> st['emr'].unified['w']
    Array([ 2., -3.], dtype=float32)

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
      NeurIPS 2024.
      https://arxiv.org/abs/2405.17461
  """
  step = base.MergeTransformation(lambda params: EMRState(),
                                  base.static_fn.of(_emr_update))
  return base.named_chain(('tv', reduce.task_vectors()), ('emr', step),
                          ('add', reduce.apply_to_base()))


def _emr_update(updates, state, params=None, *, key=None):
  del state, params, key
  flag = jax.tree.map(
      lambda x: jnp.where(jnp.sum(x, axis=0) > 0, 1.0, -1.0), updates)
  m = jax.tree.map(lambda x, g: x * g[None] > 0, updates, flag)
  uni = jax.tree.map(
      lambda x, mm, g: g * jnp.max(jnp.abs(jnp.where(mm, x, 0.0)), axis=0),
      updates, m, flag)
  axes = lambda x: tuple(range(1, x.ndim))
  scales = sum(jnp.mean(jnp.abs(x), axis=axes(x))
               for x in jax.tree.leaves(updates))
  new = sum(jnp.mean(jnp.abs(jnp.where(mm, u[None], 0.0)), axis=axes(mm))
            for mm, u in zip(jax.tree.leaves(m), jax.tree.leaves(uni)))
  # A task whose mask keeps nothing (all-zero task vector, or a sign that
  # disagrees with the elected one everywhere) rebuilds to zero whatever its
  # rescaler; 1 keeps it finite (FusionBench divides 0 by 0 there).
  r = jnp.where(new > 0, scales / jnp.where(new > 0, new, 1.0), 1.0)
  out = jax.tree.map(
      lambda mm, u: jnp.mean(r.reshape((-1,) + (1,) * u.ndim)
                             * jnp.where(mm, u[None], 0.0), axis=0), m, uni)
  return out, EMRState(uni, m, r)
