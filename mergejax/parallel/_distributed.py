"""Multi-host helpers around `jax.distributed.initialize`.

A multi-host merge is the single-host `mergejax.parallel.sharded_merge` call run by
every process with the same arguments: JAX's runtime does the rest (each
process reads only the input blocks its devices hold; collectives cross hosts).
These helpers cover the set-up around it: initialising the runtime (with CPU
collectives, so the same code runs as several processes on one machine for
tests), gathering a result to every host, and launching local processes.

Example (two processes on one machine, each with 2 CPU devices)::

  # worker.py
  import sys
  from mergejax import parallel
  parallel.initialize('localhost:12355', num_processes=2,
                      process_id=int(sys.argv[1]), local_device_count=2)
  import mergejax as mj
  mesh = mj.parallel.make_mesh((2, 2))          # 4 global devices
  merged = mj.parallel.sharded_merge(tx, base, models, mesh=mesh)
  host = parallel.gather(merged)             # NumPy, on every process
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

ENV_COORDINATOR = 'MERGEJAX_COORDINATOR'
ENV_NUM_PROCESSES = 'MERGEJAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'MERGEJAX_PROCESS_ID'


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               *,
               local_device_count: int | None = None,
               cpu_collectives: str | None = 'gloo',
               **kwargs: Any) -> None:
  """Starts JAX's multi-process runtime; call before any other JAX call.

  Arguments left None are read from ``MERGEJAX_COORDINATOR``,
  ``MERGEJAX_NUM_PROCESSES`` and ``MERGEJAX_PROCESS_ID`` when set, and
  otherwise left to `jax.distributed.initialize`'s own auto-detection (TPU
  pods, SLURM, Open MPI). With one process and no coordinator this does
  nothing, so single-host scripts can call it unconditionally.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: the number of processes.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    local_device_count: the number of CPU devices this process exposes (sets
      ``jax_num_cpu_devices``; for CPU runs and tests).
    cpu_collectives: the CPU collectives implementation (``'gloo'`` or
      ``'mpi'``); needed for cross-process collectives on CPU.
    **kwargs: passed to `jax.distributed.initialize` (e.g.
      ``initialization_timeout``, ``local_device_ids``).
  """
  env = os.environ
  if coordinator_address is None and ENV_COORDINATOR in env:
    coordinator_address = env[ENV_COORDINATOR]
  if num_processes is None and ENV_NUM_PROCESSES in env:
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and ENV_PROCESS_ID in env:
    process_id = int(env[ENV_PROCESS_ID])
  if local_device_count is not None:
    jax.config.update('jax_num_cpu_devices', int(local_device_count))
  if cpu_collectives is not None:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  if coordinator_address is None and num_processes in (None, 1):
    return  # single process: nothing to start
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'process_id={process_id} is outside [0, {num_processes}).')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id, **kwargs)


def shutdown() -> None:
  """Stops the multi-process runtime (a no-op when it was never started)."""
  if is_initialized():
    jax.distributed.shutdown()


def is_initialized() -> bool:
  """Whether `jax.distributed.initialize` has run in this process."""
  # pylint: disable-next=protected-access
  return jax._src.distributed.global_state.client is not None


def is_coordinator() -> bool:
  """True on process 0: the one that should write shared files and logs."""
  return jax.process_index() == 0


def gather(tree: Any) -> Any:
  """Every leaf of ``tree`` (global arrays) as a full NumPy array on every host.

  Example:
    >>> import jax.numpy as jnp
    >>> gather({'w': jnp.arange(3.)})['w']
    array([0., 1., 2.], dtype=float32)
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def sync(name: str) -> None:
  """A barrier across processes (e.g. before reading another host's files)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def free_port() -> int:
  """A TCP port on localhost that is free right now (for a local coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch_local(argv: Sequence[str], num_processes: int, *,
                 port: int | None = None, timeout: float | None = None,
                 env: dict[str, str] | None = None
                 ) -> list[subprocess.CompletedProcess]:
  """Runs ``num_processes`` copies of a Python program on this machine.

  Each copy gets ``MERGEJAX_COORDINATOR=localhost:PORT``,
  ``MERGEJAX_NUM_PROCESSES`` and its ``MERGEJAX_PROCESS_ID`` in its
  environment, so the program just calls `initialize()` with no arguments.

  Args:
    argv: the program's arguments after ``python``, e.g. ``['worker.py']``.
    num_processes: how many processes to start.
    port: the coordinator port (default: a free one).
    timeout: seconds to wait for all of them; on expiry all are killed.
    env: extra environment variables.

  Returns:
    One `subprocess.CompletedProcess` per process (stdout/stderr captured as
    text), in process order.

  Raises:
    subprocess.TimeoutExpired: if they do not finish within ``timeout``.
  """
  port = free_port() if port is None else port
  procs = []
  for i in range(num_processes):
    e = dict(os.environ, **(env or {}))
    e.update({ENV_COORDINATOR: f'localhost:{port}',
              ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(i)})
    procs.append(subprocess.Popen([sys.executable, *argv], env=e,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  deadline = None if timeout is None else time.monotonic() + timeout
  results = []
  try:
    for p in procs:
      left = None if deadline is None else max(0.1, deadline - time.monotonic())
      out, err = p.communicate(timeout=left)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.communicate()
    raise
  return results
