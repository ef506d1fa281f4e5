r"""Consensus merging: drop weights fewer than k tasks use (Wang et al., 2024).

``paper``: ``k`` 2, TALL-mask ``tall_lambda`` 0.6, ``lambda_`` 0.3.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/consensus.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/consensus.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/consensus
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.k=(1.0, 2.0); merge.lambda_=(0.3, 0.5, 1.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      paper=dict(
          lambda_=0.3,
          k=2.0,
          tall_lambda=0.6,
          formula='paper'),
  )
  return c.method_config('consensus', variants, arg, sweep=SWEEP,
                         protocol='models')
