"""Layer-wise merge configurations: one method and one weight per block."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths


class LayerwiseSpace(NamedTuple):
  """A search space of layer-wise merges (`layerwise_space`).

  Attributes:
    base: the base model.
    deltas: the base's structure with leaves ``[M, ...]``: method ``m``'s
      merged update of the leaf (merged minus base, float32).
    methods: the M method names, in the order of ``deltas``.
    blocks: for each leaf (in ``jax.tree.leaves`` order), its block index.
    num_blocks: B, the number of blocks.
  """
  base: Any
  deltas: Any
  methods: tuple[str, ...]
  blocks: tuple[int, ...]
  num_blocks: int


def layerwise_space(base: Any, merged: Mapping[str, Any], *,
                    block_of: Callable[[str], int | None] | None = None
                    ) -> LayerwiseSpace:
  """The space of merges that take, in every block, one method's update at
  its own weight.

  ``merged`` maps method names to merges of the same models made at unit
  scale (task arithmetic at lambda 1, TIES at lambda 1, ...); a candidate
  picks for block ``b`` a method ``m_b`` and a weight ``w_b`` and builds
  ``base + w_b * (merged[m_b] - base)`` in that block's leaves
  (`layerwise_merge`). The updates are computed once, so evaluating a
  population of candidates costs no merge at all: a zero-order search
  (`evolve`, `evaluate_population`) over blocks, methods and weights in the
  manner of MedSAMix. Blocks come from ``block_of(path)`` (default: the layer
  index in the path, `mergejax.layer_index`); leaves without an index form
  one extra block.

  Args:
    base: the base model.
    merged: ``{name: merged model}``, at least one, each shaped like
      ``base``.
    block_of: a leaf path's block index (None: its own extra block).

  Returns:
    A `LayerwiseSpace`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'Dense_0': {'kernel': jnp.zeros(2)},
    ...         'Dense_1': {'kernel': jnp.zeros(2)}}
    >>> space = mj.search.layerwise_space(base, {
    ...     'a': {'Dense_0': {'kernel': jnp.ones(2)},
    ...           'Dense_1': {'kernel': jnp.ones(2)}},
    ...     'b': {'Dense_0': {'kernel': -jnp.ones(2)},
    ...           'Dense_1': {'kernel': -jnp.ones(2)}}})
    >>> space.methods, space.num_blocks
    (('a', 'b'), 2)

  References:
    Yang et al., "MedSAMix: A Training-Free Model Merging Approach for
    Medical Image Segmentation", 2025 (https://arxiv.org/abs/2508.11032).
  """
  if not merged:
    raise ValueError('layerwise_space: merged names no models; give at least '
                     'one {name: merged model}.')
  want = paths.flatten_to_dict(base)
  deltas = []
  for name, model in merged.items():
    got = paths.flatten_to_dict(model)
    paths.require_same_paths(got, want, f'layerwise_space: merged[{name!r}]')
    for p, leaf in got.items():
      if np.shape(leaf) != np.shape(want[p]):
        raise ValueError(f'layerwise_space: merged[{name!r}] leaf {p!r} has '
                         f'shape {np.shape(leaf)}, the base '
                         f'{np.shape(want[p])}.')
    deltas.append(jax.tree.map(
        lambda m, b: jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32),
        model, base))
  block_of = block_of or paths.layer_index
  raw = [block_of(p) for p in want]  # flatten_to_dict follows leaf order
  named = sorted({b for b in raw if b is not None})
  index = {b: i for i, b in enumerate(named)}
  extra = len(named)
  blocks = tuple(index[b] if b is not None else extra for b in raw)
  return LayerwiseSpace(
      base=base, deltas=jax.tree.map(lambda *d: jnp.stack(d), *deltas),
      methods=tuple(merged), blocks=blocks,
      num_blocks=extra + (1 if any(b is None for b in raw) else 0))


def layerwise_candidate(space: LayerwiseSpace, weight: float = 1.0,
                        method: int | Sequence[float] = 0
                        ) -> dict[str, jax.Array]:
  """A candidate of the space: ``{'logits': [B, M], 'weight': [B]}``.

  Every block starts at ``weight``; ``method`` is one method's index (its
  logit 1, the others 0) or M logits shared by every block. A search moves
  the logits (the block's method is their argmax) and the weights.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> space = mj.search.layerwise_space({'w': jnp.zeros(2)},
    ...                                   {'a': {'w': jnp.ones(2)}})
    >>> c = mj.search.layerwise_candidate(space, 0.5)
    >>> c['logits'].shape, c['weight'].tolist()
    ((1, 1), [0.5])
  """
  m = len(space.methods)
  if isinstance(method, (int, np.integer)):
    if not 0 <= method < m:
      raise ValueError(f'layerwise_candidate: method {method} is not an index '
                       f'of the {m} methods {space.methods}.')
    logits = jnp.zeros(m).at[method].set(1.0)
  else:
    logits = jnp.asarray(method, jnp.float32)
    if logits.shape != (m,):
      raise ValueError(f'layerwise_candidate: expected {m} logits, got shape '
                       f'{logits.shape}.')
  return dict(logits=jnp.broadcast_to(logits, (space.num_blocks, m)),
              weight=jnp.full((space.num_blocks,), weight, jnp.float32))


def layerwise_merge(space: LayerwiseSpace, candidate: Mapping[str, jax.Array]
                    ) -> Any:
  """The merge a candidate describes: in block ``b``,
  ``base + weight[b] * delta[argmax logits[b]]``, in the base's dtype.

  Pure and cheap (a select and a scale per leaf), so ``vmap`` evaluates a
  population of candidates in one call.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> space = mj.search.layerwise_space(
    ...     {'w': jnp.zeros(2)}, {'a': {'w': jnp.ones(2)},
    ...                           'b': {'w': -jnp.ones(2)}})
    >>> c = {'logits': jnp.array([[0., 1.]]), 'weight': jnp.array([0.5])}
    >>> mj.search.layerwise_merge(space, c)['w'].tolist()
    [-0.5, -0.5]
  """
  logits = jnp.asarray(candidate['logits'])
  weight = jnp.asarray(candidate['weight'])
  m = len(space.methods)
  if logits.shape != (space.num_blocks, m) or weight.shape != (
      space.num_blocks,):
    raise ValueError(
        f'layerwise_merge: expected logits [{space.num_blocks}, {m}] and '
        f'weight [{space.num_blocks}] ({space.num_blocks} blocks, methods '
        f'{space.methods}), got {logits.shape} and {weight.shape}.')
  choice = jnp.argmax(logits, axis=-1)  # [B]
  leaves, treedef = jax.tree.flatten(space.base)
  deltas = jax.tree.leaves(space.deltas)
  out = []
  for leaf, delta, b in zip(leaves, deltas, space.blocks):
    picked = jnp.take(delta, choice[b], axis=0)
    out.append((jnp.asarray(leaf, jnp.float32) + weight[b] * picked).astype(
        jnp.result_type(leaf)))
  return jax.tree.unflatten(treedef, out)
