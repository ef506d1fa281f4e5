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

import difflib
import importlib.util
import os
import sys

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


def _load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config_module', path)
  if module_spec is None:
    raise app.UsageError(f'--config={spec}: no config file at {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_overrides(argv) -> str | None:
  """Returns an error naming the valid fields if an override has a typo.

  ml_collections rejects an unknown field of a locked config too, but only with
  a traceback and a single suggestion; this lists the fields that do exist at
  that level.
  """
  spec = next((a.split('=', 1)[1] for a in argv
               if a.startswith('--config=')), None)
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv
               if a.startswith('--config.')]
  if spec is None or not overrides:
    return None
  config = _load_config(spec)
  for override in overrides:
    node, walked = config, 'config'
    for part in override.split('.'):
      if '[' in part or not hasattr(node, 'keys'):
        break  # indexing into sequences is left to ml_collections
      if part not in node:
        valid = sorted(node.keys())
        near = difflib.get_close_matches(part, valid, n=1)
        hint = f' Did you mean {walked}.{near[0]}?' if near else ''
        return (f'--config.{override}: {walked} has no field {part!r} (the '
                f'config is locked, so typos are errors). Valid fields of '
                f'{walked}: {", ".join(valid)}.{hint}')
      node, walked = node[part], f'{walked}.{part}'
  return None


def _parse_flags(argv):
  error = check_overrides(argv)
  if error:
    print(f'FATAL: {error}', file=sys.stderr)
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


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
  # Compiled merges are cached on disk next to the zoo, so a second run of the
  # same experiment skips most compilation too.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(os.path.abspath(_WORKDIR.value), 'jax_cache'))
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(_main, flags_parser=_parse_flags)
