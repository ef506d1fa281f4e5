r"""NearSwap between the base and the task-arithmetic sum.

mergekit ``nearswap`` with the summed task vector as the other model: entries
of the sum are clipped to ``[-t, t]`` (``t`` in parameter units).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/nearswap.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/nearswap.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/nearswap \
      --config.merge.t=0.0005
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.t=(5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          t=0.001),
  )
  return c.method_config('nearswap', variants, arg, sweep=SWEEP,
                         protocol='sum_endpoint')
