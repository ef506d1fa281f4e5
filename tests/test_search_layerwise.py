"""The layer-wise search experiment: runs, reports the front, plots."""

import os

import numpy as np

import mergejax as mj
from experiments import search_layerwise
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_layerwise_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'search_layerwise.py').get_config('smoke')
  config.progress = False
  result = search_layerwise.main(config, str(tmp_path))
  sc = config.search
  rows = {r['search']: r for r in result['rows']}
  for name in sc.methods:
    r = rows[f'{name} alone (uniform weight)']
    assert r['evaluations'] == len(sc.weights) and r['weight'] in sc.weights
  search = rows['layer-wise CMA-ES (mean accuracy)']
  assert search['evaluations'] == sc.population * sc.generations
  assert len(search['blocks'].split(', ')) == 4  # two Dense layers' leaves
  front = result['front']
  assert len(front['searched']) == len(sc.preferences)
  np.testing.assert_allclose(
      mj.search.hypervolume(front['searched'], front['reference']),
      front['hypervolume_searched'], rtol=1e-6)
  assert os.path.exists(tmp_path / 'search_layerwise' / 'layerwise_front.png')
