r"""KnOTS, merging task updates in a shared SVD basis (Stoica et al., 2025).

``paper``: task arithmetic on the aligned blocks, ``lambda_`` 1.0.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/knots.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/knots.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/knots
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.lambda_=(0.3, 0.5, 1.0, 1.5)',
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
          lambda_=1.0),
  )
  return c.method_config('knots', variants, arg, sweep=SWEEP,
                         protocol='models')
