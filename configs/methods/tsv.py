r"""TSV-M, task singular vectors merge (Gargiulo et al., 2025).

``fusionbench``: FusionBench ``TSVM`` defaults (``alpha`` 1.0, non-matrix leaves
averaged).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/tsv.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/tsv.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/tsv
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.alpha=(0.5, 1.0, 1.5, 2.0)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(
          alpha=1.0),
  )
  return c.method_config('tsv', variants, arg, sweep=SWEEP,
                         protocol='models')
