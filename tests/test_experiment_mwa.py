"""The MWA experiment: one run's checkpoints, MWA against last and uniform."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments import mwa
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('last checkpoint', 'best checkpoint (val)', 'uniform average',
           'MWA step', 'MWA loss')


def test_mwa_experiment_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'mwa.py').get_config('smoke')
  result = mwa.main(config, str(tmp_path))
  fc = config.finetune
  settings = list(dict.fromkeys(r['setting'] for r in result['rows']))
  assert len(settings) == 3 and settings[0] == 'full fine-tuning'
  for setting in settings:
    rows = {r['method']: r for r in result['rows'] if r['setting'] == setting}
    assert tuple(rows) == METHODS
    for r in rows.values():
      assert 0.0 <= r['test_accuracy'] <= 1.0
      assert r['beats_last'].endswith(f'/{fc.runs}')
    # MWA chooses its penalty from the grid, per run.
    for m in ('MWA step', 'MWA loss'):
      chosen = [float(v) for v in rows[m]['chosen'][2:].split(', ')]
      assert len(chosen) == fc.runs and set(chosen) <= set(config.penalties)
    # Fine-tuning on the task beats the base model, which never saw it.
    assert rows['last checkpoint']['test_accuracy'] > (
        result['base_test_accuracy'])
  # The running trackers reproduce the offline merges.
  assert all(v < 1e-4 for v in result['checks'].values())
  assert len(result['train_loss']['full']) == fc.steps // fc.every
  out = tmp_path / 'mwa'
  for name in ('results.json', 'results.md', 'mwa.png'):
    assert (out / name).exists()
  assert json.loads((out / 'results.json').read_text())['experiment'] == 'mwa'
  assert '| setting | method |' in (out / 'results.md').read_text()


def test_lora_adapter_starts_at_the_base_and_applies_dense_deltas():
  base = {'backbone': {'Dense_0': {'kernel': jnp.ones((3, 4)),
                                   'bias': jnp.zeros(4)}},
          'head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)}}
  ad = mwa.lora_init(base, 2, jax.random.key(0))
  same = mwa.with_adapter(base, ad)
  mj.testing.assert_trees_close(same, base)
  # A merged (delta-mode) adapter holds dense deltas where LoRA nodes were.
  dense = {'backbone': {'Dense_0': {'kernel': jnp.full((3, 4), 2.0)}},
           'head': jax.tree.map(jnp.ones_like, base['head'])}
  out = mwa.with_adapter(base, dense)
  np.testing.assert_allclose(out['backbone']['Dense_0']['kernel'], 3.0)
  np.testing.assert_allclose(out['head']['bias'], 1.0)
