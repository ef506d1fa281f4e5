"""Mask builders: magnitude top-k, TALL masks and consensus masks.

All builders take stacked task vectors (every leaf ``[K, ...]``) and return
boolean trees of the same shapes; they are pure functions usable inside any
transformation's update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax.transforms import _select as select

FORMULAS = ('paper', 'fusion_bench')


def magnitude_mask(tvs: Any, density: jax.Array, *, scope: str = 'leaf') -> Any:
  """Keeps the top ``density`` fraction of every model's entries by magnitude.

  Args:
    tvs: stacked task vectors (``[K, ...]`` leaves).
    density: fraction kept, in [0, 1] (may be traced; ``k = round(density n)``).
    scope: ``'leaf'`` (top-k per tensor) or ``'global'`` (one threshold per
      model over all leaves; exact ties at the threshold are all kept).

  Returns:
    Boolean masks shaped like ``tvs``.

  Example:
    >>> import jax.numpy as jnp
    >>> magnitude_mask({'w': jnp.array([[1., -3., 2.]])}, 0.34)['w']
    Array([[False,  True, False]], dtype=bool)
  """
  density = checks.hparam(density, 'density', low=0.0, high=1.0)
  if scope == 'leaf':
    def per_leaf(x):
      n = x[0].size
      k = jnp.round(density * n).astype(jnp.int32)
      return jax.vmap(lambda v: select.topk_mask(v, k))(x)
    return jax.tree.map(per_leaf, tvs)
  if scope == 'global':
    leaves = jax.tree.leaves(tvs)
    n = sum(x[0].size for x in leaves)
    k = jnp.maximum(jnp.round(density * n).astype(jnp.int32), 1)
    thr = jax.vmap(lambda *xs: select.kth_largest_magnitude(list(xs), k))(*leaves)
    keep_any = density > 0

    def apply(x):
      t = thr.reshape((-1,) + (1,) * (x.ndim - 1))
      return (jnp.abs(x) >= t) & keep_any
    return jax.tree.map(apply, tvs)
  raise ValueError(f"scope must be 'leaf' or 'global', got {scope!r}.")


def compute_tall_masks(tvs: Any, mtl: Any, lambdas: jax.Array, *,
               formula: str = 'paper') -> Any:
  """TALL masks ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (Wang et al. 2024).

  Args:
    tvs: stacked task vectors ``tau_t`` (``[K, ...]``).
    mtl: the multi-task vector ``tau_MTL`` (unstacked), e.g. ``sum_t tau_t``.
    lambdas: ``[K]`` per-task lambdas (traced).
    formula: ``'paper'`` (above; ``|theta_0 - theta_t| = |tau_t|``) or
      ``'fusion_bench'``, which reproduces FusionBench 0.2.33's call that
      passes ``theta_0`` where ``tau_t`` belongs: ``|theta_0 - tau_t| > ...``.
      That mode needs ``base`` (see `tall_masks_fusion_bench`).

  Returns:
    Boolean masks ``[K, ...]``.
  """
  if formula != 'paper':
    raise ValueError("tall_masks: formula='fusion_bench' needs the base; use "
                     'tall_masks_fusion_bench(tvs, mtl, base, lambdas).')

  def per_leaf(t, m):
    lam = lambdas.reshape((-1,) + (1,) * (t.ndim - 1))
    return jnp.abs(t) > lam * jnp.abs(m[None] - t)
  return jax.tree.map(per_leaf, tvs, mtl)


def tall_masks_fusion_bench(tvs: Any, mtl: Any, base: Any,
                            lambdas: jax.Array) -> Any:
  """FusionBench 0.2.33's TALL masks: ``|theta_0 - tau_t| > lambda |tau_MTL - tau_t|``."""
  def per_leaf(t, m, b):
    lam = lambdas.reshape((-1,) + (1,) * (t.ndim - 1))
    return jnp.abs(b[None] - t) > lam * jnp.abs(m[None] - t)
  return jax.tree.map(per_leaf, tvs, mtl, base)


def consensus_mask(masks: Any, k: jax.Array) -> Any:
  """Keeps weights that at least ``k`` tasks' masks select: ``sum_t m_t >= k``.

  ``k = 2`` removes weights used by no task ("catastrophic") or by one task
  ("selfish"); ``k = 0`` keeps everything; ``k > K`` keeps nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> consensus_mask({'w': jnp.array([[1, 1, 0], [1, 0, 0]], bool)}, 2)['w']
    Array([ True, False, False], dtype=bool)
  """
  k = checks.hparam(k, 'k', low=0.0)
  return jax.tree.map(
      lambda m: modelaxis.model_count(m, jnp.float32) >= k, masks)
