"""Tests of the default experiment, its config and the launcher."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing
from experiments import zoo

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
    if (hasattr(mj.methods, rec.get('factory', name))
        and rec['protocol'] != 'not_applicable'):
      assert rec['status'] == 'ok', (name, rec.get('error'))
      assert set(rec['accuracy']) == set(names)
      assert 0.0 <= rec['avg_accuracy'] <= 1.0
    else:
      assert rec['status'] == 'skipped'
  if hasattr(mj.methods, 'emr'):  # per-task protocol
    assert on_disk['methods']['emr']['status'] == 'ok'
  # The LoRA merges run on the LoRA zoo and appear in the table.
  rank = default_config.get_config('smoke').merge.lora_rank
  for name in ('lora_svd', 'lora_lego', 'lora_ta'):
    rec = on_disk['methods'][name]
    assert rec['status'] == 'ok' and rec['setting'] == {'lora_rank': rank}
    line, = [l for l in on_disk['table'].splitlines()
             if l.startswith(name + ' ') and '(tuned)' not in l]
    assert f'lora_rank={rank}, ' in line, line
  assert on_disk['methods']['lora_ta']['factory'] == 'task_arithmetic'
  assert f'fine-tuned rank {rank}' in on_disk['table']
  assert set(on_disk['baselines'][f'finetuned_lora{rank}']['accuracy']) == set(names)
  assert list(on_disk['lora_zoo']) == [str(rank)]
  ta = on_disk['methods']['task_arithmetic']
  assert ta['sweep']['param'] == 'lambda_'
  assert len(ta['sweep']['val_avg_accuracy']) == len(ta['sweep']['values'])
  assert ta['selected']['lambda_'] in ta['sweep']['values']
  assert on_disk['summary']['best_method'] in on_disk['methods']
  # The tuning protocol: the default setting is a candidate, so the tuned
  # choice is at least as good on validation; its row is in the table.
  budget = default_config.get_config('smoke').tuning.budget
  for name in ('task_arithmetic', 'ties'):
    tuned = on_disk['methods'][name]['tuned']
    assert tuned['status'] == 'ok' and tuned['budget'] == budget
    assert tuned['val_avg_accuracy'] >= tuned['default_val_avg_accuracy']
    assert on_disk['summary']['tuned_avg_accuracy'][name] == (
        tuned['avg_accuracy'])
    assert f'{name} (tuned)' in on_disk['table']
  assert set(on_disk['methods']['ties']['tuned']['selected']) == {
      'lambda_', 'density'}
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
  with testing.log_compilations() as log:
    out2, _, _ = experiment.merge_method('task_arithmetic', entry, base, fts, key)
  assert log.count() == 0  # no recompile on a re-run
  for i, v in enumerate(values):
    single = mj.merge(mj.methods.task_arithmetic(lambda_=v), base, fts)
    np.testing.assert_allclose(out['w'][i], single['w'], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out['w'], out2['w'])


def test_tuning_population_is_one_vmapped_call_and_equals_a_loop():
  rng = np.random.default_rng(1)
  base = {'w': jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
  fts = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(3)]
  config = default_config.get_config('smoke')
  entry = config.methods.ties
  default = dict(density=0.2, lambda_=0.3)
  cands = experiment.tuning_candidates('ties', entry, default, 6,
                                       jax.random.key(0))
  assert cands['density'][0] == 0.2 and cands['lambda_'][0] == 0.3
  assert all(len(v) == 6 for v in cands.values())
  low, high, _ = entry.tune.lambda_
  assert all(low <= v <= high for v in cands['lambda_'])
  # The same key gives the same candidates; another method gets others.
  assert cands == experiment.tuning_candidates('ties', entry, default, 6,
                                               jax.random.key(0))
  key = jax.random.key(0)
  out, (pnames, grid), _ = experiment.merge_method('ties', entry, base, fts,
                                                   key, population=cands)
  assert set(pnames) == {'density', 'lambda_'} and grid == cands
  with testing.log_compilations() as log:
    experiment.merge_method('ties', entry, base, fts, key, population=cands)
  assert log.count() == 0
  kwargs = entry.kwargs.to_dict()
  for i in range(6):
    kw = dict(kwargs, density=cands['density'][i], lambda_=cands['lambda_'][i])
    single = mj.merge(mj.methods.ties(**kw), base, fts, key=key)
    np.testing.assert_allclose(out['w'][i], single['w'], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='no default value'):
    experiment.tuning_candidates('ties', entry, dict(density=0.2), 6, key)
  bad = ml_collections.ConfigDict(dict(tune=dict(lambda_=(1.0, 0.5, 'log'))))
  with pytest.raises(ValueError, match='low < high'):
    experiment.tuning_candidates('x', bad, dict(lambda_=1.0), 4, key)


def test_lora_zoo_is_exact_at_full_rank_and_lora_protocol_matches_dense():
  rng = np.random.default_rng(0)
  base = {'Dense_0': {'kernel': jnp.asarray(rng.standard_normal((6, 5)),
                                            jnp.float32),
                      'bias': jnp.zeros(5)},
          'Dense_1': {'kernel': jnp.asarray(rng.standard_normal((5, 5)),
                                            jnp.float32),
                      'bias': jnp.zeros(5)}}
  fts = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(3)]
  # Full rank: each adapter reproduces its task vector; biases stay dense.
  ads = experiment.lora_zoo(base, fts, None)
  for ad, ft in zip(ads, fts):
    assert isinstance(ad['Dense_0']['kernel'], mj.transforms.LoRA)
    assert ad['Dense_0']['kernel'].a.shape == (6, 5)
    tau = jax.tree.map(jnp.subtract, ft, base)
    jax.tree.map(lambda d, t: np.testing.assert_allclose(d, t, atol=1e-5),
                 mj.transforms.lora_delta(ad), tau)
  low = experiment.lora_zoo(base, fts, 2)
  assert low[0]['Dense_1']['kernel'].b.shape == (2, 5)
  # With full-rank adapters, lora_svd (output rank = input rank) and lora_ta
  # are exactly task arithmetic, for every swept value.
  config = default_config.get_config('smoke')
  key = jax.random.key(0)
  ref, (_, values), _ = experiment.merge_method(
      'task_arithmetic', config.methods.task_arithmetic, base, fts, key)
  for name in ('lora_svd', 'lora_ta'):
    e = config.methods[name].to_dict()
    e['lora_rank'] = None
    out, (_, v), notes = experiment.merge_method(
        name, ml_collections.ConfigDict(e), base, fts, key)
    assert v == values and not notes
    jax.tree.map(lambda o, r: np.testing.assert_allclose(o, r, atol=1e-5),
                 out, ref)
  # At rank 2 lora_svd truncates the summed delta to rank 2.
  out, _, _ = experiment.merge_method('lora_svd', config.methods.lora_svd,
                                      base, fts, key, adapters=low)
  d = np.asarray(out['Dense_1']['kernel'][0] - base['Dense_1']['kernel'])
  assert np.linalg.matrix_rank(d, tol=1e-5) == 2
  out, _, _ = experiment.merge_method('lora_lego', config.methods.lora_lego,
                                      base, fts, key, adapters=low)
  assert jax.tree.structure(out) == jax.tree.structure(base)


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
