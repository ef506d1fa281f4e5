r"""TSV-M, task singular vectors merge (Gargiulo et al., 2025).

``fusionbench``: FusionBench ``TSVM`` defaults (``alpha`` 1.0, non-matrix leaves
averaged).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/tsv.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/tsv.py:variant=fusionbench,zoo=smoke,sweep=False \
      --workdir=/tmp/tsv
"""

import importlib.util
import os


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.alpha=(0.5, 1.0, 1.5, 2.0)',
)


def _common():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_common.py')
  spec = importlib.util.spec_from_file_location('_mergejax_cfg_common', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _common()
  variants = dict(
      fusionbench=dict(
          alpha=1.0),
  )
  return c.method_config('tsv', variants, arg, sweep=SWEEP,
                         protocol='models')
