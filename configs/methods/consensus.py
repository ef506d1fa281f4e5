r"""Consensus merging: drop weights fewer than k tasks use (Wang et al., 2024).

``paper``: ``k`` 2, TALL-mask ``tall_lambda`` 0.6, ``lambda_`` 0.3.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/consensus.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/consensus.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/consensus
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.k=(1.0, 2.0); merge.lambda_=(0.3, 0.5, 1.0)',
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
          lambda_=0.3,
          k=2.0,
          tall_lambda=0.6,
          formula='paper'),
  )
  return c.method_config('consensus', variants, arg, sweep=SWEEP,
                         protocol='models')
