r"""Karcher (Riemannian) mean of the fine-tuned models.

``mergekit``: max_iter 10, tol 1e-5, uniform weights, no base (protocol
``no_base``).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/karcher.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/karcher.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/karcher \
      --config.merge.tol=5e-06
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.max_iter=(1, 3, 10)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          max_iter=10,
          tol=1e-05),
  )
  return c.method_config('karcher', variants, arg, sweep=SWEEP,
                         protocol='no_base')
