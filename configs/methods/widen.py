r"""WIDEN, weight disentanglement (Yu et al., 2024).

``paper``: ``t`` 1.0 (above-average ratio), ``s`` 1.0 (score calibration).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/widen.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/widen.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/widen
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.s=(0.5, 1.0, 2.0)',
)


def _common():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_common.py')
  spec = importlib.util.spec_from_file_location('_mergejax_cfg_common', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _common()
  variants = dict(
      paper=dict(
          t=1.0,
          s=1.0),
  )
  return c.method_config('widen', variants, arg, sweep=SWEEP,
                         protocol='models')
