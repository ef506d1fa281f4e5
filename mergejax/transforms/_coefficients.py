"""Per-model, per-leaf coefficients on task vectors (AdaMerging's merge)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax._src import paths


class CoefficientSumState(NamedTuple):
  coefficients: Any  # [K] (task-wise) or a tree like the params of [K] / [K, n]


def coefficient_sum(coefficients: Any) -> base.MergeTransformation:
  """``sum_i c_i tau_i`` with coefficients per model, per leaf or per chunk.

  Reducing (``[K, ...] -> [...]``). ``coefficients`` is a ``[K]`` array (one
  per model, task-wise) or a pytree like the params whose leaves are ``[K]``
  (one per model and leaf: layer-wise) or ``[K, n]`` (chunk-wise: the
  flattened leaf is cut into ``n`` contiguous chunks of sizes differing by at
  most one, chunk ``j`` scaled by ``c[:, j]``, as Expert Merging++ does; a
  ``[K, 1]`` leaf is layer-wise). The coefficients live in the state, so they
  are traced: sweeps ``vmap`` over them and ``jax.grad`` flows into them
  (AdaMerging and Expert Merging train them).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> from mergejax import transforms as T
    >>> c = {'a': jnp.array([1., 0.]), 'b': jnp.array([0., 2.])}
    >>> u = {'a': jnp.array([[1.], [5.]]), 'b': jnp.array([[1.], [5.]])}
    >>> T.coefficient_sum(c).update(u, T.coefficient_sum(c).init(None))[0]
    {'a': Array([1.], dtype=float32), 'b': Array([10.], dtype=float32)}
    >>> chunked = {'a': jnp.array([[1., 2.]])}  # one model, two chunks
    >>> t = T.coefficient_sum(chunked)
    >>> t.update({'a': jnp.ones((1, 4))}, t.init(None))[0]['a']
    Array([1., 1., 2., 2.], dtype=float32)
  """
  def convert(path, c):
    if isinstance(c, jax.core.Tracer):  # AdaMerging's training: checked there
      return jnp.asarray(c, jnp.float32)
    return checks.hparam(c, 'coefficients' + (f'[{path!r}]' if path else ''))

  coefficients = paths.tree_map_with_path(convert, coefficients)
  return base.MergeTransformation(lambda params: CoefficientSumState(
      coefficients), base.static_fn.of(_coefficient_update))


def _coefficient_update(updates, state, params=None, *, key=None):
  del params, key
  c = state.coefficients
  if hasattr(c, 'ndim'):  # one array: task-wise
    return jax.tree.map(lambda u: modelaxis.model_sum(u, c), updates), state
  flat_c = paths.flatten_to_dict(c)
  flat_u = paths.flatten_to_dict(updates)
  paths.require_same_paths(flat_c, flat_u, 'layer-wise coefficients')
  out = {p: _leaf_sum(p, u, flat_c[p]) for p, u in flat_u.items()}
  return paths.unflatten_like(updates, out), state


def _leaf_sum(path, u, c):
  """``sum_i c_i u_i`` for one leaf, ``c`` of shape ``[K]`` or ``[K, n]``."""
  k, size = u.shape[0], math.prod(u.shape[1:])
  if c.ndim < 2:  # a scalar or [K]: layer-wise
    return modelaxis.model_sum(u, c)
  if c.ndim != 2 or c.shape[0] != k or not 1 <= c.shape[1] <= max(size, 1):
    raise ValueError(
        f'coefficients[{path!r}] has shape {tuple(c.shape)} for a leaf of '
        f'shape {tuple(u.shape[1:])} and K={k} models: give [K] (layer-wise) '
        f'or [K, n] with 1 <= n <= {size} (n chunks of the flattened leaf).')
  n = c.shape[1]
  if n == 1:
    return modelaxis.model_sum(u, c[:, 0])
  # Chunk j holds the flat positions i with floor(i n / size) == j: contiguous,
  # never empty, sizes within one of each other. A static index, so the
  # per-entry coefficient is a gather XLA fuses into the weighted sum.
  chunk_of = (np.arange(size) * n) // size

  def scale(ci, ui):
    return ui * jnp.take(ci.astype(ui.dtype), chunk_of).reshape(ui.shape)

  return modelaxis.model_fold(jnp.add, modelaxis.model_map(scale, c, u))


class SharedMaskState(NamedTuple):
  mask: Any  # a tree like the params: one entry per parameter, shared by models


def shared_mask(mask: Any) -> base.MergeTransformation:
  """Multiplies every model's task vector by one mask: ``tau_i -> m * tau_i``.

  Per-model (``[K, ...] -> [K, ...]``). ``mask`` is a pytree like the params
  (an array per leaf, of the leaf's shape), shared by the K models, as the
  Concrete subspace masks and DAM's safety mask are. It lives in the state,
  so ``jax.grad`` flows into it (`mergejax.methods.fit_concrete` trains the
  logits behind it); it need not be binary.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import transforms as T
    >>> m = {'w': jnp.array([1., 0.])}
    >>> u = {'w': jnp.array([[1., 2.], [3., 4.]])}
    >>> T.shared_mask(m).update(u, T.shared_mask(m).init(None))[0]['w']
    Array([[1., 0.],
           [3., 0.]], dtype=float32)
  """
  def convert(path, m):
    if isinstance(m, jax.core.Tracer):  # being trained: checked by the caller
      return m
    m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.floating) and m.dtype != jnp.bool_:
      raise TypeError(f'shared_mask: mask[{path!r}] must be float or bool, got '
                      f'{m.dtype}.')
    if m.dtype != jnp.bool_ and not bool(jnp.all(jnp.isfinite(m))):
      raise ValueError(f'shared_mask: mask[{path!r}] has non-finite entries.')
    return m

  mask = paths.tree_map_with_path(convert, mask)
  return base.MergeTransformation(lambda params: SharedMaskState(mask),
                                  base.static_fn.of(_shared_mask_update))


def _shared_mask_update(updates, state, params=None, *, key=None):
  del params, key
  flat_m = paths.flatten_to_dict(state.mask)
  flat_u = paths.flatten_to_dict(updates)
  paths.require_same_paths(flat_m, flat_u, 'shared_mask')
  out = {}
  for p, u in flat_u.items():
    m = flat_m[p]
    if jnp.shape(m) != u.shape[1:]:
      raise ValueError(f'shared_mask: mask[{p!r}] has shape {jnp.shape(m)}, the '
                       f'task vectors {u.shape[1:]} (per model); give one mask '
                       'entry per parameter.')
    out[p] = u * jnp.asarray(m, u.dtype)[None]
  return paths.unflatten_like(updates, out), state
