r"""Dynamic and pool-scale merges on the default digits zoo.

WEMoE (routers trained on unlabeled inputs), T3 test-time interpolation
between the base model and one fine-tune on a mixed stream, FW-Merging as
the pool grows with irrelevant and noisy checkpoints, and the peak memory of
WEMoE and FW-Merging against the number of models. The zoo is the default
experiment's (same hash: a shared workdir trains it once).

  python -m experiments.main --config=configs/dynamic.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/dynamic.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'dynamic')
  del config.methods
  del config.methods_to_run
  config.progress = False

  # WEMoE with FusionBench's settings: Adam at 1e-4 for 1000 steps, batches
  # of 16 unlabeled inputs per task. ``unlabeled`` inputs per task come from
  # the validation split; the 'test inputs' row trains on the unlabeled test
  # inputs instead, FusionBench's protocol.
  config.wemoe = ml_collections.ConfigDict(dict(
      steps=10 if smoke else 1000, learning_rate=1e-4, batch_size=16,
      unlabeled=32 if smoke else 64, prune=0.9, init_lambda=0.3))

  # T3: between the base and each fine-tune, on a stream mixing untransformed
  # test digits with the fine-tune's task; coefficients per input (T3) or per
  # batch (T3_B). The centred variant's gamma and side are chosen on the
  # validation stream.
  config.t3 = ml_collections.ConfigDict(dict(
      batch_size=32, gamma=0.5, gammas=(4.0,) if smoke else
      (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
      static=(0.0, 0.5, 1.0) if smoke else tuple(i / 10 for i in range(11)),
      timing_repeats=3 if smoke else 20))

  # FW-Merging: the relevant fine-tunes first, then fine-tunes on tasks that
  # are not evaluated and noise checkpoints (base + Gaussian noise with the
  # mean task vector's norm per leaf) and fine-tunes on random labels, in
  # turn.
  config.fw = ml_collections.ConfigDict(dict(
      irrelevant=('identity',) if smoke else
      ('identity', 'shift', 'noise', 'quadrants'),
      noisy=1 if smoke else 8, random_labels=1 if smoke else 4,
      pool_sizes=(5,) if smoke else (8, 12, 16, 20, 24),
      steps=2 if smoke else 10, step_size=0.1, scaling_factor=0.3,
      examples=20 if smoke else 100,  # labeled training examples per task
      ada_steps=5 if smoke else 500,
      stream_check_size=5 if smoke else 16))

  # Peak memory against the number of models: WEMoE from XLA's memory
  # analysis of the compiled forward pass, FW-Merging from the peak resident
  # memory of a fresh process (stacked pool vs streamed), on synthetic
  # backbones of ``width`` units.
  config.memory = ml_collections.ConfigDict(dict(
      models=(2,) if smoke else (2, 4, 8, 16, 32),
      width=64 if smoke else 2048, wemoe_inputs=64,
      fw_steps=1 if smoke else 2))
  return config
