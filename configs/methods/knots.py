r"""KnOTS, merging task updates in a shared SVD basis (Stoica et al., 2025).

``paper``: task arithmetic on the aligned blocks, ``lambda_`` 1.0.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/knots.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/knots.py:variant=paper,zoo=smoke,sweep=False \
      --workdir=/tmp/knots
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.lambda_=(0.3, 0.5, 1.0, 1.5)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      paper=dict(
          lambda_=1.0),
  )
  return c.method_config('knots', variants, arg, sweep=SWEEP,
                         protocol='models')
