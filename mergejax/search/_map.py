"""MAP: amortised Pareto fronts of merge coefficients from quadratic fits."""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import checks
from mergejax.search import _evolve
from mergejax.search import _pareto
from mergejax.search import _population


class QuadraticSurrogate(NamedTuple):
  """Per-objective quadratic models ``m_t(c) = c^T A_t c / 2 + b_t^T c + e_t``.

  Attributes:
    a: ``[T, D, D]`` symmetric curvature matrices.
    b: ``[T, D]`` linear terms.
    e: ``[T]`` constants.
  """
  a: jax.Array
  b: jax.Array
  e: jax.Array


class MapResult(NamedTuple):
  """What `map_search` and `nested_map` return.

  Attributes:
    coefficients: ``[M, D]`` every coefficient vector evaluated.
    metrics: ``[M, T]`` their measured metrics.
    surrogate: the `QuadraticSurrogate` fitted to all of them (for
      `nested_map`, the root's, over the two halves' mean metrics).
    evaluations: M, the number of evaluations spent.
    history: per design (the first, then each adaptive round), numpy
      arrays ``evaluations`` (cumulative) and ``spread`` (the largest
      bootstrap spread among the points added; NaN for the first design);
      None for `nested_map`.
  """
  coefficients: jax.Array
  metrics: jax.Array
  surrogate: QuadraticSurrogate
  evaluations: int
  history: dict[str, np.ndarray] | None = None


def _features(c):
  """``[1, c_i, c_i c_j (i <= j)]`` of ``c [..., D]``."""
  d = c.shape[-1]
  i, j = np.triu_indices(d)
  return jnp.concatenate([jnp.ones(c.shape[:-1] + (1,), c.dtype), c,
                          c[..., i] * c[..., j]], axis=-1)


def fit_quadratic(coefficients: jax.Array, metrics: jax.Array, *,
                  ridge: float | jax.Array = 0.0) -> QuadraticSurrogate:
  """Least-squares quadratic surrogates of metrics over coefficients.

  Fits, for every objective ``t`` independently, the full quadratic in the
  coefficients (``1 + D + D (D + 1) / 2`` unknowns) to the measured metrics,
  as MAP does instead of computing Hessians. ``ridge`` adds
  ``ridge * ||theta||^2`` on the non-constant terms (0: plain least squares,
  which needs at least as many well-spread points as unknowns).

  Args:
    coefficients: ``[M, D]`` evaluated coefficient vectors.
    metrics: ``[M, T]`` (or ``[M]``) their metrics.
    ridge: the ridge penalty (an array, so it can be traced).

  Returns:
    A `QuadraticSurrogate` with T objectives.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> c = jax.random.uniform(jax.random.key(0), (20, 2))
    >>> m = 1.0 - jnp.sum((c - 0.5) ** 2, axis=1)
    >>> s = mj.search.fit_quadratic(c, m)
    >>> jnp.allclose(s.a[0], -2 * jnp.eye(2), atol=1e-3).item()
    True

  References:
    Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts
    via Quadratic Approximation", ICLR 2025 (https://arxiv.org/abs/2406.07529).
  """
  c = jnp.asarray(coefficients, jnp.float32)
  m = jnp.asarray(metrics, jnp.float32)
  m = m[:, None] if m.ndim == 1 else m
  if c.ndim != 2 or m.ndim != 2 or m.shape[0] != c.shape[0]:
    raise ValueError(f'fit_quadratic: expected coefficients [M, D] and '
                     f'metrics [M, T] with the same M, got {c.shape} and '
                     f'{jnp.shape(metrics)}.')
  d = c.shape[1]
  x = _features(c)
  p = x.shape[1]
  if isinstance(ridge, (int, float)) and ridge <= 0 and c.shape[0] < p:
    raise ValueError(
        f'fit_quadratic: {c.shape[0]} points cannot determine a quadratic in '
        f'{d} coefficients ({p} unknowns); evaluate at least {p} points or '
        'set ridge > 0.')
  # The ridge as extra rows sqrt(ridge) * I (constant unpenalised), so one
  # least-squares solve of the design itself: no squared condition number
  # from normal equations.
  root = jnp.sqrt(jnp.asarray(ridge, jnp.float32))
  x = jnp.concatenate([x, root * jnp.eye(p)[1:]])
  m_aug = jnp.concatenate([m, jnp.zeros((p - 1, m.shape[1]))])
  theta = jnp.linalg.lstsq(x, m_aug)[0]  # [p, T]
  i, j = np.triu_indices(d)
  quad = theta[1 + d:]  # [D (D + 1) / 2, T]
  # m = sum_{i<=j} q_ij c_i c_j = c^T A c / 2 with A_ii = 2 q_ii, A_ij = q_ij.
  a = jnp.zeros((m.shape[1], d, d)).at[:, i, j].add(quad.T)
  a = a + jnp.swapaxes(a, 1, 2)
  return QuadraticSurrogate(a=a, b=theta[1:1 + d].T, e=theta[0])


