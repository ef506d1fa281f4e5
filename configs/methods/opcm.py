r"""OPCM, orthogonal projection continual merging (FusionBench).

``fusionbench``: ``alpha`` 0.5 (energy fraction kept out of the projection);
models merged in the given order.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/opcm.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/opcm.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/opcm
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.alpha=(0.3, 0.5, 0.8)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(
          alpha=0.5),
  )
  return c.method_config('opcm', variants, arg, sweep=SWEEP,
                         protocol='models')
