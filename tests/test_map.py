"""MAP surrogates, Pareto fronts and hypervolumes against plain references."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

S = mj.search


def _random_quadratic(rng, t, d):
  a = rng.normal(size=(t, d, d))
  return S.QuadraticSurrogate(a=jnp.asarray(a + a.transpose(0, 2, 1),
                                            jnp.float32),
                              b=jnp.asarray(rng.normal(size=(t, d)),
                                            jnp.float32),
                              e=jnp.asarray(rng.normal(size=t), jnp.float32))


def _plain_quadratic(s, c):
  return np.array([0.5 * c @ np.asarray(s.a[t]) @ c + np.asarray(s.b[t]) @ c
                   + float(s.e[t]) for t in range(len(s.e))])


@pytest.mark.parametrize('t,d', [(1, 1), (2, 2), (3, 3), (2, 5)])
def test_fit_recovers_an_exact_quadratic(t, d):
  rng = np.random.default_rng(t * 10 + d)
  true = _random_quadratic(rng, t, d)
  c = jnp.asarray(rng.uniform(size=(3 * (1 + d + d * (d + 1) // 2), d)),
                  jnp.float32)
  m = jnp.stack([jnp.asarray(_plain_quadratic(true, np.asarray(ci)))
                 for ci in c])
  got = S.fit_quadratic(c, m)
  for name in ('a', 'b', 'e'):
    np.testing.assert_allclose(getattr(got, name), getattr(true, name),
                               atol=2e-3, err_msg=name)
  np.testing.assert_allclose(S.predict(got, c), m, atol=1e-3)
  # Jit and no-jit agree; the ridge traces (one compile across a sweep).
  fit = jax.jit(lambda r: S.fit_quadratic(c, m, ridge=r))
  sweep = jax.vmap(fit)(jnp.array([0.0, 1e-3, 1.0]))
  np.testing.assert_allclose(sweep.a[0], got.a, atol=2e-3)
  counted = jax.jit(lambda r: S.fit_quadratic(c, m, ridge=r))
  for r in (0.0, 0.5, 2.0):
    counted(jnp.float32(r))
  assert counted._cache_size() == 1  # pylint: disable=protected-access
  # A ridge shrinks the non-constant terms.
  assert (jnp.linalg.norm(sweep.b[2]) < jnp.linalg.norm(sweep.b[0]))


def test_fit_needs_enough_points_or_a_ridge():
  c, m = jnp.zeros((5, 2)), jnp.zeros((5, 2))
  with pytest.raises(ValueError, match='6 unknowns'):
    S.fit_quadratic(c, m)
  assert S.fit_quadratic(c, m, ridge=0.1).a.shape == (2, 2, 2)
  with pytest.raises(ValueError, match=r'\[M, D\]'):
    S.fit_quadratic(jnp.zeros((6, 2)), jnp.zeros((5, 2)))


def _plain_front(o):
  o = np.asarray(o)
  keep = []
  for i, p in enumerate(o):
    if not np.all(np.isfinite(p)):
      keep.append(False)
      continue
    dominated = any(np.all(q >= p) and np.any(q > p) for j, q in enumerate(o)
                    if j != i and np.all(np.isfinite(q)))
    keep.append(not dominated)
  return np.array(keep)


@pytest.mark.parametrize('n,t,chunk', [(1, 2, 4), (7, 2, 3), (40, 3, 16),
                                       (33, 1, 8)])
def test_pareto_mask_is_the_plain_definition(n, t, chunk):
  rng = np.random.default_rng(n)
  o = rng.integers(0, 4, size=(n, t)).astype(np.float32)  # many ties
  if n > 3:
    o[2] = np.nan
    o[3] = o[1]  # a duplicate
  np.testing.assert_array_equal(S.pareto_mask(o, chunk_size=chunk),
                                _plain_front(o))


def _inclusion_exclusion(points, ref):
  total = 0.0
  for size in range(1, len(points) + 1):
    for subset in itertools.combinations(points, size):
      corner = np.min(np.stack(subset), axis=0)
      total += (-1) ** (size + 1) * np.prod(np.maximum(corner - ref, 0))
  return total


@pytest.mark.parametrize('n,t', [(1, 1), (5, 2), (6, 3), (7, 4)])
def test_hypervolume_is_inclusion_exclusion(n, t):
  rng = np.random.default_rng(n + t)
  p = rng.uniform(size=(n, t))
  ref = np.full(t, 0.1)
  np.testing.assert_allclose(S.hypervolume(p, ref),
                             _inclusion_exclusion(p, ref), rtol=1e-5)
  assert S.hypervolume(p, np.ones(t)) == 0.0
  with pytest.raises(ValueError, match='reference'):
    S.hypervolume(p, np.zeros(t + 1))


def _grid(d, steps):
  axes = [np.linspace(0, 1, steps)] * d
  return jnp.asarray(np.stack(np.meshgrid(*axes, indexing='ij'), -1)
                     .reshape(-1, d), jnp.float32)


def test_map_front_matches_the_grid_front_of_an_exact_quadratic():
  true = S.QuadraticSurrogate(a=jnp.stack([-2 * jnp.eye(2)] * 2),
                              b=2 * jnp.eye(2), e=jnp.zeros(2))
  evaluate = lambda c: S.predict(true, c)
  r = S.map_search(evaluate, 2, jax.random.key(0))
  assert r.evaluations == 12 and r.metrics.shape == (12, 2)
  _, predicted = S.surrogate_front(r.surrogate, jax.random.key(1))
  grid = evaluate(_grid(2, 41))
  ref = np.full(2, -2.0)
  np.testing.assert_allclose(S.hypervolume(predicted, ref),
                             S.hypervolume(grid, ref), rtol=1e-2)


def test_adaptive_rounds_add_points_and_are_deterministic():
  f = lambda c: jnp.stack([jnp.sin(3 * c[0]) + c[1], jnp.cos(2 * c[1]) - c[0]])
  r = S.map_search(f, 2, jax.random.key(3), rounds=3, per_round=2,
                   chunk_size=4)
  assert r.evaluations == 12 + 6 and r.coefficients.shape == (18, 2)
  again = S.map_search(f, 2, jax.random.key(3), rounds=3, per_round=2)
  np.testing.assert_array_equal(r.coefficients, again.coefficients)
  np.testing.assert_allclose(r.metrics, jax.vmap(f)(r.coefficients),
                             atol=1e-6)
  # The added points are new (not copies of the design).
  assert len(np.unique(np.asarray(r.coefficients), axis=0)) == 18
  with pytest.raises(ValueError, match='bootstrap'):
    S.map_search(f, 2, jax.random.key(3), rounds=1, bootstrap=1)
  with pytest.raises(ValueError, match='low < high'):
    S.map_search(f, 2, jax.random.key(3), low=1.0, high=1.0)


@pytest.mark.parametrize('n', [2, 3, 5])
def test_nested_map_finds_separable_optima(n):
  target = jnp.linspace(0.3, 0.9, n)
  f = lambda c: 1 - (c - target) ** 2
  c, info = S.nested_map(f, n, jax.random.key(0))
  assert info['evaluations'] == (n - 1) * 13
  np.testing.assert_allclose(c, target, atol=0.05)


def test_nested_map_follows_the_preference():
  # Two tasks that disagree: task 0 wants c = (1, 0), task 1 c = (0, 1).
  f = lambda c: jnp.stack([-(c[0] - 1) ** 2 - c[1] ** 2,
                           -c[0] ** 2 - (c[1] - 1) ** 2])
  c0, _ = S.nested_map(f, 2, jax.random.key(0), preference=[1.0, 0.0])
  c1, _ = S.nested_map(f, 2, jax.random.key(0), preference=[0.0, 1.0])
  np.testing.assert_allclose(c0, [1.0, 0.0], atol=0.05)
  np.testing.assert_allclose(c1, [0.0, 1.0], atol=0.05)
  with pytest.raises(ValueError, match='preference'):
    S.nested_map(f, 2, jax.random.key(0), preference=[1.0])


def test_adaptive_search_resumes_from_its_checkpoint(tmp_path):
  f = lambda c: jnp.stack([jnp.sin(3 * c[0]) + c[1], jnp.cos(2 * c[1]) - c[0]])
  full = S.map_search(f, 2, jax.random.key(3), rounds=4, per_round=2)
  assert full.history['evaluations'].tolist() == [12, 14, 16, 18, 20]
  # A shorter search into the directory stands for an interrupted one.
  S.map_search(f, 2, jax.random.key(3), rounds=2, per_round=2,
               checkpoint_dir=str(tmp_path))
  resumed = S.map_search(f, 2, jax.random.key(3), rounds=4,
                         per_round=2, checkpoint_dir=str(tmp_path),
                         progress=True)
  np.testing.assert_array_equal(resumed.coefficients, full.coefficients)
  np.testing.assert_allclose(resumed.metrics, full.metrics, atol=1e-6)
  np.testing.assert_array_equal(resumed.history['evaluations'],
                                full.history['evaluations'])
  with pytest.raises(ValueError, match='another search'):
    S.map_search(f, 2, jax.random.key(4), rounds=4, per_round=2,
                 checkpoint_dir=str(tmp_path))


def test_nested_map_resumes_node_by_node(tmp_path):
  target = jnp.linspace(0.3, 0.9, 4)
  f = lambda c: 1 - (c - target) ** 2
  full, _ = S.nested_map(f, 4, jax.random.key(0))
  once, _ = S.nested_map(f, 4, jax.random.key(0), checkpoint_dir=str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['level0_node0', 'level0_node1',
                                          'level1_node0']
  again, _ = S.nested_map(f, 4, jax.random.key(0),
                          checkpoint_dir=str(tmp_path))
  np.testing.assert_array_equal(once, full)
  np.testing.assert_array_equal(again, full)
