"""Loading config files that are not a package (ml_collections configs).

The launcher loads ``configs/*.py`` by path, so they cannot import each other
as modules; this is the one place that imports a sibling config file by path.
"""

import importlib.util
import os
from types import ModuleType

__all__ = (
    'load_sibling',
    'is_smoke',
    'default_variant',
)


def load_sibling(anchor: str, name: str) -> ModuleType:
  """Imports file ``name`` that sits in the directory of file ``anchor``.

  Args:
    anchor: usually the calling config's ``__file__``.
    name: the sibling's file name, e.g. ``'_common.py'``.

  Returns:
    The executed module (a fresh one on every call).

  Example:
    >>> import experiments.tools.config_files as cf
    >>> cf.load_sibling(cf.__file__, 'config_files.py').load_sibling.__name__
    'load_sibling'
  """
  path = os.path.join(os.path.dirname(os.path.abspath(anchor)), name)
  module_name = '_mergejax_cfg_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def is_smoke(arg: str | None) -> bool:
  """Whether a config's variant ``arg`` (None/``'default'`` or ``'smoke'``) is
  the smoke one.

  Raises:
    ValueError: for any other variant.

  Example:
    >>> is_smoke(None), is_smoke('smoke')
    (False, True)
  """
  variant = arg or 'default'
  if variant not in ('default', 'smoke'):
    raise ValueError(f"Unknown variant {variant!r}: use 'default' or 'smoke'.")
  return variant == 'smoke'


def default_variant(anchor: str, arg: str | None, experiment: str):
  """The default experiment's config for an experiment built on its zoo.

  Args:
    anchor: the calling config's ``__file__`` (``default.py`` is its sibling).
    arg: the variant, None/``'default'`` or ``'smoke'``.
    experiment: the ``experiments.<name>`` module to run instead.

  Returns:
    ``(config, smoke)``: the default config with ``experiment`` set, and
    whether the smoke variant was asked for. The zoo (and so its hash and
    cache) is the default experiment's.

  Raises:
    ValueError: for any other variant.
  """
  smoke = is_smoke(arg)
  config = load_sibling(anchor, 'default.py').get_config(
      'smoke' if smoke else 'default')
  config.experiment = experiment
  return config, smoke
