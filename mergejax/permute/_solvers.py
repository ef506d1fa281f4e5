"""Linear assignment solvers behind one interface, and Sinkhorn soft permutations.

Every solver *maximises* ``sum_i cost[i, perm[i]]`` over permutations and
returns ``perm`` (int32, ``perm[i]`` = column matched to row ``i``).

* ``'scipy'``: exact, on the host (`scipy.optimize.linear_sum_assignment`).
  Inside ``jit`` it runs through ``jax.pure_callback`` (blocks on the host;
  not differentiable).
* ``'lapjv'``: exact, on the host: the C++ Jonker-Volgenant solver of the
  ``lap`` package (a dependency) on row-reduced costs. Its column-reduction and augmenting-row-reduction phases assign most
  rows of a nearly solved problem (the late sweeps of weight matching) before
  any shortest-path search, so it is ~3x faster than SciPy there. Falls back
  to SciPy when ``lap`` cannot be imported (a platform without its wheel)
  or the costs are not finite.
* ``'auto'``: ``'lapjv'`` when ``lap`` imports, else ``'scipy'``.
* ``'hungarian'``: exact, pure JAX (``optax.assignment.hungarian_algorithm``);
  runs inside ``jit``/``vmap`` and on accelerators, sequential O(n^3).
* ``'sinkhorn'``: entropic soft assignment (`sinkhorn`) rounded to a
  permutation with the Hungarian solver; `sinkhorn` alone gives the
  differentiable doubly-stochastic matrix.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

SOLVERS = ('auto', 'scipy', 'lapjv', 'hungarian', 'sinkhorn')
HOST_SOLVERS = ('auto', 'scipy', 'lapjv')

try:  # C++ LAPJV, a dependency; SciPy stands in where it has no wheel.
  import lap as _lap  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  _lap = None


def have_lapjv() -> bool:
  """Whether the ``lap`` package (C++ LAPJV) is importable."""
  return _lap is not None


def scipy_lap(cost: np.ndarray) -> np.ndarray:
  """Host LAP (maximisation) on a NumPy array; returns ``perm`` (int32)."""
  cost = np.asarray(cost, dtype=np.float64)
  _, cols = optimize.linear_sum_assignment(cost, maximize=True)
  return cols.astype(np.int32)


def lapjv_lap(cost: np.ndarray) -> np.ndarray:
  """Host LAP (maximisation) with the ``lap`` package's LAPJV; ``perm`` (int32).

  Solves the equivalent minimisation on the row-reduced costs
  ``max_j C[i, j] - C[i, :] >= 0`` (same optimal assignments: a constant per
  row is subtracted), on which LAPJV's initialisation finds most of the
  assignment. Falls back to SciPy when ``lap`` is missing or the costs are
  not finite, and checks that the answer is a permutation.
  """
  cost = np.asarray(cost, dtype=np.float64)
  n = cost.shape[0]
  if _lap is None or n <= 1 or cost.shape != (n, n) or not np.isfinite(
      cost).all():
    return scipy_lap(cost)
  red = cost.max(axis=1, keepdims=True) - cost
  _, cols, _ = _lap.lapjv(red, return_cost=True)
  cols = np.asarray(cols)
  if cols.shape != (n,) or not np.array_equal(
      np.bincount(cols.clip(0, n - 1), minlength=n), np.ones(n, np.int64)):
    return scipy_lap(cost)  # never expected; keeps the result exact
  return cols.astype(np.int32)


def host_lap(cost: np.ndarray, solver: str = 'auto') -> np.ndarray:
  """Host LAP (maximisation) on ``[..., n, n]`` NumPy costs; ``[..., n]`` int32.

  Args:
    cost: scores, batched over leading axes.
    solver: ``'auto'`` (LAPJV when ``lap`` imports, else SciPy),
      ``'scipy'`` or ``'lapjv'``.
  """
  if solver not in HOST_SOLVERS:
    raise ValueError(f'host solver must be one of {HOST_SOLVERS}, got '
                     f'{solver!r}.')
  fn = scipy_lap if solver == 'scipy' else lapjv_lap
  cost = np.asarray(cost)
  if cost.ndim == 2:
    return fn(cost)
  flat = cost.reshape((-1,) + cost.shape[-2:])
  out = [fn(x) for x in flat]
  if not out:
    return np.zeros(cost.shape[:-1], np.int32)
  return np.stack(out).reshape(cost.shape[:-1])


def hungarian_lap(cost: jax.Array) -> jax.Array:
  """Pure-JAX exact LAP (maximisation) via optax's Hungarian algorithm."""
  cost = jnp.asarray(cost, jnp.float32)
  rows, cols = optax.assignment.hungarian_algorithm(-cost)
  return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


