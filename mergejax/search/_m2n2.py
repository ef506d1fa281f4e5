"""M2N2: model merging of natural niches, an archive evolved by merging."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import checks
from mergejax.search import _evolve

_HISTORY = ('best', 'mean', 'accepted')


class M2N2Result(NamedTuple):
  """What `m2n2` returns.

  Attributes:
    archive: the final archive, a pytree with a leading axis P (the archive
      size), shaped like the initial one.
    scores: ``[P, J]`` each member's scores on the J training points.
    fitness: ``[P]`` the members' niche fitness (`niche_fitness`).
    history: per step, ``best`` (the best member's mean score), ``mean``
      (the archive's mean score) and ``accepted`` (whether the child entered
      the archive), numpy arrays of length ``steps``.
  """
  archive: Any
  scores: jax.Array
  fitness: jax.Array
  history: dict[str, np.ndarray]


def niche_fitness(scores: jax.Array, alpha: float | jax.Array = 1.0
                  ) -> jax.Array:
  """Fitness under resource competition: ``F_i = sum_j s_ij / z_j``.

  Each training point ``j`` is a resource shared by the members that solve
  it, ``z_j = (sum_k s_kj) ** alpha`` (1 where no member scores), so a point
  few members solve is worth more: the archive keeps diverse niches rather
  than copies of its best member. ``alpha = 0`` is the plain total score.

  Args:
    scores: ``[P, J]`` non-negative scores (M2N2 uses 0/1 correctness).
    alpha: the competition strength (an array, so it can be traced).

  Returns:
    ``[P]`` fitness.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.search.niche_fitness(jnp.array([[1., 1., 0.], [1., 0., 1.],
    ...                                    [1., 1., 0.]]))
    Array([0.8333334, 1.3333334, 0.8333334], dtype=float32)

  References:
    Abrantes, Lange and Tang, "Competition and Attraction Improve Model
    Fusion", GECCO 2025 (https://arxiv.org/abs/2508.16204).
  """
  s = jnp.asarray(scores, jnp.float32)
  return jnp.sum(s / _resource(s, alpha)[None], axis=1)


def _resource(s, alpha):
  total = jnp.sum(s, axis=0)
  z = jnp.where(total > 0, total, 1.0) ** jnp.asarray(alpha, jnp.float32)
  return jnp.where(total > 0, z, 1.0)


def attraction(scores: jax.Array, a: int | jax.Array,
               alpha: float | jax.Array = 1.0) -> jax.Array:
  """How much each member complements member ``a``:
  ``sum_j max(0, s_bj / z_j - s_aj / z_j)`` for every ``b``.

  Args:
    scores: ``[P, J]`` scores.
    a: the index of the first parent.
    alpha: the competition strength of `niche_fitness`.

  Returns:
    ``[P]`` attraction of each member for ``a`` (0 for ``a`` itself).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> mj.search.attraction(jnp.array([[1., 1., 0.], [1., 0., 1.],
    ...                                 [1., 1., 0.]]), 0)
    Array([0., 1., 0.], dtype=float32)
  """
  s = jnp.asarray(scores, jnp.float32)
  r = s / _resource(s, alpha)[None]
  return jnp.sum(jnp.maximum(0.0, r - r[a][None]), axis=1)


def crossover(a: Any, b: Any, key: jax.Array, *,
              split_point: bool = True) -> Any:
  """M2N2's crossover of two models (pytrees of the same structure).

  The models' coordinates are ordered leaf by leaf (the order of
  ``jax.tree.leaves``, each leaf row-major) into one vector of length n.
  Draws a split ``s`` uniform in ``{0, ..., n - 1}`` and a weight ``w``
  uniform in ``(0, 1)``; coordinates before the split interpolate at ``w``,
  the others at ``1 - w``, by SLERP with the angle ``Omega`` between the
  whole models (linear where ``sin Omega <= 1e-6``):
  ``child_k = sin((1 - t_k) Omega) / sin Omega * a_k +
  sin(t_k Omega) / sin Omega * b_k``. Without ``split_point`` every
  coordinate takes ``w``. The split evolves which parts of the network come
  from which parent, without fixed layer boundaries.

  Args:
    a: the first parent.
    b: the second parent.
    key: the PRNG key of ``s`` and ``w``.
    split_point: draw a split (otherwise plain SLERP at ``w``).

  Returns:
    The child, shaped like ``a``.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> c = mj.search.crossover(jnp.ones(4), jnp.zeros(4), jax.random.key(0))
    >>> c.shape
    (4,)
  """
  la, treedef = jax.tree.flatten(a)
  lb = jax.tree.leaves(b)
  n = sum(int(np.size(x)) for x in la)
  k_s, k_w = jax.random.split(key)
  s = jax.random.randint(k_s, (), 0, n) if split_point else jnp.int32(n)
  w = jax.random.uniform(k_w, ())
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  dot = sum(jnp.vdot(f32(x), f32(y)) for x, y in zip(la, lb))
  na = jnp.sqrt(sum(jnp.vdot(f32(x), f32(x)) for x in la))
  nb = jnp.sqrt(sum(jnp.vdot(f32(y), f32(y)) for y in lb))
  omega = jnp.arccos(jnp.clip(dot / jnp.maximum(na * nb, 1e-30), -1.0, 1.0))
  sin = jnp.sin(omega)
  linear = sin <= 1e-6
  safe = jnp.where(linear, 1.0, sin)
  out, offset = [], 0
  for x, y in zip(la, lb):
    index = offset + jnp.arange(np.size(x)).reshape(np.shape(x))
    offset += int(np.size(x))
    t = jnp.where(index < s, w, 1.0 - w)
    wa = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    wb = jnp.where(linear, t, jnp.sin(t * omega) / safe)
    out.append((wa * f32(x) + wb * f32(y)).astype(jnp.result_type(x)))
  return jax.tree.unflatten(treedef, out)


def _choose(k, weights):
  total = jnp.sum(weights)
  p = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0),
                1.0 / weights.shape[0])
  return jax.random.choice(k, weights.shape[0], p=p)


def _score(score_fn, model):
  s = jnp.asarray(score_fn(model), jnp.float32)
  if s.ndim != 1:
    raise ValueError(f'm2n2: score_fn must return scores [J], got shape '
                     f'{s.shape}.')
  return s


@functools.partial(jax.jit, static_argnames=('score_fn',))
def _initial_scores(pop, *, score_fn):
  return jax.vmap(lambda m: _score(score_fn, m))(pop)


@functools.partial(jax.jit, static_argnames=('score_fn', 'steps',
                                             'matchmaker', 'split_point'))
def _run(pop, scores, key, start, alpha, mutation_std, *, score_fn, steps,
         matchmaker, split_point):
  """``steps`` steps from global step ``start``; step ``g`` draws from
  ``fold_in(key, g)``, so any split into segments gives the same run."""
  member = lambda tree, i: jax.tree.map(lambda x: x[i], tree)

  def step(carry, g):
    pop, scores = carry
    k_a, k_b, k_x, k_m = jax.random.split(jax.random.fold_in(key, g), 4)
    fit = niche_fitness(scores, alpha)
    a = _choose(k_a, fit)
    if matchmaker:
      att = attraction(scores, a, alpha)
      pb = jnp.where(jnp.sum(att) > 0, att, fit)
    else:
      pb = fit
    b = _choose(k_b, pb)
    child = crossover(member(pop, a), member(pop, b), k_x,
                      split_point=split_point)
    leaves, treedef = jax.tree.flatten(child)
    keys = jax.random.split(k_m, len(leaves))
    child = jax.tree.unflatten(treedef, [
        x + (mutation_std * jax.random.normal(kk, x.shape)).astype(x.dtype)
        for x, kk in zip(leaves, keys)])
    s_child = _score(score_fn, child)
    all_scores = jnp.concatenate([scores, s_child[None]])
    worst = jnp.argmin(niche_fitness(all_scores, alpha))
    accept = worst != scores.shape[0]
    i = jnp.where(accept, worst, 0)
    pop = jax.tree.map(lambda p, c: jnp.where(accept, p.at[i].set(c), p),
                       pop, child)
    scores = jnp.where(accept, scores.at[i].set(s_child), scores)
    means = jnp.mean(scores, axis=1)
    return (pop, scores), dict(best=jnp.max(means), mean=jnp.mean(means),
                               accepted=accept.astype(jnp.float32))

  (pop, scores), hist = jax.lax.scan(step, (pop, scores),
                                     start + jnp.arange(steps))
  return pop, scores, hist


def m2n2(score_fn: Callable[[Any], jax.Array], archive: Any, key: jax.Array,
         *, steps: int, alpha: float = 1.0, matchmaker: bool = True,
         split_point: bool = True, mutation_std: float = 0.0,
         checkpoint_dir: str | None = None,
         checkpoint_every: int | None = None, keep: int = 2,
         progress: bool = False) -> M2N2Result:
  """Evolves an archive of models by merging (M2N2).

  Each step picks parent A with probability proportional to its niche
  fitness (`niche_fitness`), parent B proportional to its `attraction` for
  A (``matchmaker``; otherwise also by fitness; by fitness too when no
  member complements A, where the reference implementation divides by
  zero), merges them with `crossover` (plus Gaussian noise of
  ``mutation_std``, for evolving from scratch), scores the child on the J
  training points and adds it to the archive: the fitness of all P + 1 is
  recomputed with the child among the competitors, and the worst member is
  dropped unless it is the child. The whole run is one ``lax.scan``,
  compiled once per ``score_fn``, archive shape and ``steps``: ``alpha``
  and ``mutation_std`` are traced, so they can be swept without
  recompiling. A fixed ``key`` gives identical results.

  Args:
    score_fn: ``score_fn(model) -> [J]`` scores of one model on the training
      points (e.g. 0/1 correctness); pure and jit-able, and hashable (the
      same function object reuses the compiled run).
    archive: the initial archive, a pytree of float arrays with a leading
      axis P (P >= 2): merged models (fine-tunes) or random initialisations.
    key: the PRNG key.
    steps: children to create (each costs J forward passes).
    alpha: the competition strength (0: no niches, the total score);
      traced.
    matchmaker: choose B by attraction for A.
    split_point: evolve split points (otherwise plain SLERP crossover).
    mutation_std: standard deviation of the Gaussian noise added to each
      child (0: none); traced.
    checkpoint_dir: where to keep orbax checkpoints (None: none).
    checkpoint_every: steps per compiled segment and between checkpoints
      (None: one segment of ``steps``).
    keep: checkpoints to keep.
    progress: show a tqdm progress bar (per segment).

  Returns:
    An `M2N2Result`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> target = jnp.array([1., -1., 1., -1.])
    >>> score = lambda m: (jnp.sign(m['w']) == target).astype(jnp.float32)
    >>> pop = {'w': jax.random.normal(jax.random.key(0), (8, 4))}
    >>> r = mj.search.m2n2(score, pop, jax.random.key(1), steps=200,
    ...                    mutation_std=0.1)
    >>> float(r.scores.mean(axis=1).max())
    1.0

  References:
    Abrantes, Lange and Tang, "Competition and Attraction Improve Model
    Fusion", GECCO 2025 (https://arxiv.org/abs/2508.16204).
  """
  steps = checks.static_int(steps, 'steps', owner='m2n2', low=1)
  every = checks.static_int(steps if checkpoint_every is None else
                            checkpoint_every, 'checkpoint_every',
                            owner='m2n2', low=1)
  checks.static_int(keep, 'keep', owner='m2n2', low=1)
  leaves = checks.float_tree(archive, 'm2n2: the archive')
  shapes = {p: np.shape(l) for p, l in leaves.items()}
  sizes = {s[0] if s else None for s in shapes.values()}
  if len(sizes) != 1 or None in sizes or sizes.pop() < 2:
    raise ValueError(f'm2n2: every archive leaf needs the same leading axis '
                     f'P >= 2 (the members), got shapes {shapes}.')
  key = _evolve._as_key(key)  # pylint: disable=protected-access
  a32 = jnp.asarray(alpha, jnp.float32)
  m32 = jnp.asarray(mutation_std, jnp.float32)
  pop = archive
  scores = _initial_scores(pop, score_fn=score_fn)
  history = {k: [] for k in _HISTORY}
  meta = dict(shapes=[list(v) for v in shapes.values()],
              members=int(scores.shape[0]), points=int(scores.shape[1]),
              matchmaker=bool(matchmaker), split_point=bool(split_point))
  done = 0
  ckpt = (None if checkpoint_dir is None else
          _evolve.Checkpoints(checkpoint_dir, keep, 'm2n2'))
  bar = None
  try:
    carry = dict(pop=pop, scores=scores, key=jax.random.key_data(key),
                 done=jnp.int32(0))
    if ckpt is not None and ckpt.latest() is not None:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
          carry)
      carry, history = ckpt.restore(ckpt.latest(), abstract, meta)
      if not np.array_equal(np.asarray(carry['key']),
                            np.asarray(jax.random.key_data(key))):
        raise ValueError('m2n2: the checkpoint was written with another key; '
                         'resume with the same key or a new checkpoint_dir.')
    pop, scores, done = carry['pop'], carry['scores'], int(carry['done'])
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=steps, initial=min(done, steps), desc='m2n2')
    while done < steps:
      n = min(every, steps - done)
      pop, scores, hist = _run(pop, scores, key, jnp.int32(done), a32, m32,
                               score_fn=score_fn, steps=n,
                               matchmaker=bool(matchmaker),
                               split_point=bool(split_point))
      for k in _HISTORY:
        history[k].extend(np.asarray(hist[k]).tolist())
      done += n
      if ckpt is not None:
        ckpt.save(done, dict(pop=pop, scores=scores,
                             key=jax.random.key_data(key),
                             done=jnp.int32(done)), history, meta)
      if bar is not None:
        bar.update(n)
        bar.set_postfix(best=f'{history["best"][-1]:.4g}')
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
  history = {k: np.asarray(history[k], bool if k == 'accepted' else
                          np.float32) for k in _HISTORY}
  return M2N2Result(archive=pop, scores=scores,
                    fitness=niche_fitness(scores, alpha), history=history)
