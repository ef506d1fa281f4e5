"""Shared builder for the per-method configs in this directory.

Every ``configs/methods/<method>.py`` is a full experiment config for the
launcher: the digits zoo of ``configs/default.py`` (``zoo=default|smoke``), one
method described by a flat ``config.merge`` section (``method`` plus the
factory's keyword arguments, mergekit names and defaults), a ``protocol`` (which
models the method sees, as in ``configs/default.py``) and a ``sweep``
(``config.sweep.product`` / ``config.sweep.zip`` strings, see
``experiments.tools.sweep.parse_sweep``). ``config.experiment = 'sweep'`` runs it
with ``experiments/sweep.py``.

Config-file arguments (``file.py:k=v,k=v``): ``variant`` (the method file's
presets; the first is the default and a bare ``file.py:name`` selects one),
``zoo`` (``default`` or ``smoke``) and ``sweep`` (``True``: the file's default
sweep; ``False``: the single configured point).
"""


import ml_collections
from ml_collections import config_dict

from experiments.tools import config_files
from experiments.tools import sweep as sweep_lib



def load_sibling(path: str):
  """Imports a config file of this directory by path (not a package)."""
  return config_files.load_sibling(__file__, path)


def weights():
  """A per-model weight field: None (1 per model) unless set, e.g.
  ``--config.merge.weight='(1., 0.5, 1.)'``."""
  return config_dict.placeholder(tuple)


def method_config(method: str, variants: dict, arg=None, *,
                  sweep: dict | None = None, protocol: str = 'models'
                  ) -> ml_collections.ConfigDict:
  """Builds the experiment config for one method.

  Args:
    method: the name in ``mergejax.methods``.
    variants: ``{variant: {kwarg: value}}``; the first is the default.
    arg: the config-file argument string.
    sweep: ``{'product': '...', 'zip': '...'}`` for ``sweep=True``.
    protocol: ``models`` / ``no_base`` / ``sum_endpoint`` / ``fold`` (see
      ``configs/default.py``).

  Returns:
    The (unlocked) config; the launcher locks it.
  """
  a = sweep_lib.parse_arg(arg, variant=next(iter(variants)), zoo='default',
                          sweep=True)
  if a.variant not in variants:
    raise ValueError(f'{method}: unknown variant {a.variant!r}; valid: '
                     f'{sorted(variants)}.')
  default = load_sibling('../default.py').get_config(a.zoo)

  config = ml_collections.ConfigDict()
  config.experiment = 'sweep'
  config.seed = default.seed
  config.progress = default.progress
  config.zoo = default.zoo
  config.params = default.merge.params  # merged subtree; heads stay per task
  config.protocol = protocol
  config.variant = a.variant
  config.merge = ml_collections.ConfigDict(dict(method=method,
                                                **variants[a.variant]))
  sweep = dict(sweep or {}) if a.sweep else {}
  # static: comma-separated names of float fields to sweep as structural
  # variants (one compile each) rather than vmapped.
  config.sweep = ml_collections.ConfigDict(dict(
      product=sweep.get('product', ''), zip=sweep.get('zip', ''),
      static=sweep.get('static', '')))
  return config


def none(type_):
  """An unset field of type ``type_`` (the factory's default applies)."""
  return config_dict.placeholder(type_)
