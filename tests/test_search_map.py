"""The MAP experiment: fronts against a grid, nested MAP, figures."""

import os

import numpy as np

import mergejax as mj
from experiments import search_map
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_map_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'search_map.py').get_config('smoke')
  config.progress = False
  result = search_map.main(config, str(tmp_path))
  sc = config.search
  for tasks, steps in zip(sc.task_sets, sc.grid_steps):
    label = '+'.join(result['tasks'][t] for t in tasks)
    rows = {r['method']: r for r in result['rows'] if r['tasks'] == label}
    d = len(tasks)
    assert rows['grid']['evaluations'] == steps ** d
    unknowns = 1 + d + d * (d + 1) // 2
    assert rows['MAP']['evaluations'] == 2 * unknowns
    assert rows['MAP, adaptive']['evaluations'] == (2 * unknowns + sc.rounds *
                                                    sc.per_round)
    front = result['fronts'][label]
    # The grid's front is non-dominated and its recorded hypervolume is the
    # front's own.
    grid = np.asarray(front['grid'])
    assert np.all(np.asarray(mj.search.pareto_mask(grid)))
    np.testing.assert_allclose(
        mj.search.hypervolume(grid, front['reference']),
        rows['grid']['hypervolume'], atol=1e-6)
    for r in rows.values():
      assert r['hypervolume'] >= 0 and r['front_points'] >= 1
    assert os.path.exists(tmp_path / 'search_map' / front['figure'])
  nested = result['nested']
  k = len(result['tasks'])
  assert nested['evaluations'] == (k - 1) * 13
  assert len(nested['coefficients']) == k
  assert 0.0 <= nested['test'] <= 1.0
  assert os.path.exists(tmp_path / 'search_map' / 'results.json')
