r"""RAM (reinforced-agent merging): average shared updates, keep unique ones.

``mergekit``: epsilon 1e-5 (tensor-local, as mergekit ``ram``).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/ram.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/ram.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/ram \
      --config.merge.epsilon=5e-06
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          epsilon=1e-05),
  )
  return c.method_config('ram', variants, arg, sweep=SWEEP,
                         protocol='models')
