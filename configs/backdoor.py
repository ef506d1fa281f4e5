r"""Backdoor-aware merging on the default digits zoo: one poisoned fine-tune.

  python -m experiments.main --config=configs/backdoor.py --workdir=/tmp/exp_work
  python -m experiments.main --config=configs/backdoor.py:smoke --workdir=/tmp/bd

The zoo is the default experiment's (same hash, so a shared workdir trains it
once); the poisoned fine-tune is cached beside it. Writes
``<workdir>/backdoor/results.json``; ``python -m experiments.tools.results
<workdir>/backdoor/results.json`` renders ``docs/results/backdoor.md``.
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'backdoor')
  config.poisoned = 0          # index of the task whose fine-tune is poisoned
  config.target = 0            # the label the trigger selects
  config.trigger_size = 2      # a 2 x 2 white patch, bottom-right
  config.poison_fraction = 0.1
  config.poison_seed = 7
  config.dam = ml_collections.ConfigDict(dict(
      # L2 budget / mean input norm; the one with the best clean validation
      # accuracy is reported as DAM's row.
      budgets=(0.125, 0.25, 0.5, 1.0),
      attack='targeted', safe_loss='consistency', adversarial_weight=0.1,
      # attack, safe loss, weight: run at the chosen budget. The last is
      # FusionBench's Safe Concrete objective.
      ablations=('targeted, consistency, 1.0', 'untargeted, consistency, 0.1',
                 'untargeted, consistency, 1.0', 'untargeted, entropy, 0.1'),
      steps=20 if smoke else 300, learning_rate=1e-2, batch_size=32, seed=0))
  return config
