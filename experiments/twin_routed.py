"""Twin-Merging on the digits zoo with a trained router (the ``routed`` protocol).

The twin merge (`mergejax.methods.twin`) keeps the shared backbone ``theta*``
and factorised exclusive parts. A router (`mergejax.methods.twin_train_router`)
is trained on the shared backbone's features of ``per_task`` labelled training
inputs per task (the label is the task id); at evaluation every input gets
its own weights ``w(x)`` and runs through ``theta* + sum_t w_t(x) v_t`` with
the mix fused into each dense layer (`mergejax.methods.twin_dense`), read out
by its task's fine-tuned head, like every other row of the table. The oracle
router (``w = one_hot(task)``, i.e. `mergejax.methods.reconstruct`) is
reported alongside.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj

Params = Any


def backbone_forward(shared: Params, state, x: jax.Array,
                     w: jax.Array | None, depth: int) -> jax.Array:
  """The zoo backbone (``zoo.Backbone``) with per-input Twin weights ``w [B, K]``.

  ``w=None`` runs the shared backbone ``shared`` (``theta*``, what the twin
  merge returns).
  """
  h = 2.0 * x - 1.0  # zoo.Backbone centres the pixels
  for layer in range(depth):
    name = f'Dense_{layer}'
    if w is None:
      p = shared[name]
      h = h @ p['kernel'].astype(jnp.float32) + p['bias'][None]
    else:
      h = mj.methods.twin_dense(h, w, state, name)
    h = jax.nn.relu(h)
  return h


def _head(head: Params, h: jax.Array) -> jax.Array:
  return h @ head['kernel'] + head['bias'][None]


def evaluate(shared: Params, state, tasks, heads: Params, *, depth: int,
             key: jax.Array,
             per_task: int = 32, hidden=(), steps: int = 300,
             learning_rate: float = 1e-2) -> dict[str, Any]:
  """Trains the router and evaluates the routed twin model on every task.

  Args:
    shared: the shared backbone the twin merge returned (``theta*``).
    state: the ``return_state=True`` state of that merge.
    tasks: the zoo's tasks (``.train``, ``.val``, ``.test`` splits).
    heads: the fine-tuned heads, leaves ``[K, ...]``.
    depth: number of dense layers in the backbone.
    key: PRNG key for the router's initialisation.
    per_task: labelled training inputs per task for the router.
    hidden: router MLP widths (``()``: linear).
    steps: router optimisation steps.
    learning_rate: router AdamW learning rate.

  Returns:
    ``{'val': [K], 'test': [K]}`` routed accuracies, the same for the oracle
    router (``'oracle_val'``, ``'oracle_test'``), and the router's task
    accuracy per split (``'router_accuracy'``).
  """
  k = len(tasks)
  feats = jax.jit(lambda x: backbone_forward(shared, state, x, None, depth))
  xs = np.concatenate([t.train.x[:per_task] for t in tasks])
  ids = np.repeat(np.arange(k), [min(per_task, len(t.train.x)) for t in tasks])
  router = mj.methods.twin_train_router(
      feats(jnp.asarray(xs)), jnp.asarray(ids), k, key=key,
      hidden=tuple(hidden), steps=steps, learning_rate=learning_rate)

  @jax.jit
  def accs(shared, state, x, y, head, t):
    feat = backbone_forward(shared, state, x, None, depth)
    w = mj.methods.twin_route(router, feat)
    onehot = jnp.broadcast_to(jax.nn.one_hot(t, k), w.shape)
    routed = _head(head, backbone_forward(shared, state, x, w, depth))
    oracle = _head(head, backbone_forward(shared, state, x, onehot, depth))
    acc = lambda logits: jnp.mean(jnp.argmax(logits, -1) == y)
    return acc(routed), acc(oracle), jnp.mean(jnp.argmax(w, -1) == t)

  out = {}
  router_acc = {}
  for split in ('val', 'test'):
    rows = [accs(shared, state, jnp.asarray(getattr(t, split).x),
                 jnp.asarray(getattr(t, split).y),
                 jax.tree.map(lambda h, i=i: h[i], heads), i)
            for i, t in enumerate(tasks)]
    rows = np.asarray(jax.device_get(rows), np.float64)  # [K, 3]
    out[split], out[f'oracle_{split}'] = rows[:, 0], rows[:, 1]
    router_acc[split] = float(rows[:, 2].mean())
  out['router_accuracy'] = router_acc
  return out
