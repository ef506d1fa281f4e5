"""Small reference Flax (linen) models whose parameter names the spec builders use.

`mlp_spec`, `cnn_spec`, `resnet_spec` and `transformer_spec` describe these
modules (and any module that uses the same names); tests and experiments use
them for planted-permutation recovery and barriers.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ('MLP', 'CNN', 'Block', 'ResNet', 'TransformerBlock', 'Transformer',
           'init')

class MLP(nn.Module):
  """``Dense_0 … Dense_L`` with ReLU between; ``features`` = hidden widths."""
  features: Sequence[int]
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.num_outputs)(x)


def _norm(kind: str, name: str, train: bool):
  if kind == 'layer':
    return nn.LayerNorm(name=name)
  if kind == 'group':
    return nn.GroupNorm(num_groups=None, group_size=1, name=name)
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, name=name)
  if kind == 'none':
    return lambda x: x
  raise ValueError(f'norm must be layer, group, batch or none, got {kind!r}.')


class CNN(nn.Module):
  """VGG-style: ``Conv_i`` (+ norm) + ReLU, global average pool, ``Dense_j`` head."""
  features: Sequence[int] = (8, 16)
  dense: Sequence[int] = (16,)
  num_outputs: int = 10
  norm: str = 'layer'

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), name=f'Conv_{i}')(x)
      x = nn.relu(_norm(self.norm, f'Norm_{i}', train)(x))
    x = jnp.mean(x, axis=(1, 2))
    for j, f in enumerate(self.dense):
      x = nn.relu(nn.Dense(f, name=f'Dense_{j}')(x))
    return nn.Dense(self.num_outputs, name=f'Dense_{len(self.dense)}')(x)


class Block(nn.Module):
  """Basic residual block; a projection shortcut when the width/stride changes."""
  features: int
  strides: int = 1
  norm: str = 'layer'

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False,
                name='conv1')(x)
    y = nn.relu(_norm(self.norm, 'norm1', train)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name='conv2')(y)
    y = _norm(self.norm, 'norm2', train)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                  name='shortcut_conv')(x)
      x = _norm(self.norm, 'shortcut_norm', train)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet: stem, stages of `Block`s, global pool, ``head``."""
  stage_sizes: Sequence[int] = (2, 2)
  widths: Sequence[int] = (8, 16)
  num_outputs: int = 10
  norm: str = 'layer'

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name='conv_init')(x)
    x = nn.relu(_norm(self.norm, 'norm_init', train)(x))
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(n):
        x = Block(w, 2 if (s > 0 and b == 0) else 1, self.norm,
                  name=f'stage{s}_block{b}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_outputs, name='head')(x)


class TransformerBlock(nn.Module):
  num_heads: int
  d_model: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name='ln1')(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.d_model, name='attn')(h)
    h = nn.LayerNorm(name='ln2')(x)
    h = nn.gelu(nn.Dense(self.d_ff, name='mlp_in')(h))
    return x + nn.Dense(self.d_model, name='mlp_out')(h)


class Transformer(nn.Module):
  """Pre-norm transformer on continuous tokens ``[B, T, d_in]``."""
  num_layers: int = 2
  num_heads: int = 2
  d_model: int = 16
  d_ff: int = 32
  max_len: int = 8
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d_model, name='embed')(x)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (self.max_len, self.d_model))
    x = x + pos[None, :x.shape[1]]
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.d_model, self.d_ff,
                           name=f'block{i}')(x)
    x = nn.LayerNorm(name='ln_f')(x)
    return nn.Dense(self.num_outputs, name='head')(jnp.mean(x, axis=1))


def init(module: nn.Module, key: jax.Array, *inputs):
  """``module.init`` (convenience for tests and experiments)."""
  return module.init(key, *inputs)
