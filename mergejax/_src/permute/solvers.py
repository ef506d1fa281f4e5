"""Linear assignment solvers behind one interface, and Sinkhorn soft permutations.

Every solver *maximises* ``sum_i cost[i, perm[i]]`` over permutations and
returns ``perm`` (int32, ``perm[i]`` = column matched to row ``i``).

* ``'scipy'``: exact, on the host (`scipy.optimize.linear_sum_assignment`);
  the fastest choice on CPU. Inside ``jit`` it runs through
  ``jax.pure_callback`` (blocks on the host; not differentiable).
* ``'hungarian'``: exact, pure JAX (``optax.assignment.hungarian_algorithm``);
  runs inside ``jit``/``vmap`` and on accelerators, sequential O(n^3).
* ``'sinkhorn'``: entropic soft assignment (`sinkhorn`) rounded to a
  permutation with the Hungarian solver; `sinkhorn` alone gives the
  differentiable doubly-stochastic matrix.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

SOLVERS = ('scipy', 'hungarian', 'sinkhorn')


def scipy_lap(cost: np.ndarray) -> np.ndarray:
  """Host LAP (maximisation) on a NumPy array; returns ``perm`` (int32)."""
  cost = np.asarray(cost, dtype=np.float64)
  _, cols = optimize.linear_sum_assignment(cost, maximize=True)
  return cols.astype(np.int32)


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
  """
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


def _scipy_callback(cost: jax.Array) -> jax.Array:
  n = cost.shape[-1]
  shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)

  def host(c):
    c = np.asarray(c)
    flat = c.reshape((-1,) + c.shape[-2:])
    out = np.stack([scipy_lap(x) for x in flat]) if flat.size else np.zeros(
        (0, n), np.int32)
    return out.reshape(c.shape[:-1]).astype(np.int32)

  return jax.pure_callback(host, shape, cost, vmap_method='broadcast_all')


def get_solver(solver: str | Callable) -> Callable:
  """Returns a traceable ``cost [..., n, n] -> perm [..., n]`` function.

  Batched over leading axes. ``'scipy'`` goes through ``jax.pure_callback``,
  the others are pure JAX (vmapped).
  """
  if callable(solver):
    return solver
  if solver == 'scipy':
    return _scipy_callback
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
    solver: ``'scipy' | 'hungarian' | 'sinkhorn'`` or a callable.

  Returns:
    int32 ``[..., n]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> c = jnp.array([[0., 1., 0.], [0., 0., 1.], [1., 0., 0.]])
    >>> permute.solve_assignment(c, 'hungarian')
    Array([1, 2, 0], dtype=int32)
  """
  if solver == 'scipy' and not isinstance(cost, jax.core.Tracer):
    c = np.asarray(cost)
    flat = c.reshape((-1,) + c.shape[-2:])
    return jnp.asarray(np.stack([scipy_lap(x) for x in flat]).reshape(
        c.shape[:-1]))
  return get_solver(solver)(cost)
