r"""WIDEN, weight disentanglement (Yu et al., 2024).

``paper``: ``t`` 1.0 (above-average ratio), ``s`` 1.0 (score calibration).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/widen.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/widen.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/widen
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.s=(0.5, 1.0, 2.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      paper=dict(
          t=1.0,
          s=1.0),
  )
  return c.method_config('widen', variants, arg, sweep=SWEEP,
                         protocol='models')
