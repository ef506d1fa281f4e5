"""Tests of the TIES ablation and scaling experiments."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

# configs/ and experiments/ live at the repository root (not installed).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from configs import scaling as scaling_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import ties_ablation as ablation_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import default as default_exp  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import main as launcher  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import scaling  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import ties_ablation  # pylint: disable=g-import-not-at-top,wrong-import-position

PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  # One workdir for both smoke runs: the smoke zoo is trained once.
  return str(tmp_path_factory.mktemp('workdir'))


def _load(workdir, name):
  with open(os.path.join(workdir, name, 'results.json')) as f:
    on_disk = json.load(f)
  with open(os.path.join(workdir, name, 'results.png'), 'rb') as f:
    assert f.read(8) == PNG
  return on_disk


def test_configs_share_the_default_zoo_and_are_locked_by_the_launcher():
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  for mod in (ablation_config, scaling_config):
    for variant in (None, 'smoke'):
      c = mod.get_config(variant)
      assert c.experiment == mod.__name__.rsplit('.', 1)[1]
      assert (default_exp.zoo_hash(c) ==
              default_exp.zoo_hash(default_config.get_config(variant)))
    with pytest.raises(ValueError, match='variant'):
      mod.get_config('hugee')
  err = launcher.check_overrides(['--config=configs/ties_ablation.py',
                                  '--config.densites=(0.1,)'])
  assert 'densities' in err


def test_ablation_smoke_writes_table_json_and_png(workdir):
  config = ablation_config.get_config('smoke')
  config.progress = False
  results = ties_ablation.main(config, workdir)
  r = _load(workdir, 'ties_ablation')
  for key in ('config', 'tasks', 'zoo', 'densities', 'lambdas', 'variants',
              'ablation', 'table', 'density_table', 'seconds'):
    assert key in r, key
  assert r['ablation'] == results['ablation']
  assert set(r['variants']) == {'task_arithmetic', 'trim_only/global',
                                'ties/global/mean', 'ties/global/sum'}
  rows = [a['row'] for a in r['ablation']]
  for needle in ('task arithmetic', 'trim only', 'sign only (mean)',
                 'sign only (sum)', 'TIES (global, mean)', 'TIES (global, sum)'):
    assert any(needle in row for row in rows), (needle, rows)
  for v in r['variants'].values():
    assert v['best']['lambda_'] in r['lambdas']
    for p in v['per_density']:
      assert 0.0 <= p['avg_accuracy'] <= 1.0
  # Trim only at density 1 keeps everything: it is task arithmetic.
  ta = r['variants']['task_arithmetic']['per_density'][0]
  trim1 = r['variants']['trim_only/global']['per_density'][-1]
  assert trim1['density'] == 1.0
  assert trim1['avg_accuracy'] == pytest.approx(ta['avg_accuracy'], abs=1e-6)


def test_scaling_smoke_writes_table_json_and_png(workdir):
  config = scaling_config.get_config('smoke')
  config.progress = False
  results = scaling.main(config, workdir)
  r = _load(workdir, 'scaling')
  assert r['zoo']['cached']  # the ablation's zoo was reused
  for key in ('config', 'tasks', 'ks', 'methods', 'results',
              'base_backbone_task_heads', 'table', 'seconds'):
    assert key in r, key
  assert r['ks'] == [2, 3] and r['results'] == results['results']
  for m in r['methods']:
    for k in r['ks']:
      rec = r['results'][m][str(k)]
      assert list(rec['accuracy']) == r['tasks'][:k]  # the first K tasks
      assert rec['selected']['lambda_'] in config.merge.lambdas


def _toy(k=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {'a': jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
          'b': jnp.asarray(rng.standard_normal((7,)), jnp.float32)}
  fts = [jax.tree.map(lambda x: x + jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(k)]
  return base, fts


def test_density_sweep_is_one_vmapped_call_equal_to_a_loop():
  base, fts = _toy()
  ds = [0.2, 0.5, 1.0]
  key = jax.random.key(0)
  out = ties_ablation.merge_densities('trim_only', dict(scope='global'), base,
                                      fts, ds, key)
  for i, d in enumerate(ds):
    single = mj.merge(ties_ablation.variant_tx('trim_only', d, scope='global'),
                      base, fts)
    for n in base:
      np.testing.assert_allclose(out[n][i], single[n], rtol=1e-6, atol=1e-6)
  # Density 1 keeps everything: task arithmetic.
  ta = mj.merge(mj.methods.task_arithmetic(), base, fts)
  np.testing.assert_allclose(out['a'][-1], ta['a'], rtol=1e-6, atol=1e-6)


def test_lambda_grid_equals_merging_with_that_lambda():
  base, fts = _toy(seed=1)
  lambdas = [0.3, 1.0, 2.0]
  merged = jax.tree.map(lambda x: x[None],
                        mj.merge(mj.methods.task_arithmetic(), base, fts))
  grid = ties_ablation.scale_grid(base, merged, lambdas)
  assert grid['a'].shape == (len(lambdas), 5, 4)
  for j, lam in enumerate(lambdas):
    direct = mj.merge(mj.methods.task_arithmetic(lambda_=lam), base, fts)
    for n in base:
      np.testing.assert_allclose(grid[n][j], direct[n], rtol=1e-5, atol=1e-5)
