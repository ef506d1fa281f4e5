"""The calibration-size ablation: runs, records what it used, plots."""

import os

from experiments import calibration
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_calibration_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'calibration.py').get_config('smoke')
  config.progress = False
  result = calibration.main(config, str(tmp_path))
  rows = result['rows']
  assert {(r['method'], r['examples']) for r in rows} == {
      (m, n) for m in config.calibration_methods for n in config.sizes}
  for r in rows:
    assert r['examples_used'] <= r['examples'] and 0.0 <= r['avg_accuracy'] <= 1
    assert r['examples_total'] == r['examples_used'] * len(result['tasks'])
    assert r['split'] == ('val' if r['method'] == 'adamerging' else 'train')
  # More data changes the statistics, so the merges differ.
  reg = [r['avg_accuracy'] for r in rows if r['method'] == 'regmean']
  assert len(set(reg)) > 1
  assert os.path.exists(tmp_path / 'calibration' / 'calibration.png')
  assert os.path.exists(tmp_path / 'calibration' / 'results.json')
