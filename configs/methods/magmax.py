r"""MagMax (Marczak et al., 2024): per entry, the task vector of largest magnitude.

``fusionbench``: scaling factor 0.5.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/magmax.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/magmax.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/magmax \
      --config.merge.lambda_=0.25
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.lambda_=(0.3, 0.5, 0.7, 1.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(
          lambda_=0.5),
  )
  return c.method_config('magmax', variants, arg, sweep=SWEEP,
                         protocol='models')
