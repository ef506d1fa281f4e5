r"""MultiSLERP: one tangent-space step of a spherical weighted mean.

``mergekit``: normalize_weights True, eps 1e-8, task vectors relative to the base.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/multislerp.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/multislerp.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/multislerp \
      --config.merge.eps=5e-09
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          normalize_weights=True,
          eps=1e-08),
  )
  return c.method_config('multislerp', variants, arg, sweep=SWEEP,
                         protocol='models')
