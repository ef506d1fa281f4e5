"""The evolutionary-search experiment: runs, reports what it found, plots."""

import os

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments import search_evolution
from experiments import ties_ablation
from experiments import zoo
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_evolution_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'search_evolution.py').get_config('smoke')
  config.progress = False
  result = search_evolution.main(config, str(tmp_path))
  rows = {r['run']: r for r in result['rows']}
  assert set(rows) == set(config.search.runs)
  s = ties_ablation.setup(config, str(tmp_path))  # the cached zoo
  x, y = s['ev'].split('val', config.search.examples)
  for name, run in config.search.runs.items():
    r = rows[name]
    assert r['evaluations'] == run.population * run.generations
    curve = [c['best_val_accuracy'] for c in result['curves']
             if c['run'] == name]
    assert len(curve) == run.generations and np.all(np.diff(curve) >= 0)
    assert r['val_accuracy'] == round(curve[-1], 4)
    # The reported best, merged again independently, has the reported
    # validation accuracy: the search scored what it claims to have scored.
    c = jnp.asarray(result['best_coefficients'][name], jnp.float32)
    assert c.shape == (len(result['tasks']),)
    bb = mj.merge(mj.methods.task_arithmetic(weight=c), s['base'], s['fts'])
    acc = np.mean([zoo.accuracy(s['model'], bb, jax.tree.map(
        lambda h, t=t: h[t], s['heads']), x[t], y[t]) for t in range(len(x))])
    np.testing.assert_allclose(acc, r['val_accuracy'], atol=1e-4)
    assert 0.0 <= r['test_accuracy'] <= 1.0
  assert 0.0 <= result['task_arithmetic']['test'] <= 1.0
  assert os.path.exists(tmp_path / 'search_evolution' / 'search.png')
  assert os.path.exists(tmp_path / 'search_evolution' / 'results.json')
