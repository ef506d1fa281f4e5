r"""Evolutionary search of merge coefficients on the digits zoo.

Task-wise (``[K]``) and layer-wise (``[K]`` per parameter leaf) task-arithmetic
coefficients evolved with evosax strategies (CMA-ES, Sep-CMA-ES, SimpleGA)
to maximise mean validation accuracy, against a random search with the same
number of evaluations and task arithmetic's validation-chosen single lambda.

  python -m experiments.main --config=configs/search_evolution.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/search_evolution.py:smoke --workdir=/tmp/w
"""

import ml_collections

from experiments.tools import config_files


def _run(strategy, coefficients, population, generations, std):
  return ml_collections.ConfigDict(dict(
      strategy=strategy, coefficients=coefficients, population=population,
      generations=generations, std=std))


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  config, smoke = config_files.default_variant(__file__, arg,
                                               'search_evolution')
  s = ml_collections.ConfigDict()
  # Every search starts from task arithmetic's common default coefficient,
  # not from the tuned lambda: the question is what the search finds alone.
  s.x0 = 0.3
  # Validation examples per task the fitness reads (180: the whole split).
  s.examples = 16 if smoke else 180
  s.chunk_size = 8
  # ``std``: the first population's spread around x0 (CMA-ES's std_init;
  # SimpleGA's mutation std, which decays by ``ga_decay`` per generation;
  # the random search's spread).
  s.ga_decay = 0.97
  gens = 2 if smoke else 60
  s.runs = ml_collections.ConfigDict(dict(
      cma_es_task_wise=_run('CMA_ES', 'task-wise', 4 if smoke else 16, gens,
                            0.2),
      random_task_wise=_run('random', 'task-wise', 4 if smoke else 16, gens,
                            0.2),
  ) if smoke else dict(
      cma_es_task_wise=_run('CMA_ES', 'task-wise', 16, gens, 0.2),
      simple_ga_task_wise=_run('SimpleGA', 'task-wise', 16, gens, 0.2),
      random_task_wise=_run('random', 'task-wise', 16, gens, 0.2),
      cma_es_layer_wise=_run('CMA_ES', 'layer-wise', 32, gens, 0.2),
      sep_cma_es_layer_wise=_run('Sep_CMA_ES', 'layer-wise', 32, gens, 0.2),
      random_layer_wise=_run('random', 'layer-wise', 32, gens, 0.2),
  ))
  config.search = s
  del config.methods_to_run
  return config
