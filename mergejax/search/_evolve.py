"""Evolutionary search over merge hyperparameters, resumable, reproducible."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from mergejax._src import checks
from mergejax.search import _population

# Fitness a non-finite candidate gets: the worst finite value, so a strategy's
# ranking and covariance updates stay finite (evosax propagates NaN).
_WORST = -1e30

_HISTORY = ('generation', 'best', 'mean', 'best_so_far', 'evaluations',
            'seconds')


class SearchResult(NamedTuple):
  """What `evolve` returns.

  Attributes:
    best: the best candidate seen (a pytree shaped like ``x0``).
    best_fitness: its fitness (higher is better).
    history: per generation, numpy arrays ``generation``, ``best`` (the
      generation's best fitness), ``mean``, ``best_so_far``, ``evaluations``
      (cumulative) and ``seconds`` (cumulative wall time, across resumes).
    evaluations: the number of fitness evaluations spent.
    state: the strategy's final state (an evosax state).
  """
  best: Any
  best_fitness: float
  history: dict[str, np.ndarray]
  evaluations: int
  state: Any


def _evosax():
  try:
    import evosax.algorithms  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'mergejax.search.evolve needs evosax: pip install "mergejax[search]" '
        '(or pip install "evosax>=0.3.2,<0.4").') from e
  return evosax.algorithms


def _strategy(strategy, population_size, flat0, kwargs):
  algorithms = _evosax()
  if isinstance(strategy, str):
    cls = getattr(algorithms, strategy, None)
    if cls is None or not isinstance(cls, type):
      known = ', '.join(sorted(algorithms.algorithms))
      raise ValueError(f'evolve: unknown strategy {strategy!r}; evosax offers '
                       f'{known}.')
    return cls(population_size=population_size, solution=flat0,
               **(kwargs or {}))
  if kwargs:
    raise ValueError('evolve: strategy_kwargs only apply to a strategy named '
                     'by a string; configure a strategy instance yourself.')
  if getattr(strategy, 'population_size', population_size) != population_size:
    raise ValueError(f'evolve: the strategy has population_size '
                     f'{strategy.population_size}, not {population_size}.')
  return strategy


def _as_key(key):
  """A typed PRNG key from a typed key or a raw ``uint32`` key array."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype != jnp.uint32:
    raise ValueError(f'evolve: key must be a jax.random.key (or raw uint32 '
                     f'key data), got dtype {key.dtype}.')
  return jax.random.wrap_key_data(key)


@contextlib.contextmanager
def _lenient():
  """evosax relies on implicit dtype and rank promotion (bool * float,
  [D] + [N, D]): its calls get JAX's default rules whatever the caller set."""
  with jax.numpy_dtype_promotion('standard'), jax.numpy_rank_promotion('allow'):
    yield


class Checkpoints:
  """The search state in an orbax CheckpointManager, one step per save."""

  def __init__(self, directory, keep, owner='evolve'):
    self._owner = owner
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=False))

  def latest(self):
    return self._manager.latest_step()

  def save(self, step, tree, history, meta):
    args = self._ocp.args
    log = dict(meta=meta, history={k: list(map(float, v))
                                   for k, v in history.items()})
    self._manager.save(step, args=args.Composite(
        state=args.StandardSave(tree), log=args.JsonSave(log)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step, abstract, meta):
    args = self._ocp.args
    log = self._manager.restore(step, args=args.Composite(
        log=args.JsonRestore()))['log']
    if log['meta'] != meta:
      diff = {k: (log['meta'].get(k), v) for k, v in meta.items()
              if log['meta'].get(k) != v}
      raise ValueError(
          f'{self._owner}: the checkpoint in {self._manager.directory} is of '
          f'another search (saved vs now: {diff}); resume with the same '
          'settings and shapes, or use a new checkpoint_dir.')
    state = self._manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract)))['state']
    return state, {k: list(v) for k, v in log['history'].items()}

  def close(self):
    self._manager.close()


