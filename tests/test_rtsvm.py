"""R-TSVM: outlier reweighting, spectrum-adaptive TSV-M reduction, the method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing
from mergejax.transforms import _rtsvm as rtsvm_lib

M = mj.methods


def _heavy_tailed(rng, shape):
  # Student-t task vectors with a low-rank part, so both the outlier and the
  # adaptive-rank steps act.
  t = 0.05 * rng.standard_t(2.0, size=shape)
  if len(shape) == 2:
    t = t + np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
  return t


def _zoo(k=3, seed=0):
  shapes = {'a/kernel': (12, 10), 'a/bias': (10,), 'b/kernel': (10, 14)}
  return testing.random_models(shapes, k, seed=seed, noise=_heavy_tailed)


def _polar(x):
  p, _, qh = np.linalg.svd(x, full_matrices=False)
  return p @ qh


def np_winsor(t, q):
  thr = np.quantile(np.abs(t), q, method='lower')
  return np.clip(t, -thr, thr)


def np_tsv_adaptive(tvs, energy):
  k = len(tvs)
  m, n = tvs[0].shape
  r = min(m, n)
  kk = int(r / k)
  u_cat = np.zeros((m, k * kk)); s_cat = np.zeros(k * kk); vh_cat = np.zeros((k * kk, n))
  for i, t in enumerate(tvs):
    u, s, vh = np.linalg.svd(t, full_matrices=False)
    total = np.sum(t ** 2)
    keep = 0
    while keep < kk and (keep == 0 or energy >= 1 or np.sum(s[:keep] ** 2) < energy * total):
      keep += 1
    u_cat[:, i * kk:i * kk + keep] = u[:, :keep]
    s_cat[i * kk:i * kk + keep] = s[:keep]
    vh_cat[i * kk:i * kk + keep] = vh[:keep]
  return _polar(u_cat) @ np.diag(s_cat) @ _polar(vh_cat)


def np_rtsvm(base, models, alpha, q, energy):
  out = {}
  for grp in base:
    out[grp] = {}
    for leaf in base[grp]:
      b = np.asarray(base[grp][leaf], np.float64)
      tvs = [np_winsor(np.asarray(m[grp][leaf], np.float64) - b, q) for m in models]
      merged = np_tsv_adaptive(tvs, energy) if b.ndim == 2 else np.mean(tvs, 0)
      out[grp][leaf] = b + alpha * merged
  return out


def _close(a, b, tol=2e-4):
  testing.assert_trees_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize('q,energy', [(0.9, 0.6), (0.75, 0.95), (1.0, 0.3)])
def test_rtsvm_matches_numpy(q, energy):
  base, models = _zoo()
  out = mj.merge(M.rtsvm(0.8, quantile=q, energy=energy), base, models)
  jax.tree.map(_close, out, np_rtsvm(base, models, 0.8, q, energy))


def test_neutral_settings_are_tsv_and_steps_change_the_merge():
  base, models = _zoo()
  tsv = mj.merge(M.tsv(alpha=0.7), base, models)
  jax.tree.map(_close, mj.merge(M.rtsvm(0.7, quantile=1.0, energy=1.0), base, models), tsv)
  for kw in (dict(quantile=0.9, energy=1.0), dict(quantile=1.0, energy=0.5)):
    other = mj.merge(M.rtsvm(0.7, **kw), base, models)
    assert not np.allclose(other['a']['kernel'], tsv['a']['kernel'], atol=1e-3), kw


def test_outlier_reweight_matches_numpy_and_keeps_model_axis():
  x = jnp.asarray(np.random.default_rng(1).standard_t(1.5, size=(3, 6, 7)), jnp.float32)
  tx = mj.transforms.outlier_reweight(0.8, exclude='skip')
  out, _ = tx.update({'w': x, 'skip': x}, tx.init(None))
  assert out['w'].shape == x.shape
  for i in range(3):
    _close(out['w'][i], np_winsor(np.asarray(x[i], np.float64), 0.8), 1e-6)
  _close(out['skip'], x, 0)  # excluded: untouched
  out1, _ = tx.update({'w': x, 'skip': x}, mj.transforms.outlier_reweight(1.0).init(None))
  _close(out1['w'], x, 0)


def test_adaptive_rank_keeps_the_fewest_components_reaching_the_energy():
  s = jnp.array([[3., 2., 1.]])
  total = jnp.array([14.])
  got = [np.asarray(rtsvm_lib.adaptive_rank_mask(s, total, e))[0].sum()
         for e in (0.1, 0.64, 0.65, 0.92, 0.93, 1.0)]
  assert got == [1, 1, 2, 2, 3, 3]


def test_jit_equals_eager_no_recompile_and_vmap_sweep():
  base, models = _zoo()
  tx = M.rtsvm(0.5, quantile=0.9, energy=0.7)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
  eager, _ = tx.update(stacked, tx.init(base), base)
  jitted, _ = jax.jit(tx.update)(stacked, tx.init(base), base)
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), eager, jitted)

  mj.merge(M.rtsvm(0.5, quantile=0.9, energy=0.7), base, models)
  with testing.log_compilations() as log:
    for v in (0.6, 0.95):
      mj.merge(M.rtsvm(v, quantile=v, energy=v), base, models)
  assert log.count('_run') == 0

  es = jnp.array([0.4, 0.8, 1.0])
  sweep = jax.jit(jax.vmap(lambda e: mj.merge(M.rtsvm(quantile=0.9, energy=e),
                                                base, models)))(es)
  for i, e in enumerate(es):
    single = mj.merge(M.rtsvm(quantile=0.9, energy=float(e)), base, models)
    jax.tree.map(lambda s, o: _close(s[i], o, 1e-5), sweep, single)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match=r'quantile must lie in \[0.0, 1.0\]'):
    M.rtsvm(quantile=1.5)
  with pytest.raises(ValueError, match=r'energy must lie in \(0.0, 1.0\]'):
    M.rtsvm(energy=0.0)
  with pytest.raises(ValueError, match='other must be one of'):
    M.rtsvm(other='median')
  base = {'big': jnp.zeros((8, 8)), 'tiny': jnp.zeros((2, 6))}
  models = [jax.tree.map(lambda x, i=i: x + i + 1.0, base) for i in range(3)]
  with pytest.raises(ValueError, match=r"leaf 'tiny' is a 2x6 matrix"):
    mj.merge(M.rtsvm(), base, models)
  out = mj.merge(M.rtsvm(quantile=1.0, energy=1.0, exclude='tiny'), base, models)
  _close(out['tiny'], np.full((2, 6), 2.0))  # excluded: mean task vector
