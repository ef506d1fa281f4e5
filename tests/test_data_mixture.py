"""The data-mixture proxy experiment: grid, correlations, figures."""

import os

import numpy as np
from scipy import stats

from experiments import data_mixture
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_simplex_grid():
  g = data_mixture.simplex_grid(3, 4)
  assert g.shape == (15, 3)  # C(4 + 2, 2)
  np.testing.assert_allclose(g.sum(axis=1), 1.0)
  assert len({tuple(r) for r in g}) == 15 and g.min() >= 0


def test_data_mixture_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'data_mixture.py').get_config('smoke')
  config.progress = False
  result = data_mixture.main(config, str(tmp_path))
  mc = config.mixture
  grid = data_mixture.simplex_grid(len(mc.domains), mc.grid_steps)
  assert len(result['mixtures']) == len(grid)
  rows = {r['target']: r for r in result['rows']}
  assert set(rows) == {*mc.domains, mc.held_out, 'mean of the domains'}
  # The recorded correlation is the one of the recorded accuracies.
  for name in (*mc.domains, mc.held_out):
    m = [r[f'merged/{name}'] for r in result['mixtures']]
    t = [r[f'trained/{name}'] for r in result['mixtures']]
    np.testing.assert_allclose(rows[name]['spearman'],
                               stats.spearmanr(m, t)[0], atol=1e-3)
  assert os.path.exists(tmp_path / 'data_mixture' / 'mixture.png')
