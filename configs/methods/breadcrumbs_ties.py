r"""Model Breadcrumbs with TIES sign consensus.

``mergekit``: density 1.0, gamma 0.01, sum sign election, disjoint sum.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/breadcrumbs_ties.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/breadcrumbs_ties.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/breadcrumbs_ties \
      --config.merge.density=0.3
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.density=(0.1, 0.3, 0.5, 0.9); merge.gamma=(0.0, 0.01, 0.05)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          density=1.0,
          gamma=0.01,
          lambda_=1.0,
          normalize=False,
          rescale=False,
          reduce=c.none(str)),
  )
  return c.method_config('breadcrumbs_ties', variants, arg, sweep=SWEEP,
                         protocol='models')
