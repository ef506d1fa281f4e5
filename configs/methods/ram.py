r"""RAM (reinforced-agent merging): average shared updates, keep unique ones.

``mergekit``: epsilon 1e-5 (tensor-local, as mergekit ``ram``).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/ram.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/ram.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/ram \
      --config.merge.epsilon=5e-06
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
          epsilon=1e-05),
  )
  return c.method_config('ram', variants, arg, sweep=SWEEP,
                         protocol='models')
