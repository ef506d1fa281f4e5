r"""Task arithmetic (Ilharco et al., 2023).

``theta_0 + lambda sum_i w_i tau_i``. ``mergekit``: lambda 1.0, weights 1,
no normalization; ``fusionbench``: lambda 0.3.
Other presets: ``:variant=fusionbench``.

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/task_arithmetic.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/task_arithmetic.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/task_arithmetic \
      --config.merge.lambda_=0.5
"""

from experiments.tools import config_files


# The default sweep (``:sweep=False`` turns it off); floats vmap in one call.
SWEEP = dict(
    product='merge.lambda_=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)',
)


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          weight=c.weights(),
          lambda_=1.0,
          normalize=False),
      fusionbench=dict(
          weight=c.weights(),
          lambda_=0.3,
          normalize=False),
  )
  return c.method_config('task_arithmetic', variants, arg, sweep=SWEEP,
                         protocol='models')
