"""Test configuration: 8 virtual CPU devices, set before JAX starts a backend."""

import os

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
# CLI runs inside the test process must not turn on (and fill) the user's
# persistent compilation cache; the cache has its own subprocess test.
os.environ.setdefault('MERGEJAX_COMPILE_CACHE', 'none')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded by default')
  config.addinivalue_line('markers', 'peer: parity test against an installed peer')

