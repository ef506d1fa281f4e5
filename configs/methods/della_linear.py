r"""DELLA pruning without sign consensus.

``mergekit``: density 1.0, epsilon 0.15, L1 rescale, weighted sum.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/della_linear.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/della_linear.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/della_linear \
      --config.merge.density=0.3
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.density=(0.3, 0.5, 0.7); merge.lambda_=(0.5, 1.0, 1.5)',
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
      mergekit=dict(
          weight=c.weights(),
          density=1.0,
          epsilon=0.15,
          lambda_=1.0,
          normalize=False,
          rescale=True),
  )
  return c.method_config('della_linear', variants, arg, sweep=SWEEP,
                         protocol='models')
