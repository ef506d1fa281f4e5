"""Tests of the default experiment, its config and the launcher."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import zoo

# configs/ and experiments/ live at the repository root (not installed); make
# them importable however pytest was started.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from configs import default as default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import default as experiment  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir'))
  config = default_config.get_config('smoke')
  config.progress = False
  return workdir, experiment.main(config, workdir)


def test_smoke_run_writes_results_and_plot(smoke_run):
  workdir, results = smoke_run
  with open(os.path.join(workdir, 'results.json')) as f:
    on_disk = json.load(f)
  for key in ('config', 'tasks', 'zoo', 'baselines', 'methods', 'summary',
              'table', 'seconds'):
    assert key in on_disk, key
  names = on_disk['tasks']
  assert names == list(default_config.get_config('smoke').zoo.tasks)
  for row in ('base', 'base_backbone_task_heads', 'finetuned',
              *(f'finetune/{n}' for n in names)):
    assert set(on_disk['baselines'][row]['accuracy']) == set(names)
  requested = default_config.get_config('smoke').methods_to_run.split(',')
  assert list(on_disk['methods']) == requested
  for name, rec in on_disk['methods'].items():
    if hasattr(mj.methods, name) and rec['protocol'] != 'not_applicable':
      assert rec['status'] == 'ok', (name, rec.get('error'))
      assert set(rec['accuracy']) == set(names)
      assert 0.0 <= rec['avg_accuracy'] <= 1.0
    else:
      assert rec['status'] == 'skipped'
  if hasattr(mj.methods, 'emr'):  # per-task protocol
    assert on_disk['methods']['emr']['status'] == 'ok'
  ta = on_disk['methods']['task_arithmetic']
  assert ta['sweep']['param'] == 'lambda_'
  assert len(ta['sweep']['val_avg_accuracy']) == len(ta['sweep']['values'])
  assert ta['selected']['lambda_'] in ta['sweep']['values']
  assert on_disk['summary']['best_method'] in on_disk['methods']
  # Fine-tuning helped every task, even in the tiny variant.
  ft = on_disk['baselines']['finetuned']['accuracy']
  base = on_disk['baselines']['base']['accuracy']
  assert all(ft[n] > base[n] for n in names)
  with open(os.path.join(workdir, 'results.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert results['summary'] == on_disk['summary']


def test_second_run_reuses_the_cached_zoo(smoke_run, monkeypatch):
  workdir, first = smoke_run
  assert not first['zoo']['cached']

  def no_training(*args, **kwargs):
    raise AssertionError('the cached zoo should have been reused')

  monkeypatch.setattr(zoo, 'train_base', no_training)
  monkeypatch.setattr(zoo, 'finetune', no_training)
  config = default_config.get_config('smoke')
  config.progress = False
  config.methods_to_run = 'task_arithmetic'
  second = experiment.main(config, workdir)
  assert second['zoo']['cached'] and second['zoo']['hash'] == first['zoo']['hash']
  assert (second['baselines']['finetuned'] == first['baselines']['finetuned'])
  # A different zoo config gets its own cache entry.
  config.zoo.width = 8
  assert experiment.zoo_hash(config) != first['zoo']['hash']


def test_sweep_is_one_vmapped_call_and_equals_a_loop():
  rng = np.random.default_rng(0)
  base = {'w': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  fts = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(3)]
  config = default_config.get_config('smoke')
  entry = config.methods.task_arithmetic
  key = jax.random.key(0)
  out, (pname, values), notes = experiment.merge_method(
      'task_arithmetic', entry, base, fts, key)
  assert pname == 'lambda_' and not notes
  assert out['w'].shape == (len(values), 4, 3)
  n = mj._src.merge._run._cache_size()
  out2, _, _ = experiment.merge_method('task_arithmetic', entry, base, fts, key)
  assert mj._src.merge._run._cache_size() == n  # no recompile on a re-run
  for i, v in enumerate(values):
    single = mj.merge(mj.methods.task_arithmetic(lambda_=v), base, fts)
    np.testing.assert_allclose(out['w'][i], single['w'], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out['w'], out2['w'])


def test_protocols_for_two_model_methods():
  base = {'w': jnp.zeros(3)}
  fts = [{'w': jnp.array([1., 0., 0.])}, {'w': jnp.array([0., 2., 0.])},
         {'w': jnp.array([0., 0., 3.])}]
  config = default_config.get_config()
  if hasattr(mj.methods, 'slerp'):
    # sum_endpoint: slerp(t=1) reaches theta_0 + sum tau.
    with config.unlocked():
      config.methods.slerp.sweep.t = (1.0,)
    out, _, _ = experiment.merge_method('slerp', config.methods.slerp, base,
                                        fts, jax.random.key(0))
    np.testing.assert_allclose(out['w'][0], [1., 2., 3.], atol=1e-6)
  if hasattr(mj.methods, 'nuslerp'):
    # fold with weights [i-1, 1]: each model gets an equal share in the end.
    out, sweep, _ = experiment.merge_method(
        'nuslerp', config.methods.nuslerp, base, fts, jax.random.key(0))
    assert sweep is None and out['w'].shape == (1, 3)
    assert np.all(np.asarray(out['w'][0]) > 0)


def test_config_references_and_variants():
  config = default_config.get_config()
  assert len(config.zoo.tasks) >= 6
  config.merge.density = 0.3
  assert config.methods.ties.kwargs.density == 0.3
  assert config.methods.dare_ties.kwargs.density == 0.3
  assert set(config.methods_to_run.split(',')) == set(config.methods)
  for name, entry in config.methods.items():
    assert entry.protocol in experiment.PROTOCOLS, name
  with pytest.raises(ValueError, match='variant'):
    default_config.get_config('hugee')


def _launch(*args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.main', *args], cwd=ROOT,
      capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_launcher_rejects_a_typo_naming_the_valid_fields(tmp_path):
  proc = _launch('--config=configs/default.py:smoke', f'--workdir={tmp_path}',
                 '--config.merge.densty=0.3')
  assert proc.returncode != 0
  err = proc.stderr
  assert 'densty' in err and 'density' in err, err[-2000:]
  assert 'lambdas' in err  # the other valid fields are listed
  assert not os.path.exists(tmp_path / 'results.json')
