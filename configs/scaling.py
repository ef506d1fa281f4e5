r"""Scaling with the number of merged models, K = 2..8.

Each method merges the first K fine-tunes of the default digits zoo; the
average normalized test accuracy on those K tasks is reported, with the
method's scale (``lambda_`` or ``alpha``) swept in one vmapped call and chosen
on validation. Method entries (kwargs, sweep) are the default experiment's.

Run (from the repository root; the zoo is cached in the workdir and shared
with ``configs/default.py`` and ``configs/ties_ablation.py``):

  python -m experiments.main --config=configs/scaling.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/scaling.py:smoke --workdir=/tmp/w

Other methods or sizes:

  python -m experiments.main --config=configs/scaling.py --workdir=/tmp/exp_work \
      --config.methods_to_run=task_arithmetic,ties,knots --config.ks='(2,4,8)'
"""

import ml_collections

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  # The zoo and the lambda grid are the default experiment's (same zoo hash,
  # so a shared workdir trains it once).
  config, smoke = config_files.default_variant(__file__, arg, 'scaling')
  # Numbers of merged models (the first K fine-tunes, in zoo task order).
  config.ks = (2, 3) if smoke else (2, 3, 4, 5, 6, 7, 8)
  # Methods of the 'models' protocol with an entry in config.methods. tsv is
  # left out of the default list: its merge takes ~2 min per K on a 2-core CPU
  # (add it with --config.methods_to_run=...,tsv).
  # (The smoke variant skips TIES: one top-k compilation per K costs seconds.)
  config.methods_to_run = ('task_arithmetic' if smoke else
                           'task_arithmetic,ties,iso_c,consensus')
  if not smoke:
    # Iso-C's alpha scales a spectrum-flattened (isotropic) sum; on this zoo it
    # picks the top of the shared lambda grid (3.0) at every K, so give it a
    # wider grid of its own (a new field, not the shared reference).
    config.methods.iso_c.sweep = ml_collections.ConfigDict(
        dict(alpha=(0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)))
  return config
