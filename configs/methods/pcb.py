r"""PCB-merging, parameter competition balancing (Du et al., 2024).

``paper``: ``pcb_ratio`` 0.1, one global ``lambda_`` 1.0 (no per-task search).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/pcb.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/pcb.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/pcb
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.pcb_ratio=(0.05, 0.1, 0.2); merge.lambda_=(0.5, 1.0, 1.5)',
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
          pcb_ratio=0.1,
          lambda_=1.0),
  )
  return c.method_config('pcb', variants, arg, sweep=SWEEP,
                         protocol='models')
