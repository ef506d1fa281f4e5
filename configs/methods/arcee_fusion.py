r"""Arcee Fusion between the base and the task-arithmetic sum.

mergekit ``arcee_fusion`` (no parameters; KL-weighted importance, IQR threshold).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/arcee_fusion.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/arcee_fusion.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/arcee_fusion
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(),
  )
  return c.method_config('arcee_fusion', variants, arg, sweep=SWEEP,
                         protocol='sum_endpoint')
