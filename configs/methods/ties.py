r"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

``mergekit``: per-tensor trim with mergekit's default density 1.0 (no trim),
weighted disjoint mean, lambda 1.0. ``paper``: global top-20% trim, disjoint
mean. ``fusionbench``: global trim at threshold 20 with FusionBench's count
rule, majority for zero signs, disjoint *sum*, scaling 0.3.
Other presets: ``:variant=paper``, ``:variant=fusionbench``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/ties.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/ties.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/ties \
      --config.merge.density=0.3
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product=('merge.density=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0); '
             'merge.lambda_=(0.5, 1.0, 1.5)'),
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          density=1.0,
          lambda_=1.0,
          normalize=True,
          rescale=False,
          scope='tensor',
          reduce=c.none(str)),
      paper=dict(
          weight=c.weights(),
          density=0.2,
          lambda_=1.0,
          normalize=True,
          rescale=False,
          scope='global',
          reduce=c.none(str)),
      fusionbench=dict(
          weight=c.weights(),
          density=0.2,
          lambda_=0.3,
          normalize=True,
          rescale=False,
          scope='global',
          count='fusionbench',
          exact=False,
          zero='majority',
          reduce='sum'),
  )
  return c.method_config('ties', variants, arg, sweep=SWEEP,
                         protocol='models')
