r"""MergeLock on the default digits zoo: lock one fine-tune, merge, recover.

  python -m experiments.main --config=configs/lock.py --workdir=/tmp/exp_work
  python -m experiments.main --config=configs/lock.py:smoke --workdir=/tmp/lock

The zoo is the default experiment's (same hash, so a shared workdir trains it
once). Writes ``<workdir>/lock/results.json``; ``python -m
experiments.tools.results <workdir>/lock/results.json`` renders
``docs/results/lock.md``.
"""

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, _ = config_files.default_variant(__file__, arg, 'lock')
  del config.methods
  del config.methods_to_run
  config.locked = 0          # index of the fine-tune that is locked
  config.scale_range = 8.0   # unit scales log-uniform in [1/8, 8]
  config.lock_seed = 1
  return config
