"""LiNeS.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _layerwise as layerwise
from mergejax._src import paths


class LinesState(NamedTuple):
  inner: Any
  alpha: jax.Array
  beta: jax.Array


def lines(method: base.MergeTransformation, *,
          beta: float | jax.Array = 0.5, alpha: float | jax.Array | None = None,
          pattern: str | None = None,
          num_layers: int | None = None) -> base.MergeTransformation:
  """LiNeS (Wang et al. 2025): layer-increasing scaling of any merge's update.

  Runs ``method`` (a full merge returning a model), takes its task vector
  ``tau_m = theta_m - theta_0`` and scales block ``l``'s part by
  ``alpha + beta l / (L - 1)``; leaves in no block get ``alpha``
  (see `mergejax.transforms.layer_scale` for how blocks are read from paths). With
  ``alpha=None`` the multi-task rule ``alpha = ||sum_i tau_i||_1 /
  (K ||tau_m||_1)`` is used (``1/K`` for plain task arithmetic at scale 1).
  Run the inner method at scale 1 (e.g. ``task_arithmetic(lambda_=1.)``).

  Args:
    method: the merge to rescale.
    beta: the increment at the last block (traced; the tuned coefficient).
    alpha: scale of the first block (traced), or None for the rule above.
    pattern: regex whose first group is the block index.
    num_layers: number of blocks (None: inferred from the paths).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'layers_0': jnp.zeros(1), 'layers_1': jnp.zeros(1)}
    >>> fts = [{'layers_0': jnp.ones(1), 'layers_1': jnp.ones(1)}] * 2
    >>> tx = mj.methods.lines(mj.methods.task_arithmetic(), beta=1.0)
    >>> mj.merge(tx, base, fts)
    {'layers_0': Array([1.], dtype=float32), 'layers_1': Array([3.], dtype=float32)}

  References:
    Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and
      Enhances Model Merging", ICLR 2025.
      https://arxiv.org/abs/2410.17146
  """
  b = checks.hparam(beta, 'beta')
  a = checks.hparam(0.0 if alpha is None else alpha, 'alpha')
  return base.MergeTransformation(
      lambda params: LinesState(method.init(params), a, b),
      base.static_fn.of(_lines_update, inner=method.update,
                        auto_alpha=alpha is None, pattern=pattern,
                        num_layers=num_layers))


def _lines_update(updates, state, params=None, *, key=None, inner, auto_alpha,
                  pattern, num_layers):
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  merged, inner_state = inner(updates, state.inner, params, key=key)
  tau_m = jax.tree.map(lambda m, p: m.astype(jnp.float32) - p, merged, params)
  if auto_alpha:
    k = jax.tree.leaves(updates)[0].shape[0]
    l1_sum = sum(jnp.sum(jnp.abs(jnp.sum(u - p[None], axis=0)))
                 for u, p in zip(jax.tree.leaves(updates),
                                 jax.tree.leaves(params)))
    l1_m = sum(jnp.sum(jnp.abs(t)) for t in jax.tree.leaves(tau_m))
    alpha = l1_sum / jnp.maximum(l1_m, 1e-30) / k
  else:
    alpha = state.alpha
  flat = paths.flatten_to_dict(tau_m)
  f = layerwise.depth_factors(flat, alpha, state.beta, pattern=pattern,
                              num_layers=num_layers)
  flat_p = paths.flatten_to_dict(params)
  out = {p: flat_p[p] + f[p] * t for p, t in flat.items()}
  return paths.unflatten_like(params, out), LinesState(inner_state, state.alpha,
                                                       state.beta)
