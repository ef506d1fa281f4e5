r"""Zero-order layer-wise search (MedSAMix-style) on the digits zoo.

One method and one weight per block, chosen by CMA-ES on validation
accuracy (single objective) and for a set of preferences between two task
groups (multi-objective), against each method alone at its tuned weight.

  python -m experiments.main --config=configs/search_layerwise.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/search_layerwise.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg,
                                               'search_layerwise')
  s = ml_collections.ConfigDict()
  # Unit-scale merges whose updates the blocks choose between: entries of
  # config.methods run once at scale 1 (their swept parameter set to 1).
  s.methods = (('task_arithmetic', 'ties') if smoke else
               ('task_arithmetic', 'ties', 'tsv', 'iso_c'))
  # Blocks: 'layer' (one per Dense layer) or 'leaf' (kernel and bias apart).
  s.blocks = 'leaf'
  s.x0_weight = 0.3  # every block starts at this weight, all logits equal
  s.std = 0.3
  s.population = 4 if smoke else 16
  s.generations = 2 if smoke else 60
  # Multi-objective: the first half of the tasks against the second half,
  # one search per preference for the first group.
  s.preferences = (0.5,) if smoke else (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
  s.weights = (0.5, 1.0) if smoke else tuple(round(0.1 * i, 1)
                                              for i in range(1, 31))
  s.examples = 16 if smoke else 180  # validation examples per task
  s.chunk_size = 8
  config.search = s
  del config.methods_to_run
  return config
