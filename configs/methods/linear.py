r"""Linear (weighted) average of the fine-tuned models.

mergekit ``linear``: ``sum_i w_i theta_i / sum_i w_i``; the base takes no part
(protocol ``no_base``). FusionBench ``simple_average`` is ``weight=None``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/linear.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/linear.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/linear
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          normalize=True),
  )
  return c.method_config('linear', variants, arg, sweep=SWEEP,
                         protocol='no_base')
