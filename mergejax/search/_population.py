"""Evaluating a population of merge candidates in one compiled call."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax._src import paths


def _population_size(population: Any) -> int:
  flat = paths.flatten_to_dict(population)
  if not flat:
    raise ValueError('evaluate_population: the population has no leaves.')
  sizes = {}
  for p, leaf in flat.items():
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(
          f'evaluate_population: population leaf {p!r} is a scalar; every '
          'leaf needs a leading candidate axis [N, ...].')
    sizes[p] = shape[0]
  if len(set(sizes.values())) != 1:
    listed = ', '.join(f'{p!r}: {n}' for p, n in sizes.items())
    raise ValueError(f'evaluate_population: the leaves disagree on the number '
                     f'of candidates (leading axes {listed}); give every leaf '
                     'the same [N, ...].')
  n = next(iter(sizes.values()))
  if n < 1:
    raise ValueError('evaluate_population: the population is empty (N = 0).')
  return n


def population_evaluator(fn: Callable[[Any], Any], *,
                         chunk_size: int | None = None,
                         mesh: Mesh | None = None,
                         axis: str | tuple[str, ...] | None = None
                         ) -> Callable[[Any], Any]:
  """Compiles ``fn`` once for a whole population of candidates.

  ``fn(candidate) -> metrics`` scores one candidate (a pytree of
  hyperparameters: task-wise or layer-wise coefficients, densities, ...),
  typically by merging with traced hyperparameters and evaluating the
  merge; it must be a pure, jit-able function (models and data closed
  over). The returned ``evaluate(population)`` takes the candidates stacked
  on a leading axis (every leaf ``[N, ...]``) and returns ``fn``'s metrics
  stacked the same way, computed as one jit-compiled program:

  * ``chunk_size`` candidates at a time are ``vmap``-ed and the chunks run
    in a ``lax.map``, so memory holds one chunk's merges, not N; None
    evaluates all candidates of a device at once. A population that does
    not fill its chunks is padded with copies of its last candidate, whose
    results are dropped.
  * with ``mesh``, the candidates are split over the mesh's devices (all
    axes, or the named ``axis``) and each device evaluates its share.

  ``evaluate`` compiles once per population shape: a search calling it
  generation after generation compiles once.

  Args:
    fn: ``fn(candidate) -> pytree of arrays``.
    chunk_size: candidates per ``vmap`` (None: all of a device's share).
    mesh: a `jax.sharding.Mesh` to shard the candidate axis over.
    axis: the mesh axis (or axes) for the candidates (default: all).

  Returns:
    ``evaluate(population) -> metrics``, each leaf ``[N, ...]``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> target = jnp.array([0.5, 1.0])
    >>> def score(c):  # squared error of the task-wise merge
    ...   merged = mj.merge(mj.methods.adamerging(c), base, fts)
    ...   return jnp.sum((merged['w'] - target) ** 2)
    >>> evaluate = mj.search.population_evaluator(score, chunk_size=2)
    >>> evaluate(jnp.array([[0.5, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    Array([0.  , 0.25, 1.25], dtype=float32)
  """
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
      chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f'chunk_size must be an int >= 1 or None, got '
                     f'{chunk_size!r}.')
  if mesh is None:
    devices, spec = 1, None
  else:
    names = tuple(mesh.axis_names) if axis is None else (
        (axis,) if isinstance(axis, str) else tuple(axis))
    missing = [a for a in names if a not in mesh.axis_names]
    if missing:
      raise ValueError(f'population_evaluator: axis {missing} not in the '
                       f'mesh axes {tuple(mesh.axis_names)}.')
    devices = math.prod(mesh.shape[a] for a in names)
    spec = P(names if len(names) > 1 else names[0])

  def local(population):
    # One device's share: [n, ...] -> chunks of `chunk_size` under lax.map.
    n = jax.tree.leaves(population)[0].shape[0]
    c = n if chunk_size is None else min(int(chunk_size), n)
    if c == n:
      return jax.vmap(fn)(population)
    chunks = jax.tree.map(lambda x: x.reshape(n // c, c, *x.shape[1:]),
                          population)
    out = jax.lax.map(jax.vmap(fn), chunks)
    return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)

  if mesh is None:
    body = local
  else:
    body = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)

  @functools.partial(jax.jit, static_argnums=1)
  def run(padded, n):
    out = body(padded)
    return jax.tree.map(lambda x: x[:n], out)

  def evaluate(population):
    population = jax.tree.map(jnp.asarray, population)
    n = _population_size(population)
    per_device = -(-n // devices)
    c = per_device if chunk_size is None else min(int(chunk_size), per_device)
    per_device = -(-per_device // c) * c
    total = per_device * devices
    padded = jax.tree.map(
        lambda x: jnp.concatenate(
            [x, jnp.broadcast_to(x[-1:], (total - n, *x.shape[1:]))])
        if total > n else x, population)
    if mesh is not None:
      padded = jax.device_put(padded, NamedSharding(mesh, spec))
    return run(padded, n)

  return evaluate


def evaluate_population(fn: Callable[[Any], Any], population: Any, *,
                        chunk_size: int | None = None,
                        mesh: Mesh | None = None,
                        axis: str | tuple[str, ...] | None = None) -> Any:
  """``fn`` over every candidate of ``population`` (leaves ``[N, ...]``).

  One-shot form of `population_evaluator` (see there); a search that
  evaluates generation after generation should build the evaluator once.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.search.evaluate_population(lambda c: c['a'] * 2,
    ...                               {'a': jnp.arange(3.)})
    Array([0., 2., 4.], dtype=float32)
  """
  return population_evaluator(fn, chunk_size=chunk_size, mesh=mesh,
                              axis=axis)(population)
