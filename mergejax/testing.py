"""Helpers for testing merge code: small model zoos, closeness, compile counts.

>>> import mergejax as mj
>>> from mergejax import testing
>>> base, models = testing.random_models({'w': (3, 2)}, k=2)
>>> with testing.log_compilations() as log:
...   a = mj.merge(mj.methods.task_arithmetic(lambda_=0.3), base, models)
...   b = mj.merge(mj.methods.task_arithmetic(lambda_=0.7), base, models)
>>> log.count('_run')  # one compile of the merge; hyperparameters are traced
1
>>> testing.assert_trees_close(a, a)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = (
    'CompilationLog', 'log_compilations', 'assert_trees_close',
    'random_models', 'SMALL_SHAPES', 'require_peer', 'PEER_SKIP_REASON',
    'REQUIRE_PEERS_ENV',
)

REQUIRE_PEERS_ENV = 'MERGEJAX_REQUIRE_PEERS'

# One reason for every peer skip, so the run ends with one line saying how to
# run the parity tests, whichever peer is missing.
PEER_SKIP_REASON = (
    'parity tests need the peers (torch, mergekit, fusion-bench); run them '
    "with: pip install -e '.[peers]' && "
    f"{REQUIRE_PEERS_ENV}=1 python -m pytest -q -m 'peer and not slow'")

# An encoder (kernel and bias) and a head: two matrices and a vector, enough
# to exercise per-leaf, per-matrix and per-layer code paths.
SMALL_SHAPES = {'enc/kernel': (4, 5), 'enc/bias': (5,), 'head': (5, 2)}

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class CompilationLog:
  """Names of the functions XLA compiled while a `log_compilations` block ran."""

  def __init__(self):
    self.names: list[str] = []

  def count(self, name: str | None = None) -> int:
    """Compilations of functions whose name contains ``name`` (all if None)."""
    return sum(1 for n in self.names if name is None or name in n)

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f'CompilationLog({self.names!r})'


@contextlib.contextmanager
def log_compilations() -> Iterator[CompilationLog]:
  """Records every XLA compilation inside the ``with`` block.

  Counts real backend compilations (cache hits are not compilations), so a
  test can assert that re-running a merge with new hyperparameter values
  compiles nothing: ``log.count('_run') == 0``. Eager operations compile
  small ``jit(...)`` programs of their own; filter by name to count one
  function.

  Yields:
    A `CompilationLog`, filled while the block runs.
  """
  log = CompilationLog()

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    del duration
    if event == _COMPILE_EVENT:
      log.names.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield log
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 1e-5,
                       atol: float = 1e-5) -> None:
  """Asserts two pytrees have one structure and leaves close in float64.

  Leaves may be JAX or NumPy arrays of any float dtype (bfloat16 included);
  a mismatch names the leaf's path.

  Raises:
    AssertionError: on a different structure, shape or value.
  """
  if not isinstance(actual, (dict, list, tuple)) or not isinstance(
      expected, (dict, list, tuple)):
    # A single array against an array-like (a nested list, a scalar).
    actual, expected = np.asarray(_f32(actual)), np.asarray(_f32(expected))
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  if tree_a != tree_e:
    raise AssertionError(f'tree structures differ:\n  {tree_a}\n  {tree_e}')
  for (path, a), (_, e) in zip(flat_a, flat_e):
    name = jax.tree_util.keystr(path)
    a = np.asarray(_f32(a), np.float64)
    e = np.asarray(_f32(e), np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol,
                               err_msg=f'leaf {name}')


def _f32(x):
  # NumPy cannot cast ml_dtypes' bfloat16 to float64 on every version.
  if getattr(x, 'dtype', None) in (jnp.bfloat16, np.dtype('float16')):
    return np.asarray(jnp.asarray(x, jnp.float32))
  return x


def random_models(shapes: Mapping[str, Sequence[int]] | None = None,
                  k: int = 3, *, seed: int = 0, scale: float = 1.0,
                  dtype: Any = jnp.float32, nested: bool = True,
                  noise: Callable[[np.random.Generator, tuple[int, ...]],
                                  np.ndarray] | None = None,
                  as_numpy: bool = False) -> tuple[Any, list[Any]]:
  """A random base model and ``k`` fine-tunes near it.

  ``base`` is standard normal; fine-tune ``i`` is ``base + scale * noise``
  with standard normal noise unless ``noise(rng, shape)`` is given. Draws come
  from ``numpy.random.default_rng(seed)``, so every platform gets the same
  values.

  Args:
    shapes: leaf paths to shapes (default `SMALL_SHAPES`).
    k: number of fine-tuned models.
    seed: NumPy seed.
    scale: size of the fine-tuning deltas.
    dtype: leaf dtype.
    nested: split paths on ``/`` into nested dicts (else one flat dict).
    noise: draws one delta, ``noise(rng, shape) -> array``.
    as_numpy: return NumPy arrays instead of JAX arrays.

  Returns:
    ``(base, models)``.
  """
  shapes = SMALL_SHAPES if shapes is None else shapes
  rng = np.random.default_rng(seed)
  draw = noise or (lambda r, s: r.standard_normal(s))
  base = {n: rng.standard_normal(tuple(s)) for n, s in shapes.items()}
  if as_numpy:
    base = {n: x.astype(dtype) for n, x in base.items()}
    # Deltas in insertion order, summed in float64, cast once.
    models = [{n: (x + scale * np.asarray(draw(rng, x.shape))).astype(dtype)
               for n, x in base.items()} for _ in range(k)]
    return (_nest(base) if nested else base), [
        _nest(m) if nested else m for m in models]
  build = _nest if nested else dict
  base = jax.tree.map(lambda x: jnp.asarray(x, dtype), build(base))
  # Deltas leaf by leaf in `jax.tree` order, added in ``dtype``.
  models = [jax.tree.map(lambda x: x + scale * jnp.asarray(
      draw(rng, x.shape), dtype), base) for _ in range(k)]
  return base, models


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, x in flat.items():
    *parents, leaf = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


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
