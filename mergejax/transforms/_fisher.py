"""Fisher-weighted averaging of full weights (a reducing step)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax._src import paths


class FisherWeightState(NamedTuple):
  fishers: Any  # like the params, every leaf [K, ...] float32
  epsilon: jax.Array


def fisher_weighted_sum(fishers: Any, *, epsilon: float | jax.Array = 1e-6,
                        normalize: bool = True) -> base.MergeTransformation:
  """``theta = sum_i c_i F_i theta_i / sum_i c_i F_i`` per entry (reducing).

  ``F_i + epsilon`` floors every Fisher; with ``normalize`` each model's
  weight is ``c_i = u_i / sum_j u_j``, ``u_i = 1 / (||F_i|| + epsilon)`` with
  ``||F_i||`` the global L2 norm of model ``i``'s Fisher over all leaves
  (FusionBench's ``normalize_fisher_weight``), else ``c_i = 1``. It merges
  the models' full weights (``[K, ...] -> [...]``), so it is used on its own,
  not after ``task_vectors``.

  Args:
    fishers: per-model Fisher diagonals: a list of K trees like the params
      (`mergejax.stats.fisher_diagonal`), or one tree with a leading model
      axis.
    epsilon: the floor added to every Fisher (traced; FusionBench 1e-6).
    normalize: scale each model's Fisher by the inverse of its global norm.

  Returns:
    A reducing `MergeTransformation`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([0., 4.])}, {'w': jnp.array([2., 0.])}]
    >>> fishers = [{'w': jnp.array([1., 3.])}, {'w': jnp.array([1., 1.])}]
    >>> tx = mj.transforms.fisher_weighted_sum(fishers, epsilon=0.0,
    ...                                        normalize=False)
    >>> mj.merge(tx, None, fts)['w']
    Array([1., 3.], dtype=float32)

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging",
      NeurIPS 2022. https://arxiv.org/abs/2111.09832
  """
  if isinstance(fishers, (list, tuple)):
    if not fishers:
      raise ValueError('fishers is empty: pass one Fisher tree per model.')
    fishers = jax.tree.map(lambda *xs: jnp.stack(
        [jnp.asarray(x, jnp.float32) for x in xs]), *fishers)
  else:
    fishers = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), fishers)
  eps = checks.hparam(epsilon, 'epsilon', low=0.0)

  def init(params):
    if params is not None:
      _check_fishers(fishers, params)
    return FisherWeightState(fishers, eps)

  return base.MergeTransformation(
      init, base.static_fn.of(_fisher_update, normalize=normalize))


def _check_fishers(fishers, params):
  fl, pl = paths.flatten_to_dict(fishers), paths.flatten_to_dict(params)
  paths.require_same_paths(fl, pl, 'fishers')
  for p, f in fl.items():
    if tuple(f.shape[1:]) != tuple(pl[p].shape):
      raise ValueError(f'fishers leaf {p!r} has shape {tuple(f.shape)}; '
                       f'expected [K, *{tuple(pl[p].shape)}].')


def _fisher_update(updates, state, params=None, *, key=None, normalize):
  del params, key
  f = jax.tree.map(lambda x: x + state.epsilon, state.fishers)
  k = jax.tree.leaves(updates)[0].shape[0]
  if jax.tree.leaves(f)[0].shape[0] != k:
    raise ValueError(f'fishers hold {jax.tree.leaves(f)[0].shape[0]} models '
                     f'but {k} models are merged.')
  if normalize:
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(x).reshape(k, -1), axis=1)
                         for x in jax.tree.leaves(f)))
    u = 1.0 / (norms + state.epsilon)
    c = u / jnp.sum(u)
  else:
    c = jnp.ones((k,), jnp.float32)

  def merge(x, fx):
    w = fx * c.reshape((-1,) + (1,) * (fx.ndim - 1))
    return (modelaxis.model_sum(w * x.astype(jnp.float32))
            / modelaxis.model_sum(w))

  return jax.tree.map(merge, updates, f), state
