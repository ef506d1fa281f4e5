r"""DELLA pruning without sign consensus.

``mergekit``: density 1.0, epsilon 0.15, L1 rescale, weighted sum.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/della_linear.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/della_linear.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/della_linear \
      --config.merge.density=0.3
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.density=(0.3, 0.5, 0.7); merge.lambda_=(0.5, 1.0, 1.5)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
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
