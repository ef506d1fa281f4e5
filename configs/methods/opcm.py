r"""OPCM, orthogonal projection continual merging (FusionBench).

``fusionbench``: ``alpha`` 0.5 (energy fraction kept out of the projection);
models merged in the given order.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/opcm.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/opcm.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/opcm
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.alpha=(0.3, 0.5, 0.8)',
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
      fusionbench=dict(
          alpha=0.5),
  )
  return c.method_config('opcm', variants, arg, sweep=SWEEP,
                         protocol='models')
