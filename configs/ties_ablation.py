r"""TIES ablations on the default digits zoo.

Task arithmetic vs trim only vs sign election only vs full TIES; a density
sweep per structural variant (one vmapped call each); global vs per-tensor trim;
disjoint mean vs sum. Every setting's lambda is chosen on validation.

Run (from the repository root; the zoo is the default experiment's, cached in
the workdir, so it is shared with ``configs/default.py`` and
``configs/scaling.py`` runs in the same workdir):

  python -m experiments.main --config=configs/ties_ablation.py --workdir=/tmp/exp_work

Tiny variant (seconds; used by the tests):

  python -m experiments.main --config=configs/ties_ablation.py:smoke --workdir=/tmp/w

Override e.g. the density grid:

  python -m experiments.main --config=configs/ties_ablation.py --workdir=/tmp/exp_work \
      --config.densities='(0.1,0.5,1.0)'
"""

from experiments.tools import config_files


def get_config(arg=None):
  """Returns the config; ``arg`` is a variant: None/'default' or 'smoke'."""
  # The zoo and the lambda grid are the default experiment's (same zoo hash,
  # so a shared workdir trains it once).
  config, smoke = config_files.default_variant(__file__, arg, 'ties_ablation')
  # The per-method entries of the default experiment do not apply here.
  del config.methods
  del config.methods_to_run
  # Trim densities, swept in one vmapped call per structural variant; 1.0 is
  # included so that trim only at 1.0 is task arithmetic and TIES at 1.0 is
  # sign election only.
  config.densities = ((0.2, 1.0) if smoke else
                      (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 1.0))
  # Trim scope and TIES disjoint merge; the smoke variant keeps one scope (each
  # variant is a compilation) but still covers mean vs sum.
  config.scopes = ('global',) if smoke else ('tensor', 'global')
  config.reduces = ('mean', 'sum')
  config.paper_density = 0.2  # TIES paper's top-20%, reported as its own row
  return config
