r"""Decentralized SGD on digits and a single global merge at the end.

N workers hold non-iid shards of the digits training data (Dirichlet label
skew) and train one MLP each from a shared initialisation, all workers
vmapped in one jit, averaging with their neighbours (ring or random-pair
gossip) on a schedule. Compared on test: each worker alone, the uniform
merge of all workers at the end, server-style full averaging every step and
centralized SGD on the pooled data.

  python -m experiments.main --config=configs/decentralized.py --workdir=/tmp/dec_run

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/decentralized.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  smoke = config_files.is_smoke(arg)
  config = ml_collections.ConfigDict()
  config.experiment = 'decentralized'
  config.seed = 0
  # Independent repeats (partition, initialisation, minibatches); the rows
  # are means over them.
  config.repeats = 1 if smoke else 3
  config.progress = False
  # No pre-training split: every training image belongs to some worker.
  config.data = dict(pretrain_frac=0.0, val_frac=0.1, test_frac=0.3)
  config.width = 16 if smoke else 64
  config.depth = 1 if smoke else 2
  config.workers = 4 if smoke else 16
  config.alpha = 0.1  # Dirichlet concentration of the label skew
  config.min_shard = 8  # redraw the partition until every shard has this many
  config.steps = 40 if smoke else 1500
  config.batch_size = 16  # per worker and step
  config.lr = 0.05
  config.momentum = 0.9
  config.eval_every = 20 if smoke else 100  # steps between curve points
  # (label, topology, phases): topology 'none', 'ring', 'pairs' (a random
  # perfect matching per round) or 'complete' (full averaging); phases
  # ((end fraction of training, gossip every k steps), ...).
  config.schedules = (
      ('no communication', 'none', ()),
      ('ring, every 10 steps', 'ring', ((1.0, 10),)),
      # About the same budget spent late: every 40 steps for 3/4 of
      # training, then every 3 steps.
      ('ring, late (every 40, then every 3)', 'ring', ((0.75, 40),
                                                       (1.0, 3))),
      ('ring, every 50 steps', 'ring', ((1.0, 50),)),
      # The every-50 budget spent late: every 200 steps, then every 15.
      ('ring, late (every 200, then every 15)', 'ring', ((0.75, 200),
                                                         (1.0, 15))),
      ('random pairs, every 10 steps', 'pairs', ((1.0, 10),)),
      ('server: full averaging every step', 'complete', ((1.0, 1),)),
  )
  return config
