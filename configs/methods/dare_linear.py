r"""DARE (Yu et al., 2024) drop-and-rescale, then a weighted sum.

``mergekit``: density 1.0 (no drop), L1-preserving rescale. ``paper``
(FusionBench DARE-TA): drop rate 0.5, rescale by ``1/density``, lambda 0.3.
Other presets: ``:variant=paper``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/dare_linear.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/dare_linear.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/dare_linear \
      --config.merge.density=0.3
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.density=(0.1, 0.3, 0.5, 0.9); merge.lambda_=(0.3, 0.5, 1.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          density=1.0,
          lambda_=1.0,
          normalize=False,
          rescale=True),
      paper=dict(
          weight=c.weights(),
          density=0.5,
          lambda_=0.3,
          normalize=False,
          rescale='inverse_density'),
  )
  return c.method_config('dare_linear', variants, arg, sweep=SWEEP,
                         protocol='models')
