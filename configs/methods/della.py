r"""DELLA (Deep et al., 2024): magnitude-ranked stochastic pruning, TIES consensus.

``mergekit``: density 1.0, epsilon 0.15, L1 rescale, disjoint mean. Sweeps need
``0 < density - epsilon`` and ``density + epsilon < 1``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/della.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/della.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/della \
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
          normalize=True,
          rescale=True,
          reduce=c.none(str)),
  )
  return c.method_config('della', variants, arg, sweep=SWEEP,
                         protocol='models')
