r"""Model Stock (Jang et al., 2024): interpolate toward the base by the task-vector angle.

``mergekit``: mean of pairwise cosines, whole tensors. ``fusionbench``: cosine
of the mean pairwise angle.
Other presets: ``:variant=fusionbench``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/model_stock.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/model_stock.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/model_stock
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          filter_wise=False,
          convention='mergekit'),
      fusionbench=dict(
          filter_wise=False,
          convention='fusionbench'),
  )
  return c.method_config('model_stock', variants, arg, sweep=SWEEP,
                         protocol='models')
