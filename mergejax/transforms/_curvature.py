"""Curvature from saved optimizer state: weights, grafting masks, compression."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _select as select


def factored_second_moments(second_moments: Any) -> Any:
  """Adafactor's rank-1 approximation of every matrix-shaped ``nu``.

  A leaf with two or more axes is stored as its row and column sums over the
  last two axes, ``r = sum_j nu_ij`` and ``c = sum_i nu_ij``, and read back as
  ``r c^T / sum(r)`` (exact when ``nu`` is rank one); vectors stay as they
  are. Memory per ``m x n`` matrix falls from ``m n`` to ``m + n`` floats.

  Args:
    second_moments: a tree of non-negative ``nu``.

  Returns:
    The reconstruction, a float32 tree like ``second_moments``.

  Raises:
    ValueError: naming the leaf, for negative or NaN/Inf entries.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> nu = {'w': jnp.outer(jnp.array([1., 2.]), jnp.array([3., 1.]))}
    >>> mj.transforms.factored_second_moments(nu)['w']
    Array([[3., 1.],
           [6., 2.]], dtype=float32)

  References:
    Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost", ICML 2018. https://arxiv.org/abs/1804.04235
  """
  def one(v):
    if v.ndim < 2:
      return v
    r = jnp.sum(v, axis=-1, keepdims=True)
    c = jnp.sum(v, axis=-2, keepdims=True)
    total = jnp.sum(r, axis=-2, keepdims=True)
    return jnp.where(total > 0, r * c / jnp.where(total > 0, total, 1.0), 0.0)

  return jax.tree.map(one, _check_second_moments(second_moments,
                                                 'second_moments'))


def _check_second_moments(tree, what):
  return checks.nonnegative_tree(
      tree, what, fix='Adam second moments are non-negative; pass the '
                      'optimizer state nu.')


def _stack(trees, what):
  if isinstance(trees, (list, tuple)):
    if not trees:
      raise ValueError(f'{what} is empty: pass one tree per model.')
    trees = jax.tree.map(lambda *xs: jnp.stack(
        [jnp.asarray(x, jnp.float32) for x in xs]), *trees)
  return _check_second_moments(trees, what)


def _aligned(state_tree, updates, what):
  flat_s = paths.flatten_to_dict(state_tree)
  flat_u = paths.flatten_to_dict(updates)
  paths.require_same_paths(flat_s, flat_u, what)
  for p, u in flat_u.items():
    if flat_s[p].shape != u.shape:
      raise ValueError(f'{what}[{p!r}] has shape {tuple(flat_s[p].shape)}; '
                       f'the task vectors have {tuple(u.shape)} ([K, ...]).')
  return flat_s, flat_u


class FisherGraftState(NamedTuple):
  """Per-model second moments ``[K, ...]`` per leaf and the kept density."""
  second_moments: Any
  density: jax.Array


def fisher_graft(second_moments: Any,
                 density: float | jax.Array = 0.1) -> base.MergeTransformation:
  """Fast Fisher Grafting: keeps each task vector's edits of largest ``nu tau^2``.

  The saliency ``nu_i tau_i^2`` approximates the loss change of resetting an
  edit to the base under the diagonal curvature Adam's second moment ``nu_i``
  gives. Per model and tensor the ``max(1, round(density n))`` most salient
  entries are kept (all for ``density >= 1``, none for ``density <= 0``; ties
  by index) and the rest reset to the base. Acts on task vectors ``[K, ...]``
  and keeps the model axis; the authors' code (``ffg`` in their mergekit
  fork) does the same per tensor, default density 0.1.

  Args:
    second_moments: Adam's ``nu`` per model: a list of K trees like the params
      or one tree with a leading model axis.
    density: the fraction kept per tensor (traced).

  Returns:
    A `MergeTransformation` (model axis preserved).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> T = mj.transforms
    >>> tv = [{'w': jnp.array([1., 2., 3.])}]
    >>> nu = [{'w': jnp.array([100., 1., 1.])}]  # the first entry is sharp
    >>> tx = mj.chain(T.fisher_graft(nu, 1 / 3), T.mean(), T.apply_to_base())
    >>> mj.merge(tx, {'w': jnp.zeros(3)}, tv)['w']
    Array([1., 0., 0.], dtype=float32)

  References:
    Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed
      Model Merging", 2025. https://arxiv.org/abs/2509.11167
  """
  d = checks.hparam(density, 'density')
  nu = _stack(second_moments, 'second_moments')
  return base.MergeTransformation(lambda params: FisherGraftState(nu, d),
                                  base.static_fn.of(_fisher_graft_update))


def _keep(density, n):
  """``max(1, round(density n))`` for ``0 < density < 1``; all / none outside."""
  k = jnp.maximum(1, jnp.round(density * n)).astype(jnp.int32)
  return jnp.where(density >= 1, n, jnp.where(density <= 0, 0, k))


def _fisher_graft_update(updates, state, params=None, *, key=None):
  del params, key
  flat_nu, flat_u = _aligned(state.second_moments, updates, 'second_moments')
  out = {}
  for p, u in flat_u.items():
    k = u.shape[0]
    # Ranking |sqrt(nu) tau| ranks nu tau^2 the same way.
    score = (jnp.sqrt(flat_nu[p]) * u.astype(jnp.float32)).reshape(k, -1)
    keep = jnp.broadcast_to(_keep(state.density, score.shape[1]), (k,))
    masks = select.batched_topk_masks([score], keep)[0]
    out[p] = jnp.where(masks.reshape(u.shape), u, jnp.zeros_like(u))
  return paths.unflatten_like(updates, out), state


class OtaState(NamedTuple):
  """Per-model second moments ``[K, ...]`` per leaf and the floor ``epsilon``."""
  second_moments: Any
  epsilon: jax.Array


NORMALIZE = ('none', 'global')


def ota_reduce(second_moments: Any, *, power: float = 0.5,
               epsilon: float | jax.Array = 1e-8,
               normalize: str = 'none') -> base.MergeTransformation:
  """OTA's curvature-weighted average of task vectors (reducing).

  ``tau = sum_i W_i tau_i / sum_i W_i`` per entry with ``W_i = P_i + epsilon``
  and ``P_i = nu_i ** power`` (Adam's second moment ``nu`` as a diagonal
  curvature; ``power`` 0.5 is the preconditioner Adam applied, 1 a Fisher).
  ``normalize='global'`` divides each model's ``P_i`` by its mean over the
  tensor first, so models trained with different gradient scales weigh alike
  (the authors' option). The weights are applied to task vectors, which is
  the same as weighting the full weights: the weights sum to one.

  Args:
    second_moments: Adam's ``nu`` per model (list of K trees, or one tree with
      a leading model axis).
    power: the exponent (static).
    epsilon: the floor added to every weight (traced).
    normalize: ``'none'`` or ``'global'``.

  Returns:
    A reducing `MergeTransformation` of task vectors ``[K, ...] -> [...]``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> T = mj.transforms
    >>> tvs = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> nu = [{'w': jnp.array([9., 1.])}, {'w': jnp.array([1., 9.])}]
    >>> tx = mj.chain(T.ota_reduce(nu, epsilon=0.0), T.apply_to_base())
    >>> mj.merge(tx, {'w': jnp.zeros(2)}, tvs)['w']
    Array([0.75, 0.75], dtype=float32)

  References:
    Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed
      Model Merging", 2025. https://arxiv.org/abs/2509.11167
  """
  if not power > 0:
    raise ValueError(f'power must be positive, got {power!r}.')
  if normalize not in NORMALIZE:
    raise ValueError(f'normalize must be one of {NORMALIZE}, got '
                     f'{normalize!r}.')
  eps = checks.hparam(epsilon, 'epsilon', low=0.0)
  nu = _stack(second_moments, 'second_moments')
  return base.MergeTransformation(
      lambda params: OtaState(nu, eps),
      base.static_fn.of(_ota_update, power=power, normalize=normalize))


def _ota_update(updates, state, params=None, *, key=None, power, normalize):
  del params, key
  flat_nu, flat_u = _aligned(state.second_moments, updates, 'second_moments')
  out = {}
  for p, u in flat_u.items():
    w = flat_nu[p] ** power
    if normalize == 'global':
      axes = tuple(range(1, w.ndim))
      mean = jnp.mean(w, axis=axes, keepdims=True)
      w = w / (mean + state.epsilon)
    w = w + state.epsilon
    total = jnp.sum(w, axis=0)
    # Entries with no weight at all (epsilon 0 and zero curvature everywhere)
    # keep the plain mean instead of 0/0.
    mean_u = jnp.mean(u.astype(jnp.float32), axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    out[p] = jnp.where(total > 0,
                       jnp.sum(w * u.astype(jnp.float32), axis=0) / safe, mean_u)
  return paths.unflatten_like(updates, out), state
