"""Data-informed merges: Fisher merging and RegMean.

Each takes statistics computed once on a little data (`mergejax.stats`) and is
then an ordinary transformation over them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import merge as merge_lib
from mergejax._src import paths
from mergejax.stats import _gram as stats_lib
from mergejax.transforms import _fisher as fisher_lib
from mergejax.transforms import _regmean as regmean_lib


def fisher_merging(fishers: Any, *, epsilon: float | jax.Array = 1e-6,
                   normalize: bool = True) -> base.MergeTransformation:
  """Fisher merging: the Fisher-weighted average of the models' weights.

  ``theta = sum_i c_i F_i theta_i / sum_i c_i F_i`` per entry with each
  model's diagonal Fisher ``F_i`` (`mergejax.stats.fisher_diagonal`), floored
  at ``epsilon`` and, with ``normalize``, scaled by the inverse of its global
  norm (FusionBench's defaults). See `mergejax.transforms.fisher_weighted_sum`.
  Pass the base as ``base`` or None: the base is not used.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([0., 4.])}, {'w': jnp.array([2., 0.])}]
    >>> equal = [{'w': jnp.ones(2)}] * 2  # equal Fishers: the plain average
    >>> mj.merge(mj.methods.fisher_merging(equal), None, fts)['w']
    Array([1., 2.], dtype=float32)

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging",
      NeurIPS 2022. https://arxiv.org/abs/2111.09832
  """
  return fisher_lib.fisher_weighted_sum(fishers, epsilon=epsilon,
                                        normalize=normalize)


def regmean(grams: Any, *, alpha: float | jax.Array = 0.95,
            ridge: float | jax.Array = 0.0) -> base.MergeTransformation:
  """RegMean: per linear layer, the weights that best reproduce every model.

  For each kernel with input Grams ``G_i`` (`mergejax.stats.input_grams`):
  ``W = (sum_i G~_i)^-1 sum_i G~_i W_i`` with off-diagonal entries of each
  ``G_i`` shrunk by ``alpha``; every other leaf is the plain mean of the
  models (FusionBench's rule, biases included). See
  `mergejax.transforms.regmean_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'k': jnp.array([[2.]]), 'b': jnp.array([1.])},
    ...        {'k': jnp.array([[4.]]), 'b': jnp.array([3.])}]
    >>> grams = [{'k': jnp.array([[3.]])}, {'k': jnp.array([[1.]])}]
    >>> out = mj.merge(mj.methods.regmean(grams), None, fts)
    >>> out['k'], out['b']
    (Array([[2.5]], dtype=float32), Array([2.], dtype=float32))

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
      Models", ICLR 2023. https://arxiv.org/abs/2212.09849
  """
  return regmean_lib.regmean_reduce(grams, alpha=alpha, ridge=ridge)


def regmean_plusplus(inputs_fn: Callable[[Any, Any], Mapping[str, jax.Array]],
                     models: Sequence[Any], batches: Sequence[Any], *,
                     alpha: float = 0.95, ridge: float = 0.0,
                     num_examples: int | None = None
                     ) -> base.MergeTransformation:
  """RegMean++: RegMean with each layer's Grams taken through the merged layers.

  Layers are merged in the order the forward pass reaches them. The Gram of
  layer ``l`` for model ``i`` is computed on model ``i``'s data flowing
  through the **already merged** layers ``0 .. l-1`` (and model ``i``'s own
  layer ``l``), so each merge sees the inputs the merged model will actually
  feed it. A layer is the module that owns a kernel: its kernel is merged in
  closed form, its other leaves (bias) by the plain mean, as in RegMean;
  leaves outside every layer (embeddings, norms) are averaged before the
  first layer's statistics.

  The statistics need the models and data, so they are computed here, layer
  by layer; the returned transformation is `regmean` over them and
  reproduces, on ``models``, the merge built along the way.

  Args:
    inputs_fn: ``inputs_fn(params, x) -> {kernel_path: inputs}`` (see
      `mergejax.stats.input_grams`); its dict order is the forward order.
    models: the K fine-tuned models (same tree).
    batches: per model, its own task's batches (a list of K lists).
    alpha: off-diagonal shrink of every Gram (FusionBench 0.95).
    ridge: relative ridge for singular Grams.
    num_examples: examples per model for the statistics.

  Returns:
    The `regmean` transformation over the sequential Grams; merge it with
    ``mergejax.merge(tx, None, models)``.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> fn = lambda p, x: {'k': x}  # one linear layer: RegMean++ == RegMean
    >>> fts = [{'k': jnp.array([[2.]])}, {'k': jnp.array([[4.]])}]
    >>> data = [[jnp.ones((4, 1))], [jnp.ones((4, 1))]]
    >>> tx = mj.methods.regmean_plusplus(fn, fts, data)
    >>> mj.merge(tx, None, fts)['k']
    Array([[3.]], dtype=float32)

  References:
    Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of
      Regression Mean for Model Merging", 2025. https://arxiv.org/abs/2508.03121
  """
  models = list(models)
  if len(batches) != len(models):
    raise ValueError(f'batches must give one list of batches per model: got '
                     f'{len(batches)} for {len(models)} models.')
  flats = [paths.flatten_to_dict(m) for m in models]
  first = batches[0][0]
  first = first[0] if isinstance(first, (tuple, list)) else first
  order = list(inputs_fn(models[0], first))
  for p in order:
    if p not in flats[0]:
      raise ValueError(f'inputs_fn names a layer {p!r} that the models do not '
                       f'have (leaves: {sorted(flats[0])[:6]}...).')
  def owned_by(path):  # the layer's kernel and its module's other leaves
    prefix = path.rsplit('/', 1)[0] + '/' if '/' in path else None
    return [p for p in flats[0] if p == path or (
        prefix and p.startswith(prefix) and p not in order)]

  in_layers = {p for path in order for p in owned_by(path)}
  # Leaves outside the layers (embeddings, norms) are merged first, by the
  # plain mean, as FusionBench merges the embeddings before the blocks.
  merged: dict[str, jax.Array] = {
      p: jnp.mean(jnp.stack([jnp.asarray(f[p], jnp.float32) for f in flats]),
                  axis=0).astype(flats[0][p].dtype)
      for p in flats[0] if p not in in_layers}
  grams: list[dict[str, jax.Array]] = [{} for _ in models]
  for path in order:
    for i, flat in enumerate(flats):
      params = paths.unflatten_like(models[i], {**flat, **merged})
      g = stats_lib.input_grams(inputs_fn, params, batches[i],
                                num_examples=num_examples)
      grams[i][path] = g[path]
    owned = owned_by(path)
    layer = merge_lib.merge(
        regmean_lib.regmean_reduce({path: jnp.stack([g[path] for g in grams])},
                                   alpha=alpha, ridge=ridge),
        None, [{p: f[p] for p in owned} for f in flats], check_finite=False)
    merged.update(layer)
  return regmean_lib.regmean_reduce(grams, alpha=alpha, ridge=ridge)
