r"""NuSLERP folded over the fine-tunes (running spherical mean of task vectors).

mergekit ``nuslerp`` (flattened tensors) on two models at a time (protocol
``fold``: ``m_i = nuslerp(m_{i-1}, ft_i)`` with weights ``[i - 1, 1]``).

Run the default sweep over the digits zoo, or one point (``sweep=False``):

  python -m experiments.main --config=configs/methods/nuslerp.py --workdir=workdir
  python -m experiments.main \
      --config=configs/methods/nuslerp.py:variant=mergekit,zoo=smoke,sweep=False \
      --workdir=/tmp/nuslerp
"""

from experiments.tools import config_files


SWEEP = {}  # nothing numeric worth sweeping by default


def get_config(arg=None):
  c = config_files.load_sibling(__file__, '_common.py')
  variants = dict(
      mergekit=dict(
          nuslerp_flatten=True,
          nuslerp_row_wise=False),
  )
  return c.method_config('nuslerp', variants, arg, sweep=SWEEP,
                         protocol='fold')
