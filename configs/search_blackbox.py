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
  # Models added to the repository, of each kind in turn: 'noise' (the base
  # plus a random update with a real task vector's norm, leaf by leaf) or
  # 'negated' (a fine-tune's task vector negated).
  s.irrelevant = 3 if smoke else 8
  s.kinds = ('negated',) if smoke else ('noise', 'negated')
  # Evo-Merging's number of kept models (the useful count is unknown to it).
  s.keeps = (2,) if smoke else (4, 8, 12)
  s.population = 4 if smoke else 16
  s.generations = 2 if smoke else 60
  s.examples = 16 if smoke else 180  # validation examples per task
  s.chunk_size = 8
  config.search = s
  del config.methods_to_run
  return config
