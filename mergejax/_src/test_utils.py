"""Helpers shared by the test suite (importable under any pytest import mode)."""

from __future__ import annotations

import importlib
import os
import types


def require_peer(name: str) -> types.ModuleType:
  """Imports a peer library for a parity test.

  Locally a missing peer skips the test. CI (``CI`` or
  ``MERGEJAX_REQUIRE_PEERS`` set) installs the peers, so there a missing peer is
  a broken set-up and the import error is raised rather than skipped.
  """
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get('CI') or os.environ.get('MERGEJAX_REQUIRE_PEERS'):
      raise
    pytest.skip(f'peer {name!r} not installed (pip install -e ".[peers]")')
