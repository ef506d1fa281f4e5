r"""Black-box merging of a noisy repository (Evo-Merging) on the digits zoo.

The 8 fine-tunes plus irrelevant models, merged from the merged model's
validation accuracy alone: Evo-Merging against task arithmetic over the whole
repository and a plain CMA-ES over one coefficient per model.

  python -m experiments.main --config=configs/search_blackbox.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/search_blackbox.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg,
                                               'search_blackbox')
  s = ml_collections.ConfigDict()
  # Irrelevant models added to the repository: the base plus a random
  # update with the norm of a real task vector, leaf by leaf.
  s.irrelevant = 3 if smoke else 8
  # Evo-Merging's number of kept models (the useful count is unknown to it).
  s.keeps = (2,) if smoke else (4, 8, 12)
  s.population = 4 if smoke else 16
  s.generations = 2 if smoke else 60
  s.examples = 16 if smoke else 180  # validation examples per task
  s.chunk_size = 8
  config.search = s
  del config.methods_to_run
  return config
