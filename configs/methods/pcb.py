r"""PCB-merging, parameter competition balancing (Du et al., 2024).

``paper``: ``pcb_ratio`` 0.1, one global ``lambda_`` 1.0 (no per-task search).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/pcb.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/pcb.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/pcb
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.pcb_ratio=(0.05, 0.1, 0.2); merge.lambda_=(0.5, 1.0, 1.5)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      paper=dict(
          pcb_ratio=0.1,
          lambda_=1.0),
  )
  return c.method_config('pcb', variants, arg, sweep=SWEEP,
                         protocol='models')
