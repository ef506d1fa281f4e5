r"""SCE (FuseChat, Wan et al., 2024): select by variance, calculate weights, erase sign conflicts.

``mergekit``: ``select_topk`` 1.0 (keep all).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/sce.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/sce.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/sce \
      --config.merge.select_topk=0.5
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.select_topk=(0.1, 0.3, 0.5, 1.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          select_topk=1.0),
  )
  return c.method_config('sce', variants, arg, sweep=SWEEP,
                         protocol='models')
