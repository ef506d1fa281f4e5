r"""Linear merges of domain experts as a proxy for training on data mixtures.

For a grid of mixture weights over a few of the zoo's domains, the linear
merge of the domain experts against a model fine-tuned on that mixture:
rank correlation of their accuracies across the grid, per target.

  python -m experiments.main --config=configs/data_mixture.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/data_mixture.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'data_mixture')
  s = ml_collections.ConfigDict()
  # Domains mixed (zoo task names; they must be in config.zoo.tasks), and a
  # task none of the models trains on, read as one more target.
  s.domains = ('rot90', 'invert') if smoke else ('rot90', 'hflip', 'invert')
  s.held_out = 'permute'
  # Mixture weights: the simplex grid with this many steps per unit.
  s.grid_steps = 2 if smoke else 4
  # Training examples per mixture (drawn from the domains in proportion).
  s.examples = 64 if smoke else 359
  config.mixture = s
  del config.methods_to_run
  return config
