r"""RAM+ (tensor-local): RAM with unique updates rescaled.

``mergekit``: r 0.1, alpha 0.2, epsilon 1e-5.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/ramplus_tl.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/ramplus_tl.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/ramplus_tl \
      --config.merge.r=0.05
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.r=(0.0, 0.1, 0.3)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          r=0.1,
          alpha=0.2,
          epsilon=1e-05),
  )
  return c.method_config('ramplus_tl', variants, arg, sweep=SWEEP,
                         protocol='models')
