"""The dynamic-merges experiment: WEMoE, T3, FW-Merging and memory, tiny."""

import json
import os

from experiments import dynamic
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dynamic_experiment_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'dynamic.py').get_config('smoke')
  result = dynamic.main(config, str(tmp_path))
  t = result['tables']
  wemoe = {r['method']: r for r in t['WEMoE']}
  assert wemoe['fine-tuned models']['gap_closed'] == 1.0
  assert sum(m.endswith('trained') for m in wemoe) == 3
  # WEMoE's initial routers give task arithmetic at init_lambda.
  assert all(0.0 <= r['test_accuracy'] <= 1.0 for r in t['WEMoE'])
  t3 = {r['method']: r['mean_accuracy'] for r in t['T3 (mean over the fine-tunes)']}
  for per in ('sample', 'batch'):
    for side in ('pretrained', 'finetuned', 'centred'):
      assert 0.0 <= t3[f'T3 {per}, {side}'] <= 1.0
  # The oracle is the best static point, so it bounds the validation choice.
  assert (t3['best static interpolation on the test stream (oracle)']
          >= t3['static interpolation chosen on validation'])
  assert len(t['T3 per fine-tune']) == len(config.zoo.tasks)
  cost = {r['variant']: r for r in t['T3 cost per batch']}
  assert cost['one forward pass']['x_one_forward'] == 1.0
  sizes = {r['pool_size'] for r in t['FW-Merging against pool size']}
  assert sizes == set(config.fw.pool_sizes)
  s = result['fw_stream_check']
  assert s['streamed'] and s['same_picks'] and s['max_abs_difference'] < 1e-5
  mem = t['Peak memory against the number of models']
  assert {r['method'] for r in mem} >= {'FW-Merging hard, stacked',
                                         'FW-Merging hard, streamed'}
  assert all(r['streamed'] for r in mem if r['method'].endswith('streamed'))
  out = tmp_path / 'dynamic'
  for name in ('results.json', 'results.md', 'fw_pool.png', 'memory.png'):
    assert (out / name).exists()
  page = (out / 'results.md').read_text()
  assert json.loads((out / 'results.json').read_text())['experiment'] == (
      'dynamic')
  assert '## FW-Merging against pool size' in page
