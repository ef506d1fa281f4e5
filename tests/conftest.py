"""Test configuration: 8 virtual CPU devices, set before JAX starts a backend."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded by default')
  config.addinivalue_line('markers', 'peer: parity test against an installed peer')

