"""Test configuration: 8 virtual CPU devices, set before JAX starts a backend."""

import collections
import gc
import os

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')
# CLI runs inside the test process must not turn on (and fill) the user's
# persistent compilation cache; the cache has its own subprocess test.
os.environ.setdefault('MERGEJAX_COMPILE_CACHE', 'none')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded by default')
  config.addinivalue_line('markers', 'peer: parity test against an installed peer')


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  return reason.removeprefix('Skipped: ')


def pytest_terminal_summary(terminalreporter):
  # Skips grouped by reason alone (pytest's -rs repeats a reason once per
  # file), so a run without the parity peers ends with one line saying how
  # to run them.
  reasons = collections.Counter(
      _skip_reason(r) for r in terminalreporter.stats.get('skipped', ()))
  for reason, count in sorted(reasons.items()):
    terminalreporter.write_line(f'SKIPPED ({count}): {reason}')


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  # Every XLA:CPU executable keeps its JIT-compiled code mapped until its
  # cache entry goes; over the whole suite in one process the mappings
  # approach the kernel's vm.max_map_count and a later compilation crashes.
  # Modules share few compiled functions, so freeing them per module costs
  # little.
  yield
  jax.clear_caches()
  gc.collect()
