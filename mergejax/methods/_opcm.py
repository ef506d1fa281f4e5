"""OPCM: orthogonal projection-based continual merging as one transformation.
"""

from __future__ import annotations

from typing import Any
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _continual as continual


def opcm(alpha: float | jax.Array = 0.5, *, exclude: Any = None,
         conv: str = 'none') -> base.MergeTransformation:
  """OPCM as a `MergeTransformation`: merges the K models in the given order.

  See the module docstring for the rule; FusionBench default ``alpha`` 0.5.
  For models that do not fit in memory together use `continual.opcm_update`.

  Args:
    alpha: mass fraction of the protected subspace (traced).
    exclude: path mask of 2-D leaves to treat as "other" parameters.
    conv: ``'none'`` or ``'reshape'`` (project conv kernels as matrices).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> out = mj.merge(mj.methods.opcm(), base, [{'w': jnp.eye(2)}, {'w': -jnp.eye(2)}])
    >>> out['w'].shape
    (2, 2)

  References:
    Tang et al., "Merging Models on the Fly Without Retraining: A Sequential
      Approach to Scalable Continual Model Merging", NeurIPS 2025.
      https://arxiv.org/abs/2501.09522
  """
  a = checks.hparam(alpha, 'alpha', low=0.0, high=1.0)
  exclude = exclude if exclude is None or isinstance(exclude, str) or callable(
      exclude) else tuple(exclude)
  step = base.MergeTransformation(
      lambda params: continual.OPCMState(
          a, jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params),
          jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0)),
      base.static_fn.of(_opcm_update, exclude=exclude, conv=conv))
  return base.named_chain(('tv', reduce.task_vectors()), ('opcm', step),
                          ('add', reduce.apply_to_base()))


def _opcm_update(updates, state, params=None, *, key=None, exclude, conv):
  del params, key

  def body(st, tau):
    return continual.step(st, tau, exclude=exclude, conv=conv), None

  state, _ = jax.lax.scan(body, state, updates)
  return state.merged, state
