r"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop outliers and small entries.

``mergekit``: density 1.0, gamma 0.01 (mergekit 0.1.5 semantics), no consensus.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/breadcrumbs.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/breadcrumbs.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/breadcrumbs \
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
          rescale=False),
  )
  return c.method_config('breadcrumbs', variants, arg, sweep=SWEEP,
                         protocol='models')