def predict(surrogate: QuadraticSurrogate, coefficients: jax.Array
            ) -> jax.Array:
  """The surrogate's metrics ``[..., T]`` at coefficients ``[..., D]``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> s = mj.search.QuadraticSurrogate(a=-2 * jnp.eye(2)[None],
    ...                                  b=jnp.ones((1, 2)), e=jnp.zeros(1))
    >>> mj.search.predict(s, jnp.array([0.5, 0.5]))
    Array([0.5], dtype=float32)
  """
  c = jnp.asarray(coefficients, jnp.float32)
  quad = 0.5 * jnp.einsum('...i,tij,...j->...t', c, surrogate.a, c)
  e = jnp.reshape(surrogate.e, (1,) * (c.ndim - 1) + (-1,))
  return quad + c @ surrogate.b.T + e


def _box(key, n, d, low, high):
  return jax.random.uniform(key, (n, d), jnp.float32, low, high)


def surrogate_front(surrogate: QuadraticSurrogate, key: jax.Array, *,
                    samples: int = 8192, low: float = 0.0, high: float = 1.0,
                    ) -> tuple[jax.Array, jax.Array]:
  """The Pareto front the surrogate predicts over a box of coefficients.

  The surrogate costs a few flops per candidate, so instead of NSGA-III
  (the MAP paper's choice) the box is sampled densely and the predicted
  non-dominated candidates are kept: exact up to the sampling density,
  deterministic under ``key``, and free of an evolutionary loop's settings.

  Args:
    surrogate: a `QuadraticSurrogate` over D coefficients.
    key: the PRNG key of the samples.
    samples: candidates drawn uniformly in ``[low, high]^D``.
    low: the box's lower bound.
    high: the box's upper bound.

  Returns:
    ``(coefficients [F, D], predicted [F, T])`` of the F front candidates.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> # -|c - (1, 0)|^2 and -|c - (0, 1)|^2: the front is c_0 + c_1 = 1.
    >>> s = mj.search.QuadraticSurrogate(
    ...     a=jnp.stack([-2 * jnp.eye(2)] * 2), b=2 * jnp.eye(2),
    ...     e=-jnp.ones(2))
    >>> c, m = mj.search.surrogate_front(s, jax.random.key(0))
    >>> bool(jnp.all(jnp.abs(c.sum(axis=1) - 1) < 0.1))
    True
  """
  d = surrogate.b.shape[1]
  c = _box(key, int(samples), d, low, high)
  m = predict(surrogate, c)
  keep = np.asarray(_pareto.pareto_mask(m))
  return c[keep], m[keep]


def _check_evaluate(fn, owner):
  if not callable(fn):
    raise ValueError(f'{owner}: evaluate must be a function of a '
                     f'coefficient vector [D] returning metrics [T], got '
                     f'{fn!r}.')


