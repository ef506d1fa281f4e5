"""The merge-transformation contract and the `chain` combinators.

A merge is written as a `MergeTransformation`: a pair of pure functions in the
style of optax's `GradientTransformation`.

* ``init(params) -> state`` runs once on the (unstacked) base model. Numeric
  hyperparameters are stored in the state as arrays, so the compiled update never
  closes over a Python float: changing a density or a weight re-uses the compiled
  function, and ``jax.vmap`` over hyperparameters sweeps in one compiled call.
* ``update(updates, state, params=None, *, key=None) -> (updates, state)`` maps
  the stacked models (every leaf carries a leading axis of size K, the *model
  axis*) to new updates. Per-model steps keep the model axis; exactly one
  *reducing* step removes it; steps after it see single tensors.

``update`` functions are built with `static_fn`, a hashable partial, so that two
transformations built from the same factory with the same static configuration
compare equal and share one jit cache entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax

Params = Any  # A pytree of arrays: the base model, or anything shaped like it.
Updates = Any  # A pytree of arrays: stacked models [K, ...] or a merged delta.
State = Any  # A pytree of arrays.
PRNGKey = jax.Array


class TransformInitFn(Protocol):

  def __call__(self, params: Params) -> State:
    ...


class TransformUpdateFn(Protocol):

  def __call__(
      self,
      updates: Updates,
      state: State,
      params: Params | None = None,
      *,
      key: PRNGKey | None = None,
  ) -> tuple[Updates, State]:
    ...


class MergeTransformation(NamedTuple):
  """A merge step: pure ``init`` and ``update`` functions (see module docstring).

  Attributes:
    init: ``init(params) -> state``; ``params`` is the base model.
    update: ``update(updates, state, params=None, *, key=None)``; ``params`` is
      the base model, ``key`` a PRNG key for random steps.
  """
  init: TransformInitFn
  update: TransformUpdateFn


class EmptyState(NamedTuple):
  """State of a transformation without hyperparameters or diagnostics."""


NO_PARAMS_MSG = (
    'This step needs the base model: call `update(updates, state, params)` with '
    'the base parameters, or use `mergejax.merge`, which passes them.')


@dataclasses.dataclass(frozen=True)
class static_fn:  # pylint: disable=invalid-name
  """A hashable partial: ``fn`` with keyword arguments fixed at build time.

  Two instances with the same function and the same (hashable) keywords compare
  equal, so jit caches keyed on them are shared across factory calls. Keep only
  *static* configuration here (strings, ints, booleans, tuples, other
  `static_fn`s); numeric hyperparameters belong in the state.
  """
  fn: Callable[..., Any]
  kwargs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def of(cls, fn: Callable[..., Any], /, **kwargs: Any) -> 'static_fn':
    return cls(fn, tuple(sorted(kwargs.items())))

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **dict(self.kwargs), **kwargs)


def init_empty_state(params: Params) -> EmptyState:
  del params
  return EmptyState()


def stateless(
    fn: Callable[..., Updates], **static: Any
) -> MergeTransformation:
  """Wraps ``fn(updates, params, *, key, **static) -> updates`` as a transformation."""
  return MergeTransformation(
      init_empty_state, static_fn.of(_stateless_update, step=fn, **static))


def _stateless_update(updates, state, params=None, *, key=None, step,
                      **static):
  return step(updates, params, key=key, **static), state


def identity() -> MergeTransformation:
  """The transformation that returns its input unchanged."""
  return stateless(_identity)


def _identity(updates, params, *, key):
  del params, key
  return updates


def split_key(key: PRNGKey | None, n: int) -> list[PRNGKey | None]:
  """Splits ``key`` into ``n`` keys, or returns ``n`` Nones if it is None."""
  if key is None:
    return [None] * n
  return list(jax.random.split(key, n))


def chain(*transformations: MergeTransformation) -> MergeTransformation:
  """Applies transformations one after another.

  The PRNG key, if any, is split into one independent key per step, so each
  random step draws from its own stream and results are reproducible.

  Args:
    *transformations: the steps, in order.

  Returns:
    A `MergeTransformation` whose state is the tuple of the steps' states.

  Example:
    >>> import mergejax as mj
    >>> ta = mj.chain(mj.transforms.task_vectors(), mj.transforms.weighted_sum(), mj.transforms.scale(0.3),
    ...               mj.transforms.apply_to_base())
  """
  inits = tuple(t.init for t in transformations)
  updates = tuple(t.update for t in transformations)

  def init_fn(params):
    return tuple(fn(params) for fn in inits)

  return MergeTransformation(init_fn,
                             static_fn.of(_chain_update, fns=updates, names=None))


def named_chain(
    *transformations: tuple[str, MergeTransformation]) -> MergeTransformation:
  """Like `chain`, with a dict state keyed by step name.

  Args:
    *transformations: ``(name, transformation)`` pairs; names must be unique.

  Returns:
    A `MergeTransformation` whose state is ``{name: step_state}``, so that
    diagnostics are readable by name, e.g. ``state['elect'].agreement``.
  """
  names = tuple(n for n, _ in transformations)
  if len(set(names)) != len(names):
    raise ValueError(f'named_chain: step names must be unique, got {names}.')
  inits = tuple(t.init for _, t in transformations)
  updates = tuple(t.update for _, t in transformations)

  def init_fn(params):
    return {n: fn(params) for n, fn in zip(names, inits)}

  return MergeTransformation(init_fn,
                             static_fn.of(_chain_update, fns=updates, names=names))


def _chain_update(updates, state, params=None, *, key=None, fns, names):
  keys = split_key(key, len(fns))
  new_state = []
  for i, fn in enumerate(fns):
    sub = state[names[i]] if names is not None else state[i]
    updates, sub = fn(updates, sub, params, key=keys[i])
    new_state.append(sub)
  if names is not None:
    return updates, dict(zip(names, new_state))
  return updates, tuple(new_state)
