r"""SLERP between the base and the task-arithmetic sum ("spherical task arithmetic").

mergekit ``slerp`` (dot threshold 0.9995) on two endpoints: the base and
``theta_0 + sum_i tau_i`` (protocol ``sum_endpoint``), so ``t`` plays lambda's role.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/slerp.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/slerp.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/slerp \
      --config.merge.t=0.25
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.t=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          t=0.5,
          dot_threshold=0.9995),
  )
  return c.method_config('slerp', variants, arg, sweep=SWEEP,
                         protocol='sum_endpoint')