def sinkhorn(cost: jax.Array, *, tau: float | jax.Array = 1.0,
             n_iter: int = 20) -> jax.Array:
  """Doubly-stochastic soft permutation maximising ``<cost, P>`` (log domain).

  ``P = exp((cost - f - g) / tau)`` after ``n_iter`` alternating row/column
  normalisations; differentiable (unrolled). As ``tau -> 0`` it approaches
  the hard assignment.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> p = permute.sinkhorn(jnp.eye(3) * 5., tau=0.1)
    >>> jnp.round(p, 2)
    Array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]], dtype=float32)

  Raises:
    ValueError: for ``n_iter < 1``, a concrete ``tau`` that is not positive
      and finite, or a concrete ``cost`` holding NaN/Inf (traced values, in a
      training loop, are not checked).
  """
  if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
    raise ValueError(f'sinkhorn: n_iter must be a positive int (the number of '
                     f'normalisations), got {n_iter!r}.')
  if not isinstance(tau, jax.core.Tracer) and not (
      np.all(np.isfinite(tau)) and np.all(np.asarray(tau) > 0)):
    raise ValueError(f'sinkhorn: tau must be positive and finite, got {tau!r}.')
  if (not isinstance(cost, jax.core.Tracer) and
      not bool(np.all(np.isfinite(np.asarray(cost, np.float32))))):
    raise ValueError(f'sinkhorn: cost {tuple(np.shape(cost))} holds NaN/Inf; '
                     'check the weights or features it was computed from.')
  logits = jnp.asarray(cost, jnp.float32) / tau

  def body(_, la):
    la = la - jax.nn.logsumexp(la, axis=1, keepdims=True)
    return la - jax.nn.logsumexp(la, axis=0, keepdims=True)

  return jnp.exp(jax.lax.fori_loop(0, n_iter, body, logits))


def _sinkhorn_lap(cost):
  # Rescale so that tau is relative to the cost spread, then round exactly.
  c = jnp.asarray(cost, jnp.float32)
  c = (c - jnp.mean(c)) / (jnp.std(c) + 1e-12)
  return hungarian_lap(sinkhorn(c, tau=0.05, n_iter=50))


def _host_callback(cost: jax.Array, solver: str = 'scipy') -> jax.Array:
  shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)

  def host(c):
    return host_lap(np.asarray(c), solver).astype(np.int32)

  return jax.pure_callback(host, shape, cost, vmap_method='broadcast_all')


def get_solver(solver: str | Callable) -> Callable:
  """Returns a traceable ``cost [..., n, n] -> perm [..., n]`` function.

  Batched over leading axes. The host solvers (``'auto' | 'scipy' |
  'lapjv'``) go through ``jax.pure_callback``, the others are pure JAX
  (vmapped).
  """
  if callable(solver):
    return solver
  if solver in HOST_SOLVERS:
    return functools.partial(_host_callback, solver=solver)
  if solver == 'hungarian':
    fn = hungarian_lap
  elif solver == 'sinkhorn':
    fn = _sinkhorn_lap
  else:
    raise ValueError(f'solver must be one of {SOLVERS} or a callable, got '
                     f'{solver!r}.')

  def batched(cost):
    cost = jnp.asarray(cost)
    lead = cost.shape[:-2]
    flat = cost.reshape((-1,) + cost.shape[-2:])
    return jax.vmap(fn)(flat).reshape(lead + cost.shape[-1:])

  return batched


def solve_assignment(cost, solver: str | Callable = 'scipy') -> jax.Array:
  """Maximising linear assignment: ``perm`` with ``perm[i]`` matched to row i.

  Args:
    cost: ``[..., n, n]`` scores (batched over leading axes).
    solver: ``'auto' | 'scipy' | 'lapjv' | 'hungarian' | 'sinkhorn'`` or a
      callable.

  Returns:
    int32 ``[..., n]``.

  Raises:
    ValueError: if a concrete ``cost`` is not square or holds NaN/Inf (an
      assignment of such scores is arbitrary).

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> c = jnp.array([[0., 1., 0.], [0., 0., 1.], [1., 0., 0.]])
    >>> permute.solve_assignment(c, 'hungarian')
    Array([1, 2, 0], dtype=int32)
  """
  if not isinstance(cost, jax.core.Tracer):
    shape = np.shape(cost)
    if len(shape) < 2 or shape[-1] != shape[-2]:
      raise ValueError(f'solve_assignment needs [..., n, n] scores, got shape '
                       f'{tuple(shape)}.')
    if not np.all(np.isfinite(np.asarray(cost))):
      raise ValueError('solve_assignment: the scores hold NaN/Inf; check the '
                       'inputs they were computed from (e.g. NaN weights).')
  if solver in HOST_SOLVERS and not isinstance(cost, jax.core.Tracer):
    return jnp.asarray(host_lap(np.asarray(cost), solver))
  return get_solver(solver)(cost)
