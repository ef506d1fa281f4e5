r"""Uniform average of the fine-tuned models (FusionBench simple_average).

FusionBench ``simple_average``: the mean of the K fine-tunes.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/average.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/average.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/average
"""

import importlib.util
import os


SWEEP = {}  # nothing numeric worth sweeping by default


def _common():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_common.py')
  spec = importlib.util.spec_from_file_location('_mergejax_cfg_common', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _common()
  variants = dict(
      fusionbench=dict(),
  )
  return c.method_config('average', variants, arg, sweep=SWEEP,
                         protocol='models')
