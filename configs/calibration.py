r"""Calibration-size ablation of the data-informed merges on the digits zoo.

Fisher merging, RegMean, RegMean++, layer-wise AdaMerging and Expert Merging
with 1 ... 256 calibration examples per task, 8 ... 2048 over the 8 tasks
together (each method's other settings as in ``configs/default.py``);
accuracy against the number of examples is plotted.

  python -m experiments.main --config=configs/calibration.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/calibration.py:smoke --workdir=/tmp/w
"""

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'calibration')
  # The default experiment's method entries are the starting point; only the
  # number of calibration examples changes.
  config.calibration_methods = (('regmean', 'adamerging') if smoke else
                                ('fisher_merging', 'regmean',
                                 'regmean_plusplus', 'adamerging',
                                 'expert_merging'))
  # Examples per task; a split smaller than a size is used whole (the
  # results record the count actually used).
  config.sizes = (1, 2) if smoke else (1, 2, 4, 8, 16, 32, 64, 128, 256)
  del config.methods_to_run
  return config
