r"""MultiSLERP: one tangent-space step of a spherical weighted mean.

``mergekit``: normalize_weights True, eps 1e-8, task vectors relative to the base.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/multislerp.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/multislerp.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/multislerp \
      --config.merge.eps=5e-09
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
          normalize_weights=True,
          eps=1e-08),
  )
  return c.method_config('multislerp', variants, arg, sweep=SWEEP,
                         protocol='models')
