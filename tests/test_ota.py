"""OTA merging and Fast Fisher Grafting against plain NumPy references."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

M, T = mj.methods, mj.transforms


def _setup(k=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {'d': {'kernel': rng.normal(size=(4, 5)), 'bias': rng.normal(size=5)}}
  fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape), base)
         for _ in range(k)]
  nus = [jax.tree.map(lambda x: rng.uniform(0.0, 2.0, size=x.shape) ** 3, base)
         for _ in range(k)]
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  return cast(base), [cast(f) for f in fts], [cast(n) for n in nus]


def _np_graft(tau, nu, density):
  """Per tensor: keep the max(1, round(density n)) largest nu tau^2 (ties: index)."""
  flat_t, flat_n = np.asarray(tau).ravel(), np.asarray(nu).ravel()
  n = flat_t.size
  k = n if density >= 1 else 0 if density <= 0 else max(1, round(density * n))
  order = np.lexsort((np.arange(n), -(flat_n * flat_t ** 2)))
  keep = np.zeros(n, bool)
  keep[order[:k]] = True
  return np.where(keep, flat_t, 0.0).reshape(np.shape(tau))


def _np_ota(base, fts, nus, *, power, eps, normalize, density):
  out = {}
  for name in ('kernel', 'bias'):
    b = np.asarray(base['d'][name], np.float64)
    taus = [np.asarray(f['d'][name], np.float64) - b for f in fts]
    if density is not None:
      taus = [_np_graft(t, n['d'][name], density) for t, n in zip(taus, nus)]
    ws = []
    for n in nus:
      w = np.asarray(n['d'][name], np.float64) ** power
      if normalize == 'global':
        w = w / (w.mean() + eps)
      ws.append(w + eps)
    out[name] = b + sum(w * t for w, t in zip(ws, taus)) / sum(ws)
  return {'d': out}


@pytest.mark.parametrize('density', [None, 0.3, 1.0, 0.0])
@pytest.mark.parametrize('normalize', ['none', 'global'])
@pytest.mark.parametrize('power', [0.5, 1.0])
def test_ota_matches_the_plain_formula(density, normalize, power):
  base, fts, nus = _setup()
  got = mj.merge(M.ota(nus, power=power, epsilon=1e-6, normalize=normalize,
                       graft_density=density), base, fts)
  want = _np_ota(base, fts, nus, power=power, eps=1e-6, normalize=normalize,
                 density=density)
  testing.assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_equal_curvature_is_the_plain_average():
  base, fts, nus = _setup()
  same = [nus[0]] * 3
  testing.assert_trees_close(
      mj.merge(M.ota(same, graft_density=None), base, fts),
      mj.merge(M.average(), None, fts), rtol=1e-5, atol=1e-5)


def test_graft_density_extremes():
  base, fts, nus = _setup(k=1)
  keep_all = mj.chain(T.task_vectors(), T.fisher_graft(nus, 1.0), T.mean(),
                      T.apply_to_base())
  testing.assert_trees_close(mj.merge(keep_all, base, fts), fts[0], rtol=1e-5,
                             atol=1e-5)
  none = mj.chain(T.task_vectors(), T.fisher_graft(nus, 0.0), T.mean(),
                  T.apply_to_base())
  testing.assert_trees_close(mj.merge(none, base, fts), base, rtol=0, atol=0)


def test_factored_second_moments():
  rng = np.random.default_rng(1)
  r, c = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 4)
  rank1 = {'w': jnp.asarray(np.outer(r, c), jnp.float32),
           'v': jnp.asarray(r, jnp.float32)}
  got = T.factored_second_moments(rank1)
  testing.assert_trees_close(got, rank1, rtol=1e-5, atol=1e-6)
  full = jnp.asarray(rng.uniform(0, 1, (6, 4)), jnp.float32)
  approx = T.factored_second_moments({'w': full})['w']
  np.testing.assert_allclose(approx.sum(0), full.sum(0), rtol=1e-5)
  np.testing.assert_allclose(approx.sum(1), full.sum(1), rtol=1e-5)
  assert float(jnp.min(approx)) >= 0
  # The compressed OTA is OTA on the factorised moments.
  base, fts, nus = _setup()
  testing.assert_trees_close(
      mj.merge(M.ota(nus, compress=True), base, fts),
      mj.merge(M.ota([T.factored_second_moments(n) for n in nus]), base, fts),
      rtol=1e-6, atol=1e-6)


def test_density_and_epsilon_sweep_in_one_compile():
  base, fts, nus = _setup()
  run = lambda d, e: mj.merge(M.ota(nus, graft_density=d, epsilon=e), base, fts)
  a = run(0.2, 1e-8)
  with testing.log_compilations() as log:  # new values: no new compile
    b = run(0.6, 1e-3)
  assert log.count('_run') == 0
  swept = jax.vmap(run)(jnp.array([0.2, 0.6]), jnp.array([1e-8, 1e-3]))
  testing.assert_trees_close(jax.tree.map(lambda x: x[0], swept), a, rtol=1e-5,
                             atol=1e-6)
  testing.assert_trees_close(jax.tree.map(lambda x: x[1], swept), b, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('make, match', [
    (lambda nus: M.ota([jax.tree.map(lambda x: -x, nus[0])] + nus[1:]),
     'negative or NaN'),
    (lambda nus: M.ota([jax.tree.map(lambda x: x * jnp.nan, nus[0])] + nus[1:]),
     'negative or NaN'),
    (lambda nus: M.ota(nus, power=0.0), 'power'),
    (lambda nus: M.ota(nus, normalize='l2'), 'normalize'),
    (lambda nus: M.ota(nus, graft_density=float('nan')), 'density'),
    (lambda nus: M.ota([]), 'empty'),
])
def test_bad_inputs_raise(make, match):
  _, _, nus = _setup()
  with pytest.raises(ValueError, match=match):
    make(nus)


def test_mismatched_second_moments_name_the_leaf():
  base, fts, nus = _setup()
  with pytest.raises(ValueError, match='second_moments'):
    mj.merge(M.ota(nus[:2]), base, fts)  # two curvatures for three models
  wrong = [{'d': {'kernel': n['d']['kernel']}} for n in nus]  # bias missing
  with pytest.raises(ValueError, match='second_moments'):
    mj.merge(M.ota(wrong), base, fts)


def test_the_zoo_keeps_the_fine_tunes_second_moments(tmp_path):
  from experiments import default as default_exp  # pylint: disable=g-import-not-at-top
  from experiments.tools import config_files  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_files.load_sibling(os.path.join(root, 'configs', 'x.py'),
                                     'default.py').get_config('smoke')
  config.progress = False
  _, tasks, _, z, _ = default_exp.build_zoo(config, str(tmp_path))
  bb = z.finetuned['backbone']
  assert jax.tree.structure(z.second_moments) == jax.tree.structure(bb)
  for nu, p in zip(jax.tree.leaves(z.second_moments), jax.tree.leaves(bb)):
    assert nu.shape == p.shape and nu.shape[0] == len(tasks)
    assert bool(jnp.all(nu >= 0)) and bool(jnp.any(nu > 0))


def test_compression_does_not_hide_nan_second_moments():
  # The rank-1 reconstruction maps a NaN matrix to zeros; it must refuse it.
  with pytest.raises(ValueError, match='negative or NaN'):
    T.factored_second_moments({'w': jnp.full((2, 3), jnp.nan)})
