"""The black-box merging experiment: runs, counts what it kept."""

import os

from experiments import search_blackbox
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_blackbox_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'search_blackbox.py').get_config('smoke')
  config.progress = False
  result = search_blackbox.main(config, str(tmp_path))
  sc = config.search
  k = len(result['config']['zoo']['tasks'])
  for kind in sc.kinds:
    assert len(result['relevant'][kind]) == k + sc.irrelevant
    assert sum(result['relevant'][kind]) == k
  rows = {r['search']: r for r in result['rows']}
  for keep in sc.keeps:
    r = rows[f'Evo-Merging, keep {keep}']
    assert r['evaluations'] == sc.population * sc.generations
    assert r['kept'] <= keep and r['kept_relevant'] <= r['kept']
  assert os.path.exists(tmp_path / 'search_blackbox' / 'results.json')
