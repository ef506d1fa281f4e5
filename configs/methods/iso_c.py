r"""Iso-C, isotropic merging in the common subspace (Marczak et al., 2025).

``fusionbench``: ``scaling_factor`` 1.0 (FusionBench config); ``table``: 1.5 (the
value in its docs and tables).
Other presets: ``:variant=table``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/iso_c.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/iso_c.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/iso_c
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
      table=dict(
          alpha=1.5),
  )
  return c.method_config('iso_c', variants, arg, sweep=SWEEP,
                         protocol='models')