def evolve(fitness_fn: Callable[[Any], jax.Array], x0: Any, *,
           key: jax.Array,
           generations: int,
           population_size: int,
           strategy: Any = 'CMA_ES',
           strategy_kwargs: dict[str, Any] | None = None,
           params: dict[str, Any] | None = None,
           maximize: bool = True,
           init_std: float | None = None,
           chunk_size: int | None = None,
           mesh: Mesh | None = None,
           checkpoint_dir: str | None = None,
           checkpoint_every: int = 1,
           keep: int = 2,
           progress: bool = True,
           callback: Callable[[int, dict[str, float]], None] | None = None
           ) -> SearchResult:
  """Evolves merge hyperparameters with an evosax strategy.

  Each generation asks the strategy for ``population_size`` candidates,
  scores them all in one compiled, ``vmap``-ed call of ``fitness_fn``
  (`population_evaluator`: chunked, optionally sharded over ``mesh``) and
  tells the strategy the fitness. ``x0`` is any pytree of float arrays
  (task-wise ``[K]`` or layer-wise ``[L, K]`` coefficients, densities, ...);
  the strategy sees it flattened and ``fitness_fn`` gets it back in shape.

  With ``checkpoint_dir``, the whole search state (strategy state, PRNG key,
  best candidate, generation and history) is written with orbax every
  ``checkpoint_every`` generations, atomically; calling ``evolve`` again
  with the same directory resumes from the latest checkpoint, and an
  interrupted-and-resumed search ends with exactly the result of an
  uninterrupted one (the fitness must be deterministic). A fixed ``key``
  gives identical results.

  Distribution-based strategies (CMA-ES, Sep-CMA-ES, xNES, Open-ES, ...)
  start from the mean ``x0``; population-based ones (SimpleGA,
  DifferentialEvolution, PSO, ...) from ``x0`` plus ``init_std`` times
  Gaussian noise, scored once before the first generation.

  Args:
    fitness_fn: ``fitness_fn(candidate) -> scalar`` (pure, jit-able; higher
      is better unless ``maximize=False``). Non-finite fitness counts as the
      worst.
    x0: the initial candidate (pytree of float arrays).
    key: the PRNG key of the search.
    generations: generations to run in total (a resumed search runs the
      remainder).
    population_size: candidates per generation.
    strategy: an evosax algorithm name (``'CMA_ES'``, ``'Sep_CMA_ES'``,
      ``'SimpleGA'``, ...) or a constructed evosax algorithm.
    strategy_kwargs: constructor arguments for a named strategy.
    params: overrides of the strategy's ``default_params`` (e.g.
      ``{'std_init': 0.1}``).
    maximize: whether higher fitness is better (evosax minimises; the sign
      is handled here).
    init_std: the spread of a population-based strategy's first population
      around ``x0`` (default: the strategy's ``std_init`` if it has one,
      else 1).
    chunk_size: candidates per ``vmap`` (bounds memory).
    mesh: a mesh to shard each generation's candidates over.
    checkpoint_dir: where to keep orbax checkpoints (None: none).
    checkpoint_every: generations between checkpoints (the last one is
      always saved).
    keep: checkpoints to keep.
    progress: show a tqdm progress bar.
    callback: ``callback(generation, info)`` after each generation, with the
      floats of that generation's history row.

  Returns:
    A `SearchResult`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> target = jnp.array([0.3, 0.7])
    >>> r = mj.search.evolve(lambda c: -jnp.sum((c - target) ** 2),
    ...                      jnp.zeros(2), key=jax.random.key(0),
    ...                      generations=40, population_size=8,
    ...                      params={'std_init': 0.3}, progress=False)
    >>> bool(jnp.allclose(r.best, target, atol=1e-2)), r.evaluations
    (True, 320)

  References:
    Hansen, "The CMA Evolution Strategy: A Tutorial", 2016
    (https://arxiv.org/abs/1604.00772); Lange, "evosax: JAX-based
    Evolution Strategies", 2022 (https://arxiv.org/abs/2212.04180);
    Akiba et al., "Evolutionary Optimization of Model Merging Recipes", 2024
    (https://arxiv.org/abs/2403.13187).
  """
  for name, v, low in (('generations', generations, 1),
                       ('population_size', population_size, 2),
                       ('checkpoint_every', checkpoint_every, 1),
                       ('keep', keep, 1)):
    checks.static_int(v, name, owner='evolve', low=low)
  checks.float_tree(x0, 'evolve: x0', fix='Cast coefficients with '
                    'jnp.float32.')
  key = _as_key(key)
  x0 = jax.tree.map(lambda l: jnp.asarray(l, jnp.result_type(l, jnp.float32)),
                    x0)
  flat0, unravel = ravel_pytree(x0)
  with _lenient():
    es = _strategy(strategy, int(population_size), flat0, strategy_kwargs)
    es_params = es.default_params
  if params:
    unknown = sorted(set(params) - set(es_params.__dict__))
    if unknown:
      raise ValueError(f'evolve: {type(es).__name__} has no parameters '
                       f'{unknown}; it has {sorted(es_params.__dict__)}.')
    es_params = es_params.replace(**params)
  population_based = isinstance(
      es, _evosax().population_based.base.PopulationBasedAlgorithm)
  meta = dict(strategy=type(es).__name__, population_size=int(population_size),
              dimension=int(flat0.size), maximize=bool(maximize))
  sign = 1.0 if maximize else -1.0

  def score(flat):
    f = sign * jnp.asarray(fitness_fn(unravel(flat)), jnp.float32)
    if f.shape:
      raise ValueError(f'evolve: fitness_fn must return a scalar, got shape '
                       f'{f.shape}.')
    return jnp.where(jnp.isfinite(f), f, _WORST)

  evaluate = _population.population_evaluator(score, chunk_size=chunk_size,
                                              mesh=mesh)
  def standard(f):
    def g(*args):
      with _lenient():
        return f(*args)
    return g

  ask = jax.jit(standard(es.ask))
  tell = jax.jit(standard(es.tell))
  init = standard(es.init)

  def fresh():
    k, k_init, k_pop = jax.random.split(key, 3)
    evals = 0
    if population_based:
      std = jnp.asarray(getattr(es_params, 'std_init', 1.0) if init_std is None
                        else init_std, jnp.float32)
      pop0 = flat0[None] + std * jax.random.normal(
          k_pop, (int(population_size), flat0.size), flat0.dtype)
      fit0 = evaluate(pop0)
      evals = int(population_size)
      state = init(k_init, pop0, -fit0, es_params)
      i = int(jnp.argmax(fit0))
      best, best_f = pop0[i], fit0[i]
    else:
      state = init(k_init, flat0, es_params)
      best, best_f = flat0, jnp.float32(-jnp.inf)
    return dict(state=state, key=jax.random.key_data(k), best=best,
                best_fitness=jnp.asarray(best_f, jnp.float32),
                generation=jnp.int32(0), evaluations=jnp.int32(evals))

  carry = fresh()
  history = {k: [] for k in _HISTORY}
  ckpt = None if checkpoint_dir is None else Checkpoints(checkpoint_dir, keep)
  try:
    if ckpt is not None and ckpt.latest() is not None:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
          carry)
      carry, history = ckpt.restore(ckpt.latest(), abstract, meta)
    start = int(carry['generation'])
    elapsed = history['seconds'][-1] if history['seconds'] else 0.0
    t0 = time.perf_counter()
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=int(generations), initial=min(start, generations),
                 desc=f'evolve ({type(es).__name__})')
    state, best, best_f = carry['state'], carry['best'], carry['best_fitness']
    k = jax.random.wrap_key_data(carry['key'])
    evals = int(carry['evaluations'])
    for g in range(start, int(generations)):
      k, k_ask, k_tell = jax.random.split(k, 3)
      pop, state = ask(k_ask, state, es_params)
      fit = evaluate(pop)
      state, _ = tell(k_tell, pop, -fit, state, es_params)
      evals += int(population_size)
      i = int(jnp.argmax(fit))
      if fit[i] > best_f:
        best, best_f = pop[i], fit[i]
      row = dict(generation=g, best=sign * float(fit[i]),
                 mean=sign * float(jnp.mean(fit)),
                 best_so_far=sign * float(best_f), evaluations=evals,
                 seconds=elapsed + time.perf_counter() - t0)
      for name in _HISTORY:
        history[name].append(float(row[name]))
      if bar is not None:
        bar.update(1)
        bar.set_postfix(best=f'{row["best_so_far"]:.4g}')
      done = g + 1
      if ckpt is not None and (done % checkpoint_every == 0 or
                               done == generations):
        ckpt.save(done, dict(state=state, key=jax.random.key_data(k),
                             best=best, best_fitness=best_f,
                             generation=jnp.int32(done),
                             evaluations=jnp.int32(evals)), history, meta)
      if callback is not None:
        callback(g, row)
    if bar is not None:
      bar.close()
  finally:
    if ckpt is not None:
      ckpt.close()
  return SearchResult(
      best=unravel(best), best_fitness=sign * float(best_f),
      history={n: np.asarray(history[n], np.int64 if n in (
          'generation', 'evaluations') else np.float64) for n in _HISTORY},
      evaluations=evals, state=state)
