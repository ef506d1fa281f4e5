"""Pareto fronts of multi-objective merge metrics, and their hypervolume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _objectives(points, name):
  points = jnp.asarray(points)
  if points.ndim != 2 or points.shape[0] < 1 or points.shape[1] < 1:
    raise ValueError(f'{name}: expected objectives [N, T] with N, T >= 1, got '
                     f'shape {points.shape}.')
  if not jnp.issubdtype(points.dtype, jnp.floating):
    points = points.astype(jnp.float32)
  return points


def pareto_mask(objectives: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
  """Which points are Pareto-optimal (no other point is at least as good in
  every objective and better in one); every objective is maximised.

  Compares every pair, ``chunk_size`` rows at a time so memory holds
  ``chunk_size * N * T`` booleans; duplicates of an optimal point are all
  kept. NaN objectives never dominate and are never optimal.

  Args:
    objectives: ``[N, T]`` metrics of N candidates on T objectives (tasks).
    chunk_size: rows compared at once.

  Returns:
    A boolean ``[N]`` mask of the non-dominated candidates.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.search.pareto_mask(jnp.array([[1., 0.], [0., 1.], [.4, .4],
    ...                                  [.6, .6]]))
    Array([ True,  True, False,  True], dtype=bool)

  References:
    Deb, "Multi-Objective Optimization using Evolutionary Algorithms", 2001.
  """
  o = _objectives(objectives, 'pareto_mask')
  n = o.shape[0]
  finite = jnp.all(jnp.isfinite(o), axis=1)
  # A NaN row neither dominates (its comparisons are False) nor survives.
  safe = jnp.where(finite[:, None], o, -jnp.inf)
  pad = -n % chunk_size
  rows = jnp.concatenate([safe, jnp.broadcast_to(safe[-1:], (pad,) +
                                                 safe.shape[1:])])

  def dominated(block):
    ge = jnp.all(safe[None] >= block[:, None], axis=-1)
    gt = jnp.any(safe[None] > block[:, None], axis=-1)
    return jnp.any(ge & gt & finite[None], axis=1)

  out = jax.lax.map(dominated, rows.reshape(-1, chunk_size, o.shape[1]))
  return ~out.reshape(-1)[:n] & finite


def _hypervolume(points, reference):
  # Slicing along the last objective: between consecutive levels of it, the
  # dominated region is a (T-1)-dimensional hypervolume times the height.
  if points.shape[1] == 1:
    return float(np.max(points[:, 0]) - reference[0])
  order = np.argsort(-points[:, -1])
  points = points[order]
  levels = np.append(points[:, -1], reference[-1])
  total = 0.0
  for i in range(len(points)):
    height = levels[i] - levels[i + 1]
    if height > 0:
      total += height * _hypervolume(points[:i + 1, :-1], reference[:-1])
  return total


def hypervolume(objectives, reference) -> float:
  """The volume dominated by a set of points above a reference point.

  Every objective is maximised; points not above the reference in every
  objective contribute nothing. Exact (slicing along one objective after
  another), computed on the host: meant for fronts of up to a few hundred
  points in a few objectives, the size a merge front has.

  Args:
    objectives: ``[N, T]`` metrics (the front, or any set: dominated points
      add nothing).
    reference: ``[T]``, a point below every point of interest (e.g. the
      base model's metrics, or zeros for accuracies).

  Returns:
    The hypervolume, a float.

  Example:
    >>> import mergejax as mj
    >>> mj.search.hypervolume([[1., 0.5], [0.5, 1.]], [0., 0.])
    0.75

  References:
    While, Hingston, Barone and Huband, "A Faster Algorithm for Calculating
    Hypervolume", IEEE TEVC 2006 (https://doi.org/10.1109/TEVC.2005.851275).
  """
  o = np.asarray(_objectives(objectives, 'hypervolume'), np.float64)
  r = np.asarray(reference, np.float64).reshape(-1)
  if r.shape != (o.shape[1],):
    raise ValueError(f'hypervolume: reference has shape {r.shape}, the '
                     f'objectives have {o.shape[1]} columns; give one '
                     'reference value per objective.')
  o = o[np.all(np.isfinite(o), axis=1) & np.all(o > r, axis=1)]
  if not len(o):
    return 0.0
  o = o[np.asarray(pareto_mask(jnp.asarray(o)))]
  return float(_hypervolume(o, r))