def map_search(evaluate: Callable[[jax.Array], jax.Array], dimension: int,
               key: jax.Array, *, initial: int | None = None,
               rounds: int = 0, per_round: int = 4, proposals: int = 2048,
               bootstrap: int = 16, low: float = 0.0, high: float = 1.0,
               ridge: float = 0.0, chunk_size: int | None = None,
               checkpoint_dir: str | None = None, keep: int = 2,
               progress: bool = False) -> MapResult:
  """MAP: fit quadratic surrogates to a few evaluated merges, optionally
  sampling more where the surrogates are uncertain.

  ``evaluate(c) -> metrics [T]`` measures one merge with coefficients
  ``c [D]`` (task arithmetic with one coefficient per task vector: ``D = T``);
  it is run over each design as one vmapped population
  (`population_evaluator`). The first design is ``initial`` points uniform in
  ``[low, high]^D`` (default: twice the surrogate's unknowns). With
  ``rounds > 0`` (MAP's Bayesian variant, here designed as a bootstrap):
  ``bootstrap`` surrogates are fitted to resampled designs, and the
  ``per_round`` of ``proposals`` random candidates with the largest spread of
  predictions (summed over objectives) are evaluated next, ``rounds`` times.
  The paper's Bayesian MAP samples adaptively with a Bayesian model of the
  surrogate's error; the bootstrap spread plays that role without a prior.

  Args:
    evaluate: the metric function (pure, jit-able).
    dimension: D, the number of coefficients.
    key: the PRNG key of the designs.
    initial: points in the first design.
    rounds: adaptive-sampling rounds.
    per_round: points added per round.
    proposals: candidates scored by the bootstrap spread per round.
    bootstrap: bootstrap surrogates per round.
    low: the box's lower bound.
    high: the box's upper bound.
    ridge: `fit_quadratic`'s ridge.
    chunk_size: candidates per vmap when evaluating (bounds memory).
    checkpoint_dir: where to keep orbax checkpoints of the evaluated design
      after the first design and every round (None: none); calling again
      with the same directory and key resumes, and ends as an uninterrupted
      search.
    keep: checkpoints to keep.
    progress: show a tqdm bar over the rounds.

  Returns:
    A `MapResult`; its surrogate's front is `surrogate_front`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> f = lambda c: jnp.stack([1 - (c[0] - 1) ** 2 - c[1] ** 2,
    ...                          1 - c[0] ** 2 - (c[1] - 1) ** 2])
    >>> r = mj.search.map_search(f, 2, jax.random.key(0))
    >>> r.evaluations, bool(jnp.allclose(r.surrogate.a[0], -2 * jnp.eye(2),
    ...                                   atol=1e-3))
    (12, True)

  References:
    Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts
    via Quadratic Approximation", ICLR 2025 (https://arxiv.org/abs/2406.07529).
  """
  _check_evaluate(evaluate, 'map_search')
  d = checks.static_int(dimension, 'dimension', owner='map_search', low=1)
  unknowns = 1 + d + d * (d + 1) // 2
  initial = 2 * unknowns if initial is None else initial
  for name, v, least in (('initial', initial, 1), ('rounds', rounds, 0),
                         ('per_round', per_round, 1),
                         ('proposals', proposals, 1),
                         ('bootstrap', bootstrap, 2), ('keep', keep, 1)):
    checks.static_int(v, name, owner='map_search', low=least)
  if not high > low:
    raise ValueError(f'map_search: the box needs low < high, got [{low}, '
                     f'{high}].')
  run = _population.population_evaluator(
      lambda c: jnp.atleast_1d(jnp.asarray(evaluate(c), jnp.float32)),
      chunk_size=chunk_size)
  k_init, k_rounds = jax.random.split(key)
  fit = jax.jit(lambda c, m: fit_quadratic(c, m, ridge=ridge))
  meta = dict(dimension=d, initial=initial, per_round=int(per_round),
              low=float(low), high=float(high),
              key=np.asarray(jax.random.key_data(key)).tolist())
  ckpt = (None if checkpoint_dir is None else
          _evolve.Checkpoints(checkpoint_dir, keep, 'map_search'))
  history = {'evaluations': [], 'spread': []}
  bar = None
  try:
    done = -1  # rounds finished; -1: not even the first design
    if ckpt is not None and ckpt.latest() is not None:
      done = ckpt.latest() - 1
      size = initial + done * int(per_round)
      width = jax.eval_shape(
          lambda v: jnp.atleast_1d(jnp.asarray(evaluate(v), jnp.float32)),
          jnp.zeros(d, jnp.float32)).shape[0]
      abstract = dict(c=jax.ShapeDtypeStruct((size, d), jnp.float32),
                      m=jax.ShapeDtypeStruct((size, width), jnp.float32))
      state, history = ckpt.restore(ckpt.latest(), abstract, meta)
      c, m = jnp.asarray(state['c']), jnp.asarray(state['m'])
    else:
      c = _box(k_init, initial, d, low, high)
      m = run(c)
      history = {'evaluations': [int(c.shape[0])], 'spread': [float('nan')]}
      done = 0
      if ckpt is not None:
        ckpt.save(1, dict(c=c, m=m), history, meta)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=int(rounds), initial=min(done, int(rounds)),
                 desc='map_search')
    for r in range(done, int(rounds)):
      k_boot, k_prop = jax.random.split(jax.random.fold_in(k_rounds, r))
      idx = jax.random.randint(k_boot, (bootstrap, c.shape[0]), 0,
                               c.shape[0])
      # A resample may repeat points; a small ridge keeps every fit defined.
      fits = jax.vmap(lambda i, c=c, m=m: fit_quadratic(
          c[i], m[i], ridge=max(ridge, 1e-6)))(idx)
      cand = _box(k_prop, int(proposals), d, low, high)
      preds = jax.vmap(predict, in_axes=(0, None))(fits, cand)  # [B, P, T]
      spread = jnp.sum(jnp.std(preds, axis=0), axis=-1)
      top, pick = jax.lax.top_k(spread, int(per_round))
      new = cand[pick]
      c, m = jnp.concatenate([c, new]), jnp.concatenate([m, run(new)])
      history['evaluations'].append(int(c.shape[0]))
      history['spread'].append(float(top[0]))
      if ckpt is not None:
        ckpt.save(r + 2, dict(c=c, m=m), history, meta)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
  return MapResult(coefficients=c, metrics=m, surrogate=fit(c, m),
                   evaluations=int(c.shape[0]),
                   history={k: np.asarray(v) for k, v in history.items()})


