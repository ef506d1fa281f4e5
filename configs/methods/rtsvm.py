r"""R-TSVM: TSV-M with outlier reweighting and spectrum-adaptive ranks.

Yang et al. (2025, arXiv 2502.06876); the two reweighting formulas are our
reading of the paper's abstract (see ``docs/methods/rtsvm.md``).
``default``: ``alpha`` 1.0, ``quantile`` 0.99, ``energy`` 0.95 (mergejax's
defaults). ``tsv``: ``quantile`` 1, ``energy`` 1, which is exactly TSV-M.
Every knob is traced, so the whole sweep is one vmapped call.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/rtsvm.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/rtsvm.py:variant=tsv,zoo=smoke,sweep=False \
      --workdir=/tmp/rtsvm
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product=('merge.alpha=(1.0, 2.0, 3.0); merge.quantile=(0.99, 1.0); '
             'merge.energy=(0.5, 0.95)'),
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      default=dict(
          alpha=1.0,
          quantile=0.99,
          energy=0.95),
      tsv=dict(
          alpha=1.0,
          quantile=1.0,
          energy=1.0),
  )
  return c.method_config('rtsvm', variants, arg, sweep=SWEEP,
                         protocol='models')
