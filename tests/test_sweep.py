"""Sweeps: product/zip, vmapped == loop, one compile, structural groups."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing
from experiments.tools import sweep as sweep_lib


def _zoo(k=3, seed=0):
  return testing.random_models({'a/w': (6, 5), 'b': (7,)}, k, seed=seed)


def _config(**merge):
  cfg = ml_collections.ConfigDict({'merge': dict(method='task_arithmetic',
                                                 lambda_=1.0, **merge),
                                   'seed': 0})
  cfg.lock()
  return cfg


def test_product_and_zip():
  pts = sweep_lib.product(sweep_lib.sweep('config.merge.a', [1, 2]), {'b': [3, 4, 5]})
  assert len(pts) == 6
  assert pts[0] == {'merge.a': 1, 'b': 3} and pts[-1] == {'merge.a': 2, 'b': 5}
  z = sweep_lib.zip_({'a': [1, 2]}, sweep_lib.sweep('b', [3, 4]))
  assert z == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  assert sweep_lib.zip_sweep is sweep_lib.zip_
  with pytest.raises(ValueError, match='equal length'):
    sweep_lib.zip_(sweep_lib.sweep('a', [1, 2]), sweep_lib.sweep('b', [1]))
  with pytest.raises(ValueError, match='one axis only'):
    sweep_lib.product(sweep_lib.sweep('a', [1]), sweep_lib.sweep('a', [2]))


def test_apply_overrides_typo_names_fields():
  cfg = _config()
  new = sweep_lib.apply_overrides(cfg, {'merge.lambda_': 0.3})
  assert new.merge.lambda_ == 0.3 and cfg.merge.lambda_ == 1.0
  with pytest.raises(KeyError, match='lambda_'):
    sweep_lib.apply_overrides(cfg, {'merge.lambda': 0.3})


def test_merge_sweep_equals_loop():
  base, models = _zoo()
  lams = [0.1, 0.5, 1.3]
  got = sweep_lib.merge_sweep({'method': 'task_arithmetic'},
                              {'lambda_': lams}, base, models)
  for i, lam in enumerate(lams):
    want = mj.merge(mj.methods.task_arithmetic(lambda_=lam), base, models)
    jax.tree.map(lambda g, w, i=i: np.testing.assert_allclose(
        g[i], w, rtol=1e-6, atol=1e-6), got, want)


def test_merge_sweep_per_model_weights():
  base, models = _zoo(k=2)
  ws = [[1.0, 0.0], [0.0, 1.0]]
  got = sweep_lib.merge_sweep({'method': 'linear'}, {'weight': ws}, None,
                              models)
  np.testing.assert_allclose(got['b'][0], models[0]['b'], rtol=1e-6)
  np.testing.assert_allclose(got['b'][1], models[1]['b'], rtol=1e-6)


def test_merge_sweep_compiles_once():
  base, models = _zoo()
  sweep_lib.merge_sweep({'method': 'task_arithmetic'}, {'lambda_': [0.1, 0.2]},
                        base, models)
  n = sweep_lib._merge_sweep._cache_size()
  sweep_lib.merge_sweep({'method': 'task_arithmetic'}, {'lambda_': [0.7, 0.9]},
                        base, models)
  assert sweep_lib._merge_sweep._cache_size() == n


def test_run_sweep_groups_and_table(tmp_path):
  base, models = _zoo()
  pts = sweep_lib.product(sweep_lib.sweep('merge.method', ['task_arithmetic', 'average']),
                   sweep_lib.sweep('merge.lambda_', [0.5, 1.0]))
  # `average` takes no lambda_: the config for it drops the field via a job.
  calls = []

  def job(cfg, numeric):
    calls.append((cfg.merge.method,
                  {k: v.tolist() for k, v in numeric.items()}))
    n = len(numeric['lambda_'])
    return [{'m': cfg.merge.method, 'lam': float(numeric['lambda_'][i])}
            for i in range(n)]

  res = sweep_lib.run_sweep(_config(), pts, job, workdir=tmp_path)
  assert res.groups == 2  # one job per method, lambdas vmapped within
  assert calls == [('task_arithmetic', {'lambda_': [0.5, 1.0]}),
                   ('average', {'lambda_': [0.5, 1.0]})]
  assert [r['lam'] for r in res.rows] == [0.5, 1.0, 0.5, 1.0]
  rows = json.loads((tmp_path / 'sweep.json').read_text())
  assert rows == res.rows
  assert (tmp_path / 'sweep.csv').read_text().startswith('merge.method,')
  assert '| merge.method |' in (tmp_path / 'sweep.md').read_text()


def test_run_sweep_vmap_equals_loop():
  base, models = _zoo()
  pts = sweep_lib.sweep('merge.lambda_', [0.2, 0.4, 0.8])

  def evaluate(p):
    return {'norm': jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))}

  fast = sweep_lib.run_sweep(_config(), pts, base=base, models=models,
                      evaluate=evaluate)
  slow = sweep_lib.run_sweep(_config(), pts, base=base, models=models,
                      evaluate=evaluate, vmap=False)
  assert fast.groups == 1 and slow.groups == 3
  np.testing.assert_allclose(fast.column('norm'), slow.column('norm'),
                             rtol=1e-5)


def test_run_sweep_int_is_structural():
  structural, numeric = sweep_lib.split_overrides(
      {'merge.density': 0.2, 'merge.rank': 4, 'merge.flag': True,
       'merge.weight': (1.0, 2.0), 'zoo.lr': 0.1})
  assert set(numeric) == {'merge.density', 'merge.weight'}
  assert set(structural) == {'merge.rank', 'merge.flag', 'zoo.lr'}


def test_parse_arg():
  a = sweep_lib.parse_arg('fusionbench', variant='mergekit', runlocal=False)
  assert a.variant == 'fusionbench' and a.runlocal is False
  with pytest.raises(ValueError, match="valid arguments: \\['runlocal', "
                     "'variant'\\]"):
    sweep_lib.parse_arg('varient=x', variant='mergekit', runlocal=False)


def test_build_method_unknown():
  with pytest.raises(ValueError, match='task_arithmetic'):
    sweep_lib.build_method({'method': 'task_arithmatic'})


def test_apply_overrides_keeps_references():
  cfg = ml_collections.ConfigDict({'merge': {'density': 0.2}})
  cfg.methods = ml_collections.ConfigDict(
      {'ties': {'density': cfg.merge.get_ref('density')}})
  cfg.lock()
  new = sweep_lib.apply_overrides(cfg, {'merge.density': 0.5})
  assert new.methods.ties.density == 0.5 and cfg.methods.ties.density == 0.2
  assert new.is_locked


def test_static_floats_are_structural():
  structural, numeric = sweep_lib.split_overrides(
      {'merge.density': 0.2, 'merge.frac': 0.8}, static=('config.merge.frac',))
  assert set(numeric) == {'merge.density'} and set(structural) == {'merge.frac'}
  calls = []

  def job(cfg, numeric):
    calls.append(cfg.merge.frac)
    return [{}] * len(numeric['lambda_'])

  cfg = _config(frac=0.5)
  pts = sweep_lib.product(sweep_lib.sweep('merge.frac', [0.5, 0.8]),
                   sweep_lib.sweep('merge.lambda_', [0.1, 0.2]))
  res = sweep_lib.run_sweep(cfg, pts, job, static=['merge.frac'])
  assert res.groups == 2 and calls == [0.5, 0.8]


def test_untraceable_hyperparameter_error():
  base, models = _zoo(k=2)
  with pytest.raises(ValueError, match='static='):
    sweep_lib.merge_sweep({'method': 'iso_cts'},
                          {'common_space_fraction': [0.5, 0.8]}, base, models)
