"""RegMean: per linear layer, the least-squares merge of the models' outputs."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax._src import paths


class RegMeanState(NamedTuple):
  grams: Any  # {kernel_path: [K, d_in, d_in]} float32
  alpha: jax.Array
  ridge: jax.Array


def regmean_reduce(grams: Any, *, alpha: float | jax.Array = 0.95,
                   ridge: float | jax.Array = 0.0) -> base.MergeTransformation:
  """RegMean's closed-form merge of every linear layer with a Gram (reducing).

  For a kernel ``W`` (Flax ``[d_in, d_out]``) with per-model input Grams
  ``G_i = X_i^T X_i / N_i``: ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``
  (off-diagonal entries shrunk by ``alpha``) and
  ``W = (sum_i G~_i + ridge m I)^-1 sum_i G~_i W_i`` with ``m`` the mean
  diagonal of ``sum_i G~_i``: the ``W`` minimising
  ``sum_i ||X_i W - X_i W_i||^2`` when ``alpha = 1, ridge = 0``. Every other
  leaf (biases, norms, embeddings) is the plain mean of the models. Merges
  full weights (``[K, ...] -> [...]``).

  Args:
    grams: per-model Grams, a list of K ``{kernel_path: G}`` dicts
      (`mergejax.stats.input_grams`; a tree shaped like the params works
      too) or one dict of ``[K, d_in, d_in]``.
    alpha: off-diagonal scale (traced; FusionBench ``reduce_non_diagonal_ratio``,
      0.95 for CLIP, 0.6 for GPT-2).
    ridge: relative ridge for singular Grams (traced; FusionBench has none).

  Returns:
    A reducing `MergeTransformation`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'k': jnp.array([[1.], [0.]])}, {'k': jnp.array([[0.], [1.]])}]
    >>> grams = [{'k': jnp.diag(jnp.array([3., 1.]))},
    ...          {'k': jnp.diag(jnp.array([1., 3.]))}]
    >>> mj.merge(mj.transforms.regmean_reduce(grams, alpha=1.0), None, fts)['k']
    Array([[0.75],
           [0.75]], dtype=float32)

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
      Models", ICLR 2023. https://arxiv.org/abs/2212.09849
  """
  if isinstance(grams, (list, tuple)):
    if not grams:
      raise ValueError('grams is empty: pass one {kernel_path: G} per model.')
    # A flat {path: G} dict or a tree shaped like the params (same paths).
    grams = [paths.flatten_to_dict(g) for g in grams]
    keys = set(grams[0])
    for i, g in enumerate(grams):
      if set(g) != keys:
        raise ValueError(f'grams[{i}] has layers {sorted(g)}, grams[0] has '
                         f'{sorted(keys)}: every model needs the same layers.')
    grams = {p: jnp.stack([jnp.asarray(g[p], jnp.float32) for g in grams])
             for p in sorted(keys)}
  else:
    grams = {p: jnp.asarray(g, jnp.float32)
             for p, g in paths.flatten_to_dict(grams).items()}
  for p, g in grams.items():
    if not isinstance(g, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(g))):
      raise ValueError(f'grams[{p!r}] holds NaN/Inf; recompute the Gram '
                       'statistics (e.g. stats.input_grams) from finite inputs.')
  a = checks.hparam(alpha, 'alpha', low=0.0, high=1.0)
  r = checks.hparam(ridge, 'ridge', low=0.0)

  def init(params):
    if params is not None:
      _check_grams(grams, params)
    return RegMeanState(grams, a, r)

  return base.MergeTransformation(init, base.static_fn.of(_regmean_update))


def _check_grams(grams: Mapping[str, jax.Array], params: Any) -> None:
  flat = paths.flatten_to_dict(params)
  for p, g in grams.items():
    if p not in flat:
      raise ValueError(f'grams has a layer {p!r} that the parameters do not '
                       f'(leaves: {sorted(flat)[:6]}...).')
    w = flat[p]
    if w.ndim != 2 or g.ndim != 3 or g.shape[1:] != (w.shape[0],) * 2:
      raise ValueError(f'grams[{p!r}] has shape {tuple(g.shape)}; kernel '
                       f'{p!r} has shape {tuple(w.shape)}: expected '
                       f'[K, {w.shape[0] if w.ndim else "?"}, '
                       f'{w.shape[0] if w.ndim else "?"}] for a [d_in, d_out] '
                       'kernel.')


def pinv_psd(a: jax.Array) -> jax.Array:
  """Pseudo-inverse of a symmetric PSD matrix (eigenvalues below rcond dropped)."""
  vals, vecs = jnp.linalg.eigh(a)
  cut = jnp.max(jnp.abs(vals)) * a.shape[-1] * jnp.finfo(jnp.float32).eps
  inv = jnp.where(vals > cut, 1.0 / jnp.where(vals > cut, vals, 1.0), 0.0)
  return (vecs * inv[None]) @ vecs.T


def _regmean_update(updates, state, params=None, *, key=None):
  del params, key

  def merge(path, x):
    if path not in state.grams:
      return modelaxis.model_mean(x.astype(jnp.float32))
    g = state.grams[path]
    if g.shape[0] != x.shape[0]:
      raise ValueError(f'grams[{path!r}] holds {g.shape[0]} models but '
                       f'{x.shape[0]} models are merged.')
    eye = jnp.eye(g.shape[-1], dtype=jnp.float32)
    gs = state.alpha * g + (1.0 - state.alpha) * g * eye[None]  # shrink off-diag
    total = jnp.sum(gs, axis=0)
    total = total + state.ridge * jnp.mean(jnp.diagonal(total)) * eye
    # Centred on the plain mean: input directions no model's data reaches
    # (a zero or singular Gram) leave the weights unconstrained there, and
    # they keep the mean instead of becoming NaN.
    xs = x.astype(jnp.float32)
    avg = jnp.mean(xs, axis=0)
    rhs = jnp.einsum('kij,kjo->io', gs, xs - avg[None])
    w = jnp.linalg.solve(total, rhs)
    return avg + jax.lax.cond(jnp.all(jnp.isfinite(w)), lambda: w,
                              lambda: pinv_psd(total) @ rhs)

  return paths.tree_map_with_path(merge, updates), state
