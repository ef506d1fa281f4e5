"""Helpers shared by the test suite (importable under any pytest import mode)."""

from __future__ import annotations

import importlib
import os
import types

REQUIRE_PEERS_ENV = 'MERGEJAX_REQUIRE_PEERS'

# One reason for every peer skip, so the run ends with one line saying how to
# run the parity tests, whichever peer is missing.
PEER_SKIP_REASON = (
    'parity tests need the peers (torch, mergekit, fusion-bench); run them '
    "with: pip install -e '.[peers]' && "
    f"{REQUIRE_PEERS_ENV}=1 python -m pytest -q -m 'peer and not slow'")


def require_peer(name: str) -> types.ModuleType:
  """Imports a peer library for a parity test.

  Without the peer the calling test, or the whole module when called at module
  level, is skipped with `PEER_SKIP_REASON`. With ``MERGEJAX_REQUIRE_PEERS``
  set (the CI parity run, after installing the peers) a missing peer is a
  broken set-up, and the import error is raised instead.
  """
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get(REQUIRE_PEERS_ENV):
      raise
    pytest.skip(PEER_SKIP_REASON, allow_module_level=True)