def nested_map(evaluate: Callable[[jax.Array], jax.Array], num_tasks: int,
               key: jax.Array, *, preference: Sequence[float] | None = None,
               initial: int = 12, samples: int = 4096, low: float = 0.0,
               high: float = 2.0, verify: bool = True,
               chunk_size: int | None = None,
               checkpoint_dir: str | None = None) -> tuple[jax.Array, Any]:
  """Nested MAP: many tasks merged as a tree of two-objective MAP problems.

  Tasks are paired (then pairs of pairs, ...); at each node the two
  children's coefficient vectors are rescaled by ``(alpha, beta)`` found by a
  2-D `map_search` whose objectives are the two children's mean metrics, and
  the node keeps the front point that maximises the preference-weighted
  mean (``preference``: one weight per task, uniform by default). Leaves
  start at coefficient 1, so ``(alpha, beta)`` in ``[0, 2]`` lets a node both
  shrink and grow its children's coefficients. With ``verify`` (a design
  choice beyond the paper, one evaluation per node) the surrogate's pick is
  measured and replaced by the best measured design point when that one
  scores higher: a quadratic fitted to accuracies extrapolates worst at the
  box's edges, where a front's preferred point tends to lie. The cost grows
  as ``(num_tasks - 1) * (initial + verify)`` evaluations instead of a
  ``num_tasks``-dimensional design.

  Args:
    evaluate: ``evaluate(c [num_tasks]) -> metrics [num_tasks]`` (tasks not
      in the current node get coefficient 0).
    num_tasks: the number of tasks (coefficients).
    key: the PRNG key.
    preference: per-task weights of the choice at each node.
    initial: points per node's 2-D design.
    samples: candidates of each node's surrogate front.
    low: the box's lower bound of ``(alpha, beta)``.
    high: the box's upper bound of ``(alpha, beta)``.
    verify: measure each node's surrogate pick against its best design point.
    chunk_size: candidates per vmap when evaluating.
    checkpoint_dir: one `map_search` checkpoint directory per node below it
      (None: none); a resumed run restores the finished nodes' designs
      instead of evaluating them again.

  Returns:
    ``(coefficients [num_tasks], info)`` with info a dict of ``evaluations``
    and the root's `MapResult` (``root``).

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> f = lambda c: 1 - (c - 0.5) ** 2
    >>> c, info = mj.search.nested_map(f, 4, jax.random.key(0))
    >>> info['evaluations'], bool(jnp.allclose(c, 0.5, atol=0.05))
    (39, True)

  References:
    Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts
    via Quadratic Approximation", ICLR 2025 (https://arxiv.org/abs/2406.07529).
  """
  _check_evaluate(evaluate, 'nested_map')
  n = checks.static_int(num_tasks, 'num_tasks', owner='nested_map', low=2)
  checks.static_int(initial, 'initial', owner='nested_map', low=1)
  w = np.ones(n) if preference is None else np.asarray(preference, np.float64)
  if w.shape != (n,) or np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f'nested_map: preference must be {n} non-negative '
                     f'weights, not all zero; got {preference!r}.')
  # A node: (tasks, coefficient vector over all tasks, zero outside them).
  nodes = [((t,), jnp.zeros(n).at[t].set(1.0)) for t in range(n)]
  evaluations, root, level = 0, None, 0
  while len(nodes) > 1:
    merged = []
    for i in range(0, len(nodes) - 1, 2):
      (ta, ca), (tb, cb) = nodes[i], nodes[i + 1]
      ia, ib = np.asarray(ta), np.asarray(tb)

      def halves(ab, ca=ca, cb=cb, ia=ia, ib=ib):
        m = jnp.asarray(evaluate(ab[0] * ca + ab[1] * cb), jnp.float32)
        return jnp.stack([jnp.mean(m[ia]), jnp.mean(m[ib])])

      k = jax.random.fold_in(jax.random.fold_in(key, level), i)
      node_dir = (None if checkpoint_dir is None else
                  os.path.join(checkpoint_dir, f'level{level}_node{i // 2}'))
      r = map_search(halves, 2, k, initial=initial, low=low, high=high,
                     chunk_size=chunk_size, checkpoint_dir=node_dir)
      evaluations += r.evaluations
      ab, pred = surrogate_front(r.surrogate, jax.random.fold_in(k, 1),
                                 samples=samples, low=low, high=high)
      pref = jnp.array([w[ia].sum(), w[ib].sum()], jnp.float32)
      best = ab[int(jnp.argmax(pred @ pref))]
      if verify:
        # The surrogate is least reliable where the choice usually lands, at
        # the edge of the box: measure its pick and keep the best measured
        # design point instead when that one is better.
        picked = float(jnp.asarray(halves(best)) @ pref)
        evaluations += 1
        j = int(jnp.argmax(r.metrics @ pref))
        if float(r.metrics[j] @ pref) > picked:
          best = r.coefficients[j]
      merged.append((ta + tb, best[0] * ca + best[1] * cb))
      root = r
    if len(nodes) % 2:
      merged.append(nodes[-1])
    nodes, level = merged, level + 1
  return nodes[0][1], dict(evaluations=evaluations, root=root)
