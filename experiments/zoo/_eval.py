"""Evaluating (merged) backbones on every task with that task's head."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax import methods as mj_methods

from experiments.zoo import _data
from experiments.zoo import _models

Params = Any


class TaskEvaluator:
  """Accuracies of backbones on K tasks, each read out by its own head.

  ``accuracies(backbones, split)`` takes backbones with a leading batch axis S
  (a sweep, or K fine-tunes) and returns ``[S, K]`` accuracies in one jitted,
  vmapped call: every backbone on every task.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments import zoo
    >>> d = zoo.load_digits(jax.random.key(0))
    >>> tasks = zoo.make_tasks(d, ['rot90', 'invert'], jax.random.key(1))
    >>> model = zoo.Classifier(width=8)
    >>> p = zoo.init_params(model, jax.random.key(2))
    >>> heads = jax.tree.map(lambda h: jnp.stack([h, h]), p['head'])
    >>> ev = zoo.TaskEvaluator(model, tasks, heads)
    >>> bbs = jax.tree.map(lambda x: x[None], p['backbone'])
    >>> ev.accuracies(bbs, 'test').shape
    (1, 2)
  """

  def __init__(self, model: _models.Classifier, tasks: Sequence[_data.Task],
               heads: Params):
    self.model = model
    self.names = [t.name for t in tasks]
    self.heads = heads
    self._data = {
        split: (jnp.asarray(np.stack([getattr(t, split).x for t in tasks])),
                jnp.asarray(np.stack([getattr(t, split).y for t in tasks])))
        for split in ('train', 'val', 'test')}

  def split(self, split: str = 'val', examples: int | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """``(x [K, n, 64], y [K, n])``: a split of every task, its first
    ``examples`` per task (None: all of them)."""
    x, y = self._data[split]
    return x[:, :examples], y[:, :examples]

  def accuracies(self, backbones: Params, split: str = 'test',
                 heads: Params | None = None) -> np.ndarray:
    """``[S, K]`` accuracies of S stacked backbones on the K tasks."""
    x, y = self._data[split]
    h = self.heads if heads is None else heads
    s = jax.tree.leaves(backbones)[0].shape[0]
    # A loop over S rather than a vmap: one compilation per split serves every
    # sweep size (and is shared between evaluators of the same model).
    return np.stack([
        np.asarray(_task_accuracies(self.model, jax.tree.map(
            lambda b, i=i: b[i], backbones), h, x, y)) for i in range(s)])

  def surgery_accuracies(self, backbone: Params, down: jax.Array,
                         up: jax.Array, split: str = 'test') -> np.ndarray:
    """``[K]`` accuracies of one backbone whose features task ``t`` reads
    through its surgery adapter (`mergejax.methods.surgery_apply`)."""
    x, y = self._data[split]
    return np.asarray(_surgery_accuracies(self.model, backbone, self.heads,
                                          down, up, x, y))

  def own_task_accuracies(self, backbones: Params, split: str = 'test'
                          ) -> np.ndarray:
    """``[K]`` accuracies of K per-task backbones, backbone i on task i."""
    x, y = self._data[split]
    return np.asarray(_own_task_accuracies(self.model, backbones, self.heads,
                                           x, y))


@functools.partial(jax.jit, static_argnums=0)
def _own_task_accuracies(model, backbones, heads, x, y):
  return jax.vmap(lambda b, h, xx, yy: _models.accuracy(model, b, h, xx, yy))(
      backbones, heads, x, y)


@functools.partial(jax.jit, static_argnums=0)
def _task_accuracies(model, backbone, heads, x, y):
  # One backbone on all K tasks: vmap over (head, task data).
  return jax.vmap(lambda h, xx, yy: _models.accuracy(model, backbone, h, xx,
                                                     yy))(heads, x, y)


def normalized(acc: np.ndarray, finetuned: np.ndarray) -> np.ndarray:
  """Accuracy relative to each task's fine-tuned model, ``acc / ft_acc``."""
  return np.asarray(acc) / np.maximum(np.asarray(finetuned), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _surgery_accuracies(model, backbone, heads, down, up, x, y):
  feats = _models.Backbone(model.width, model.depth)
  head = nn.Dense(model.num_classes)

  def one(h, dn, u, xx, yy):
    z = mj_methods.surgery_apply(dn, u, feats.apply({'params': backbone}, xx))
    logits = head.apply({'params': h}, z)
    return jnp.mean(jnp.argmax(logits, -1) == yy)

  return jax.vmap(one)(heads, down, up, x, y)
