"""Helpers shared by the named methods: the task-vector frame, task rebuilds,
the unsupervised loss of the data-informed merges.
"""

from __future__ import annotations

from typing import Any
import jax
import jax.numpy as jnp
import numpy as np
from mergejax._src import base
from mergejax.transforms import _reduce as reduce


def finish(step, lambda_):
  """``task_vectors -> step -> scale(lambda_) -> apply``: the task-arithmetic frame."""
  return base.chain(reduce.task_vectors(), step, reduce.scale(lambda_),
                    reduce.apply_to_base())


def reconstruct(state: Any, base_params: Any, i: int | jax.Array) -> Any:
  """Rebuilds task model ``i`` from the state of EMR / TALL / reversible / twin.

  ``state`` is what ``mergejax.merge(tx, base, models, return_state=True)``
  returned (the first recognised method state inside it is used).

  Args:
    state: the merge state.
    base_params: the base model (its dtypes are kept).
    i: task index (may be traced, e.g. under ``jax.vmap``).

  Returns:
    Task ``i``'s model, shaped and typed like ``base_params``.
  """
  s = find_state(state)
  if s is None:
    raise ValueError(
        'reconstruct: the state holds no EMRState, TallMaskState, '
        'ReversibleState or TwinState. Pass the state returned by '
        'merge(tx, base, models, return_state=True) for emr, tall_masks, '
        'consensus, reversible or twin.')
  if not isinstance(i, jax.core.Tracer):
    k = s.num_tasks
    if not (np.ndim(i) == 0 and float(i) == int(i) and 0 <= int(i) < k):
      raise ValueError(f'reconstruct: task index {i!r} is not one of the '
                       f'{k} merged models (0 … {k - 1}).')
  delta = s.task_delta(base_params, i)
  return jax.tree.map(lambda b, d: (b.astype(jnp.float32) + d).astype(b.dtype),
                      base_params, delta)


def find_state(state):
  """The first state inside ``state`` that can rebuild task models, or None.

  Method states that keep what rebuilds every task model (EMR, TALL masks,
  reversible merging, Twin-Merging) define ``task_delta(base_params, i)``.
  """
  if callable(getattr(state, 'task_delta', None)):
    return state
  if isinstance(state, dict):
    items = list(state.values())
  elif isinstance(state, (tuple, list)):
    items = list(state)
  else:
    return None
  for it in items:
    if (found := find_state(it)) is not None:
      return found
  return None


def subtree(tree, path: str):
  """The sub-dict of a nested dict at a ``'/'``-separated path (``''``: itself)."""
  for part in path.split('/') if path else ():
    tree = tree[part]
  return tree


def take(tree, i):
  """Model ``i`` of a stacked tree (``i`` may be traced)."""
  return jax.tree.map(lambda x: jnp.take(x, i, axis=0), tree)


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """Mean Shannon entropy of ``softmax(logits)`` over the leading axes."""
  shape = jnp.shape(logits)
  if not shape or 0 in shape:
    raise ValueError(f'prediction_entropy needs [..., classes] logits with at '
                     f'least one example and one class, got shape {shape}.')
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))
