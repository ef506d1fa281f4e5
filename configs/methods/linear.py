r"""Linear (weighted) average of the fine-tuned models.

mergekit ``linear``: ``sum_i w_i theta_i / sum_i w_i``; the base takes no part
(protocol ``no_base``). FusionBench ``simple_average`` is ``weight=None``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/linear.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/linear.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/linear
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
      mergekit=dict(
          weight=c.weights(),
          normalize=True),
  )
  return c.method_config('linear', variants, arg, sweep=SWEEP,
                         protocol='no_base')
