r"""Uniform average of the fine-tuned models (FusionBench simple_average).

FusionBench ``simple_average``: the mean of the K fine-tunes.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/average.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/average.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/average
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(),
  )
  return c.method_config('average', variants, arg, sweep=SWEEP,
                         protocol='models')
