"""Tests of the host LAP solvers (SciPy, LAPJV) and the host weight-matching loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mergejax import permute
from mergejax.permute import _matching as matching
from mergejax.permute import _solvers as solvers
from mergejax.permute import models as M

needs_lap = pytest.mark.skipif(not solvers.have_lapjv(),
                               reason='optional `lap` package not installed')


def _best(c):
  r, col = optimize.linear_sum_assignment(c, maximize=True)
  return col, c[r, col].sum()


def _problems(seed=0):
  """Random, tie-heavy, scaled and nearly solved (planted) problems."""
  rng = np.random.default_rng(seed)
  out = []
  for n in (1, 2, 3, 7, 32, 150):
    out.append(rng.standard_normal((n, n)))
    out.append(rng.integers(0, 3, (n, n)).astype(np.float64))  # many ties
    out.append(np.zeros((n, n)))
    out.append(1e-30 * rng.standard_normal((n, n)))
    out.append(1e6 * rng.standard_normal((n, n)) + 1e9)
    # Nearly solved: a planted permutation plus noise (late sweeps look so).
    p = rng.permutation(n)
    c = 0.3 * rng.standard_normal((n, n))
    c[np.arange(n), p] += 1.0
    out.append(c)
  return out


@pytest.mark.parametrize('solver', ['scipy', 'lapjv', 'auto'])
def test_host_lap_is_optimal(solver):
  for c in _problems():
    p = solvers.host_lap(c, solver)
    n = len(c)
    assert p.dtype == np.int32 and sorted(p.tolist()) == list(range(n))
    _, best = _best(c)
    np.testing.assert_allclose(c[np.arange(n), p].sum(), best,
                               rtol=1e-12, atol=1e-12 * (1 + np.abs(c).max()) * n)


@needs_lap
def test_lapjv_equals_scipy_on_generic_problems():
  # Without ties the optimum is unique: the permutations must be identical.
  rng = np.random.default_rng(1)
  for n in (5, 64, 300):
    for _ in range(3):
      c = rng.standard_normal((n, n))
      np.testing.assert_array_equal(solvers.lapjv_lap(c), _best(c)[0])
      q = rng.permutation(n)  # nearly solved: a planted answer plus noise
      c = 0.5 * c
      c[np.arange(n), q] += 1.0
      np.testing.assert_array_equal(solvers.lapjv_lap(c), _best(c)[0])


def test_lapjv_falls_back_to_scipy(monkeypatch):
  c = np.random.default_rng(2).standard_normal((9, 9))
  monkeypatch.setattr(solvers, '_lap', None)
  assert not solvers.have_lapjv()
  np.testing.assert_array_equal(solvers.lapjv_lap(c), _best(c)[0])
  bad = c.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError):  # SciPy's own error for invalid entries
    solvers.lapjv_lap(bad)


def test_host_lap_batched_and_errors():
  c = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
  p = solvers.host_lap(c, 'lapjv')
  assert p.shape == (2, 3, 6)
  np.testing.assert_array_equal(p[1, 2], _best(c[1, 2])[0])
  assert solvers.host_lap(np.zeros((0, 4, 4))).shape == (0, 4)
  with pytest.raises(ValueError, match='host solver'):
    solvers.host_lap(c, 'hungarian')


def test_lapjv_inside_jit_via_callback():
  c = np.asarray(jax.random.normal(jax.random.key(0), (3, 7, 7)))
  want = np.stack([_best(x)[0] for x in c])
  for s in ('lapjv', 'auto'):
    np.testing.assert_array_equal(
        jax.jit(lambda c, s=s: permute.solve_assignment(c, s))(c), want)
    np.testing.assert_array_equal(permute.solve_assignment(c, s), want)


def _mlps(width=40, depth=3):
  m = M.MLP((width,) * depth)
  a = m.init(jax.random.key(1), jnp.ones((1, 20)))['params']
  b = m.init(jax.random.key(2), jnp.ones((1, 20)))['params']
  return permute.mlp_spec(depth), a, b


def test_weight_matching_host_solvers_agree():
  # Independently initialised models: many sweeps, many LAPs per group; the
  # exact solvers must follow the same trajectory (unique optima).
  spec, a, b = _mlps()
  key = jax.random.key(4)
  res = {s: permute.weight_matching(spec, a, b, key=key, solver=s,
                                    return_costs=True)
         for s in ('scipy', 'lapjv', 'auto')}
  for s in ('lapjv', 'auto'):
    assert int(res[s].sweeps) == int(res['scipy'].sweeps) > 2
    for g in res['scipy'].permutations:
      np.testing.assert_array_equal(res[s].permutations[g],
                                    res['scipy'].permutations[g])
  np.testing.assert_allclose(res['lapjv'].objective,
                             permute.objective(spec, a, b, res['lapjv'].permutations),
                             rtol=1e-5)


def test_host_loop_without_threadpoolctl(monkeypatch):
  spec, a, b = _mlps(width=16, depth=2)
  want = permute.weight_matching(spec, a, b, key=jax.random.key(0))
  monkeypatch.setattr(matching._Blas, '_controller', False)  # pylint: disable=protected-access
  got = permute.weight_matching(spec, a, b, key=jax.random.key(0))
  for g in want:
    np.testing.assert_array_equal(got[g], want[g])


def test_incremental_term_updates_match_full_products():
  rng = np.random.default_rng(5)
  a = rng.standard_normal((3, 3, 16, 24)).astype(np.float32)
  b = rng.standard_normal((3, 3, 16, 24)).astype(np.float32)
  term = matching._IncrementalTerm(a, b, 3, 2)  # pylint: disable=protected-access
  p = np.arange(16)
  for step in range(6):
    q = p.copy()
    k = [1, 2, 5, 16, 9, 0][step]  # partial updates and a full recompute
    idx = rng.choice(16, size=k, replace=False)
    q[idx] = q[rng.permutation(idx)]
    c = term.cost(q)
    want = np.einsum('stki,stkj->ij', a, np.take(b, q, axis=2), dtype=np.float64)
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)
    p = q


@pytest.mark.parametrize('shape,axis,other', [
    ((3, 3, 16, 24), 2, 3),  # conv input axis: a sum of per-tap products
    ((16, 24), 0, 1),        # dense input axis: one GEMM
    ((24, 16), 1, 0),        # dense output axis: transposed GEMM
    ((2, 40, 3, 16), 1, 3),  # leading and trailing dims
    ((40, 2, 16, 3), 2, 0),  # > 32 leading elements: copy fallback
])
def test_incremental_term_layouts(shape, axis, other):
  rng = np.random.default_rng(6)
  a = rng.standard_normal(shape).astype(np.float32)
  b = rng.standard_normal(shape).astype(np.float32)
  term = matching._IncrementalTerm(a, b, axis, other)  # pylint: disable=protected-access
  m = shape[other]
  p = np.arange(m)
  for k in (0, 2, m, 3):
    q = p.copy()
    idx = rng.choice(m, size=k, replace=False)
    q[idx] = q[rng.permutation(idx)]
    want = (matching._mat(np, a, axis).astype(np.float64) @  # pylint: disable=protected-access
            matching._mat(np, np.take(b, q, axis=other), axis).astype(np.float64).T)
    np.testing.assert_allclose(term.cost(q), want, rtol=1e-4, atol=1e-3)
    p = q


@pytest.mark.parametrize('cost, match', [
    (np.full((3, 3), np.nan), 'NaN/Inf'),
    (np.zeros((3, 4)), r'\[\.\.\., n, n\]'),
])
def test_solvers_reject_nan_and_non_square_scores(cost, match):
  with pytest.raises(ValueError, match=match):
    permute.solve_assignment(cost, 'scipy')


@pytest.mark.parametrize('kwargs, match', [
    (dict(tau=0.0), 'tau must be positive'), (dict(tau=float('nan')), 'tau'),
    (dict(tau=-1.0), 'tau'), (dict(n_iter=0), 'n_iter'),
    (dict(n_iter=2.5), 'n_iter')])
def test_sinkhorn_rejects_invalid_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    permute.sinkhorn(jnp.eye(3), **kwargs)


def test_sinkhorn_rejects_nan_cost_but_runs_traced():
  with pytest.raises(ValueError, match='NaN/Inf'):
    permute.sinkhorn(jnp.eye(3).at[0, 1].set(jnp.nan))
  p = jax.jit(lambda c, t: permute.sinkhorn(c, tau=t))(jnp.eye(3) * 5.0, 0.1)
  np.testing.assert_allclose(np.asarray(p).sum(0), 1.0, atol=1e-5)
