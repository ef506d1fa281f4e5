r"""WUDI, data-free merging against each task vector's inputs (Cheng et al., 2025).

``fusionbench``: Adam from the sum of task vectors, 400 steps at learning rate
1e-5 (FusionBench's config), no scale; ``closed_form``: the minimiser of the
same loss.
Other presets: ``:variant=closed_form``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/wudi.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/wudi.py:variant=closed_form,zoo=smoke,sweep=False \
      --workdir=/tmp/wudi
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.learning_rate=(1e-5, 1e-4, 1e-3)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      fusionbench=dict(
          learning_rate=1e-5, steps=400, solver='adam'),
      closed_form=dict(
          learning_rate=1e-5, steps=400, solver='closed_form'),
  )
  return c.method_config('wudi', variants, arg, sweep=SWEEP,
                         protocol='models')
