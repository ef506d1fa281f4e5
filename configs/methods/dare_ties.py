r"""DARE drop-and-rescale, then TIES sign election and disjoint merge.

``mergekit``: density 1.0, L1 rescale, disjoint *sum* (normalize False).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/dare_ties.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/dare_ties.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/dare_ties \
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
          rescale=True,
          reduce=c.none(str)),
  )
  return c.method_config('dare_ties', variants, arg, sweep=SWEEP,
                         protocol='models')
