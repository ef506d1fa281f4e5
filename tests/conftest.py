"""Test configuration: 8 virtual CPU devices, set before JAX starts a backend."""

import os

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded by default')
  config.addinivalue_line('markers', 'peer: parity test against an installed peer')


def require_peer(name: str):
  """Imports a peer library; skips locally if absent, fails in CI.

  CI (``CI=true`` or ``MERGEJAX_REQUIRE_PEERS=1``) installs the peers, so a
  missing peer there is a broken set-up, not a reason to skip parity tests.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get('CI') or os.environ.get('MERGEJAX_REQUIRE_PEERS'):
      raise
    pytest.skip(f'peer {name!r} not installed (pip install -e ".[peers]")')
