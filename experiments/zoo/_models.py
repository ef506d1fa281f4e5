"""The zoo's model: an MLP backbone (merged) and a linear head (kept per task)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


class Backbone(nn.Module):
  """``depth`` ReLU layers of ``width`` units on centred pixels."""
  width: int = 512
  depth: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = 2.0 * x - 1.0  # centre the [0, 1] pixels, so inversion flips the sign
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return x


class Classifier(nn.Module):
  """``backbone`` then a linear ``head``; params ``{'backbone': ..., 'head': ...}``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from experiments import zoo
    >>> model = zoo.Classifier(width=16)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 64)))['params']
    >>> sorted(params), model.apply({'params': params}, jnp.zeros((3, 64))).shape
    (['backbone', 'head'], (3, 10))
  """
  width: int = 512
  depth: int = 2
  num_classes: int = 10

  def setup(self):
    self.backbone = Backbone(self.width, self.depth)
    self.head = nn.Dense(self.num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.backbone(x))


def init_params(model: Classifier, key: jax.Array) -> Params:
  return model.init(key, jnp.zeros((1, 64), jnp.float32))['params']


def logits(model: Classifier, backbone: Params, head: Params,
           x: jax.Array) -> jax.Array:
  """Logits of a (possibly merged) backbone combined with one task's head."""
  return model.apply({'params': {'backbone': backbone, 'head': head}}, x)


def accuracy(model: Classifier, backbone: Params, head: Params, x: jax.Array,
             y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits(model, backbone, head, x), -1) == y)
