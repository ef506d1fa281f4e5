r"""MAP on the digits zoo: amortised Pareto fronts of task-arithmetic coefficients.

For 2 and 3 of the zoo's tasks, MAP's quadratic surrogates (plain and with
adaptive sampling) against a brute-force grid of coefficients; nested MAP
over all 8 tasks against task arithmetic's validation-chosen lambda.

  python -m experiments.main --config=configs/search_map.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/search_map.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg, 'search_map')
  s = ml_collections.ConfigDict()
  # Tasks (indices into the zoo's tasks) whose coefficients span a front;
  # the grid has ``grid_steps`` values per coefficient in [low, high].
  s.task_sets = ((0, 1),) if smoke else ((0, 1), (0, 1, 2))
  s.grid_steps = ((5,) if smoke else (21, 11))
  s.low, s.high = 0.0, 1.0
  # MAP's first design: None is twice the surrogate's unknowns (12 for two
  # coefficients, 20 for three). Adaptive sampling adds ``per_round`` points
  # ``rounds`` times where bootstrap surrogates disagree most.
  s.initial = None
  s.rounds, s.per_round = (1, 2) if smoke else (4, 4)
  # Candidates sampled in the box to read the surrogate's front.
  s.front_samples = 1024 if smoke else 16384
  # Front candidates measured to check the predicted front (not MAP's cost).
  s.check_points = 16 if smoke else 64
  # Validation examples per task the metrics read (180: the whole split).
  s.examples = 16 if smoke else 180
  s.chunk_size = 16
  s.nested = True
  config.search = s
  del config.methods_to_run
  return config
