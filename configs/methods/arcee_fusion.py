r"""Arcee Fusion between the base and the task-arithmetic sum.

mergekit ``arcee_fusion`` (no parameters; KL-weighted importance, IQR threshold).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/arcee_fusion.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/arcee_fusion.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/arcee_fusion
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
      mergekit=dict(),
  )
  return c.method_config('arcee_fusion', variants, arg, sweep=SWEEP,
                         protocol='sum_endpoint')
