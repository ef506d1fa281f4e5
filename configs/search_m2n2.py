r"""M2N2 on digits: evolving classifiers from scratch, and merging the zoo.

From scratch: an archive of randomly initialised small MLPs evolved by M2N2
(and its ablations) against CMA-ES and Sep-CMA-ES with the same number of
forward passes. Seeded: M2N2 over the 8 fine-tuned backbones of the default
zoo against task arithmetic.

  python -m experiments.main --config=configs/search_m2n2.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/search_m2n2.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'search_m2n2')
  s = ml_collections.ConfigDict()
  # The classifier evolved from scratch: one hidden ReLU layer.
  s.width = 8 if smoke else 16
  s.archive = 4 if smoke else 20
  # Children M2N2 creates; CMA-ES gets the same number of evaluations
  # (population x generations), so both spend the same forward passes.
  s.children = 40 if smoke else 4000
  s.population = 4 if smoke else 20
  s.mutation_std = 0.01  # the paper's noise when evolving from scratch
  s.cma_std = 0.1
  # M2N2 variants: (name, alpha, matchmaker, split_point).
  s.variants = (('M2N2', 1.0, True, True),) if smoke else (
      ('M2N2', 1.0, True, True),
      ('no matchmaker', 1.0, False, True),
      ('no competition (alpha 0)', 0.0, True, True),
      ('no split point', 1.0, True, False))
  s.strategies = ('Sep_CMA_ES',) if smoke else ('CMA_ES', 'Sep_CMA_ES')
  # M2N2 once more with the paper's budget of children (0: skip).
  s.long_children = 0 if smoke else 50000
  # Seeded M2N2 over the zoo's fine-tuned backbones (no mutation).
  s.seeded_children = 20 if smoke else 1000
  s.examples = 16 if smoke else 180  # validation examples per task
  config.search = s
  del config.methods_to_run
  return config
