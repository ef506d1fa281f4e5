r"""Iso-CTS, common and task-specific subspaces (Marczak et al., 2025).

``fusionbench``: ``common_space_fraction`` 0.8, ``alpha`` 1.0 (``table``: 1.5).
``common_space_fraction`` sets ranks: sweep it with ``static``.
Other presets: ``:variant=table``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/iso_cts.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/iso_cts.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/iso_cts
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product=('merge.alpha=(0.5, 1.0, 1.5, 2.0); '
             'merge.common_space_fraction=(0.5, 0.8)'),
    static='merge.common_space_fraction',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(
          alpha=1.0,
          common_space_fraction=0.8),
      table=dict(
          alpha=1.5,
          common_space_fraction=0.8),
  )
  return c.method_config('iso_cts', variants, arg, sweep=SWEEP,
                         protocol='models')
