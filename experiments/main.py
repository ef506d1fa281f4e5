r"""Launcher for every experiment (big_vision style).

  python -m experiments.main --config=configs/default.py[:variant] \
      --workdir=DIR [--config.field=value ...]

The config file's ``get_config(arg)`` builds an ``ml_collections.ConfigDict``;
it is locked, so an override naming a field that does not exist (a typo such
as ``--config.merge.densty=0.3``) is an error that lists the valid fields.
``config.experiment`` names the module ``experiments.<name>`` whose
``main(config, workdir)`` runs.
"""

from __future__ import annotations

import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/default.py or '
    'configs/default.py:smoke.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for caches and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str):
  """Runs ``experiments.<config.experiment>.main(config, workdir)``."""
  module = importlib.import_module(f'experiments.{config.experiment}')
  return module.main(config, workdir)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; keep the output to the table.
    logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(_main)
