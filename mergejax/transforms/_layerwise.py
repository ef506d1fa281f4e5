"""Depth-dependent scaling of updates (LiNeS), with the layer read from paths."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths


class LayerScaleState(NamedTuple):
  alpha: jax.Array  # scale of the first block (and of leaves in no block)
  beta: jax.Array  # extra scale reached at the last block


def layer_depths(names: list[str], *, pattern: str | None = None,
                 num_layers: int | None = None) -> tuple[dict[str, int | None], int]:
  """Block index of every path (None if it has none) and the block count ``L``.

  Args:
    names: parameter paths.
    pattern: a regex whose first group captures the block index (default:
      `mergejax.layer_index`'s, which knows ``layers.3.``, ``layers_3/``,
      ``blocks/3/``, ``h.3.``, ``Dense_3``).
    num_layers: ``L``; None infers ``max index + 1``.

  Raises:
    ValueError: if no path has a block index, or an index is ``>= num_layers``.
  """
  idx = {p: (paths.layer_index(p) if pattern is None
             else paths.layer_index(p, pattern)) for p in names}
  found = [i for i in idx.values() if i is not None]
  if not found:
    raise ValueError(
        'layer_scale: no parameter path has a layer index (paths look like '
        f'{names[:3]}). Pass pattern=r"...(\\d+)..." whose first group is the '
        'block index.')
  if num_layers is None:
    num_layers = max(found) + 1
  for p, i in idx.items():
    if i is not None and i >= num_layers:
      raise ValueError(f'layer_scale: leaf {p!r} has layer index {i} but '
                       f'num_layers={num_layers}.')
  return idx, int(num_layers)


def layer_scale(alpha: float | jax.Array = 0.0, beta: float | jax.Array = 1.0,
                *, pattern: str | None = None,
                num_layers: int | None = None) -> base.MergeTransformation:
  """Scales block ``l``'s update by ``alpha + beta * l / (L - 1)`` (LiNeS).

  Leaves without a block index (embeddings, final norm, heads) get ``alpha``,
  as in the LiNeS reference code. Works before or after the reduction; the
  layer index comes from the path (a regex), never from array shapes.
  ``alpha``/``beta`` live in the state, so sweeps vmap without recompiling.
  With ``L = 1`` the single block gets ``alpha + beta``.

  Args:
    alpha: scale of the first block (traced).
    beta: increment reached at the last block (traced).
    pattern: regex whose first group is the block index (see `layer_depths`).
    num_layers: number of blocks ``L`` (None: inferred from the paths).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.layer_scale(0.5, 0.5)
    >>> u = {'layers_0': jnp.ones(1), 'layers_2': jnp.ones(1), 'head': jnp.ones(1)}
    >>> tx.update(u, tx.init(u))[0]
    {'head': Array([0.5], dtype=float32), 'layers_0': Array([0.5], dtype=float32), 'layers_2': Array([1.], dtype=float32)}
  """
  a = checks.hparam(alpha, 'alpha')
  b = checks.hparam(beta, 'beta')
  return base.MergeTransformation(
      lambda params: LayerScaleState(a, b),
      base.static_fn.of(_layer_scale_update, pattern=pattern,
                        num_layers=num_layers))


def depth_factors(names, alpha, beta, *, pattern, num_layers):
  """``{path: alpha + beta * l / (L - 1)}`` as float32 scalars."""
  idx, n = layer_depths(list(names), pattern=pattern, num_layers=num_layers)
  denom = max(n - 1, 1)
  return {p: alpha + beta * (jnp.float32(1.0 if n == 1 else i / denom)
                             if i is not None else jnp.float32(0.0))
          for p, i in idx.items()}


def _layer_scale_update(updates, state, params=None, *, key=None, pattern,
                        num_layers):
  del params, key
  flat = paths.flatten_to_dict(updates)
  f = depth_factors(flat, state.alpha, state.beta, pattern=pattern,
                    num_layers=num_layers)
  out = {p: x * f[p].astype(x.dtype) for p, x in flat.items()}
  return paths.unflatten_like(updates, out), state
