"""The M2N2 experiment: from scratch against CMA-ES, seeded against TA."""

import os

from experiments import search_m2n2
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_m2n2_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'search_m2n2.py').get_config('smoke')
  config.progress = False
  result = search_m2n2.main(config, str(tmp_path))
  sc = config.search
  scratch = {r['method']: r for r in result['rows']
             if r['setting'] == 'from scratch'}
  assert set(scratch) == ({v[0] for v in sc.variants} | set(sc.strategies))
  for name, alpha, matchmaker, split in sc.variants:
    r = scratch[name]
    assert r['evaluations'] == sc.archive + sc.children
    assert 0.0 <= r['test_accuracy'] <= 1.0 and 0 <= r['accepted'] <= 1
  for strategy in sc.strategies:
    # The same evaluations, bar the archive's initial scoring.
    assert scratch[strategy]['evaluations'] == sc.children
  seeded = [r for r in result['rows'] if r['setting'] != 'from scratch']
  assert seeded[0]['method'] == 'M2N2' and len(seeded) == 2
  assert seeded[0]['evaluations'] == len(result['config']['zoo']['tasks']) + (
      sc.seeded_children)
  assert os.path.exists(tmp_path / 'search_m2n2' / 'm2n2_scratch.png')
  assert os.path.exists(tmp_path / 'search_m2n2' / 'results.json')
