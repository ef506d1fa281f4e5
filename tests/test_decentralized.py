"""Decentralized SGD experiment: shards, gossip matrices, the global merge."""

import os

import numpy as np
import pytest

from experiments import decentralized as dec
from experiments.tools import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dirichlet_shards_partition_the_data_with_label_skew():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(10), 50)
  skewed = dec.dirichlet_shards(y, 8, 0.1, rng, min_size=5)
  flat = np.concatenate(skewed)
  assert sorted(flat.tolist()) == list(range(len(y)))  # each image once
  assert min(len(s) for s in skewed) >= 5
  mixed = dec.dirichlet_shards(y, 8, 100.0, rng)

  def classes(shards):
    return np.mean([np.sum(np.bincount(y[s], minlength=10) >= 0.05 * len(s))
                    for s in shards])
  assert classes(skewed) < 5 < classes(mixed)
  with pytest.raises(ValueError, match='min_size'):
    dec.dirichlet_shards(y, 8, 0.1, rng, min_size=400, tries=3)


@pytest.mark.parametrize('topology', ['ring', 'pairs', 'complete', 'none'])
def test_mixing_matrices_are_doubly_stochastic_on_the_schedule(topology):
  rng = np.random.default_rng(0)
  mats, rounds = dec.mixing_matrices(topology, ((0.5, 10), (1.0, 5)), 100, 6,
                                     rng)
  assert mats.shape == (100, 6, 6)
  np.testing.assert_allclose(mats.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(mats.sum(axis=2), 1.0, atol=1e-6)
  np.testing.assert_allclose(mats, np.swapaxes(mats, 1, 2))
  silent = [t for t in range(100) if np.allclose(mats[t], np.eye(6))]
  # Steps 10, 20, ..., 50 then 55, 60, ..., 100 (1-based) gossip.
  want = 0 if topology == 'none' else 5 + 10
  assert rounds == want and len(silent) == 100 - want
  with pytest.raises(ValueError, match='topology'):
    dec.mixing_matrices('star', ((1.0, 1),), 10, 4, rng)


def test_decentralized_experiment_smoke(tmp_path):
  config = config_files.load_sibling(os.path.join(ROOT, 'configs', 'x.py'),
                                     'decentralized.py').get_config('smoke')
  result = dec.main(config, str(tmp_path))
  rows = {r['schedule']: r for r in result['rows']}
  assert list(rows) == [s[0] for s in config.schedules] + [dec.CENTRAL]
  for r in rows.values():
    for k in ('workers_mean', 'workers_min', 'global_merge'):
      assert 0.0 <= r[k] <= 1.0
    assert r['workers_min'] <= r['workers_mean'] + 1e-9
  server = rows['server: full averaging every step']
  # Full averaging every step: the workers are one model.
  assert server['consensus_distance'] < 1e-8
  assert server['workers_mean'] == pytest.approx(server['global_merge'])
  assert server['gossip_rounds'] == config.steps
  assert rows['no communication']['gossip_rounds'] == 0
  assert rows['no communication']['consensus_distance'] > (
      rows['ring, every 10 steps']['consensus_distance'])
  assert len(result['curves']) == (len(config.schedules) + 1) * (
      config.steps // config.eval_every)
  out = tmp_path / 'decentralized'
  for name in ('results.json', 'results.md', 'decentralized.png'):
    assert (out / name).exists()
