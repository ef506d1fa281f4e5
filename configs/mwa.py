r"""MWA on digits: metrics-weighted averaging of one run's checkpoints.

A small base MLP is pre-trained on generic augmentations of the digits; it is
then fine-tuned on one task (full weights, and separately a LoRA adapter of
the backbone with a trained head), with a checkpoint every
``finetune.every`` steps. The last checkpoint, the best checkpoint (by
validation), the uniform average and MWA with step and loss weights (the
penalty chosen on validation) are compared on test.

  python -m experiments.main --config=configs/mwa.py --workdir=/tmp/mwa_run

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/mwa.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  smoke = config_files.is_smoke(arg)
  config = ml_collections.ConfigDict()
  config.experiment = 'mwa'
  config.seed = 0
  config.progress = False
  config.data = dict(pretrain_frac=0.4, val_frac=0.1, test_frac=0.3)
  config.width = 16 if smoke else 128
  config.depth = 2
  config.base = dict(steps=30 if smoke else 500, batch_size=128, lr=3e-3,
                     weight_decay=0.0, augment_copies=1 if smoke else 2)
  # The fine-tuning task (an input transform of experiments.zoo).
  config.task = 'permute'
  f = ml_collections.ConfigDict()
  # Independent fine-tuning runs (seeds), trained at once under vmap; every
  # number is reported as a mean over them.
  f.runs = 2 if smoke else 5
  f.steps = 40 if smoke else 400
  f.every = 10 if smoke else 20  # steps between checkpoints
  f.batch_size = 32
  # A constant learning rate: the iterates keep moving, as in a run stopped
  # before its schedule ends, which is where averaging has room to help.
  f.lr = 1e-3
  f.lora_rank = 4
  f.lora_lr = 3e-3
  config.finetune = f
  # Penalty grid for both kinds; 0 is the uniform average.
  config.penalties = ((0.0, 1.0, 8.0) if smoke else
                      (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
  return config
