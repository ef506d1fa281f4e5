"""RAM step: average the updates models share, keep the unique ones.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax.transforms import _sparsify as sparsify

Hparam = float | Sequence[float] | jax.Array


class RamMergeState(NamedTuple):
  epsilon: jax.Array
  r: jax.Array
  alpha: jax.Array


def ram_merge(epsilon: Hparam = 1e-5, *, r: Hparam = 0.0, alpha: Hparam = 0.0
              ) -> base.MergeTransformation:
  """RAM's reducing step (mergekit ``ram`` / ``ramplus_tl``, per leaf).

  Entries with ``|x_i| > epsilon`` are active; an entry active in one model
  only is taken as is (times ``lambda_i = 1 + r clip(shared_i / max(unique_i,
  epsilon), 0, alpha)``, counted per model within the leaf), an entry active
  in ``c > 1`` models is averaged over them. ``r = 0`` is plain RAM.
  """
  e = checks.hparam(epsilon, 'epsilon', low=0.0)
  rr = checks.hparam(r, 'r')
  a = checks.hparam(alpha, 'alpha')
  return base.MergeTransformation(lambda params: RamMergeState(e, rr, a),
                                  base.static_fn.of(_ram_update))


def _ram_update(updates, state, params=None, *, key=None):
  del params, key

  def one(u):
    n_models = u.shape[0]
    active = jnp.abs(u) > state.epsilon
    c = modelaxis.model_count(active)
    unique = (c == 1)[None] & active
    shared = (c > 1)[None] & active
    n_sh = jnp.sum(shared.reshape(n_models, -1), axis=1).astype(jnp.float32)
    n_un = jnp.sum(unique.reshape(n_models, -1), axis=1).astype(jnp.float32)
    rho = n_sh / jnp.maximum(n_un, state.epsilon)
    lam = 1 + state.r * jnp.clip(rho, 0, state.alpha)
    z = jnp.where(active, u, 0.0)
    uni = jnp.where(unique, z * sparsify._bcast(lam, u), 0.0)  # pylint: disable=protected-access
    sh = jnp.where(shared, z / jnp.maximum(c, 1).astype(u.dtype)[None], 0.0)
    return modelaxis.model_sum(uni + sh)

  return jax.tree.map(one, updates), state
