"""Hand-written permutation specs for MLPs, VGG-style CNNs, ResNets, Transformers.

Parameter names follow the reference modules in ``mergejax.permute.models``
(Flax linen auto-names for MLPs: ``Dense_0 … Dense_L``). Keys are relative to a
variable collection (see `PermutationSpec`), so the same spec applies to
``params`` or to ``{'params': …, 'batch_stats': …}``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mergejax.permute._spec import PermutationSpec


NORMS = ('layer', 'group', 'batch', 'none')


def check_count(value, name: str, minimum: int) -> int:
  """``value`` as an int ``>= minimum`` (a layer or block count), or raises."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < minimum):
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')
  return int(value)


def check_stages(stage_sizes: Sequence[int]) -> tuple[int, ...]:
  """ResNet blocks per stage: at least one stage, each of at least one block."""
  sizes = tuple(stage_sizes)
  if not sizes:
    raise ValueError('stage_sizes is empty: give the blocks per stage, e.g. '
                     '(3, 3, 3) for ResNet20.')
  return tuple(check_count(n, 'every stage size', 1) for n in sizes)


def check_norm(norm: str, allowed: Sequence[str] = NORMS) -> str:
  if norm not in allowed:
    raise ValueError(f'norm must be one of {tuple(allowed)}, got {norm!r}.')
  return norm


def _dense(axes, name, p_in, p_out, bias=True):
  axes[f'{name}/kernel'] = (p_in, p_out)
  if bias:
    axes[f'{name}/bias'] = (p_out,)


def _conv(axes, name, p_in, p_out, bias=False):
  axes[f'{name}/kernel'] = (None, None, p_in, p_out)
  if bias:
    axes[f'{name}/bias'] = (p_out,)


def _norm(axes, name, p, kind):
  if kind == 'none':
    return
  axes[f'{name}/scale'] = (p,)
  axes[f'{name}/bias'] = (p,)
  if kind == 'batch':  # running statistics in the `batch_stats` collection
    axes[f'{name}/mean'] = (p,)
    axes[f'{name}/var'] = (p,)


def mlp_spec(num_hidden: int, *, name: str = 'Dense_{}',
             group: str = 'P_{}') -> PermutationSpec:
  """Spec of an MLP ``Dense_0 … Dense_L`` with ``num_hidden`` hidden layers.

  ``Dense_i/kernel: (P_{i-1}, P_i)``, ``Dense_i/bias: (P_i,)``; input and
  output axes are not permuted.

  Args:
    num_hidden: number of hidden layers L (the model has L + 1 Dense layers).
    name: format string of the layer names.
    group: format string of the group names.

  Example:
    >>> from mergejax import permute
    >>> permute.mlp_spec(2).axes['Dense_1/kernel']
    ('P_0', 'P_1')
  """
  num_hidden = check_count(num_hidden, 'num_hidden', 0)
  axes = {}
  for i in range(num_hidden + 1):
    p_in = group.format(i - 1) if i > 0 else None
    p_out = group.format(i) if i < num_hidden else None
    _dense(axes, name.format(i), p_in, p_out)
  return PermutationSpec(axes)


def cnn_spec(num_convs: int, num_dense: int = 1, *, norm: str = 'layer',
             conv_bias: bool = True) -> PermutationSpec:
  """Spec of a VGG-style CNN (`models.CNN`): ``Conv_i``/``Norm_i``, pool, ``Dense_j``.

  The convolutions feed a global average pool, so the first dense layer's
  input axis carries the last conv's channel group.

  Args:
    num_convs: number of conv layers.
    num_dense: number of Dense layers after the pool (the last one outputs).
    norm: ``'layer' | 'group' | 'batch' | 'none'`` after each conv.
    conv_bias: whether the convs have biases.
  """
  num_convs = check_count(num_convs, 'num_convs', 0)
  num_dense = check_count(num_dense, 'num_dense', 1)
  check_norm(norm)
  axes = {}
  prev = None
  for i in range(num_convs):
    p = f'P_Conv_{i}'
    _conv(axes, f'Conv_{i}', prev, p, bias=conv_bias)
    _norm(axes, f'Norm_{i}', p, norm)
    prev = p
  for j in range(num_dense):
    p = f'P_Dense_{j}' if j < num_dense - 1 else None
    _dense(axes, f'Dense_{j}', prev, p)
    prev = p
  return PermutationSpec(axes)


def resnet_spec(stage_sizes: Sequence[int], *, norm: str = 'layer',
                stem_width_equals_first: bool = True) -> PermutationSpec:
  """Spec of a ResNet (`models.ResNet`) with basic blocks.

  All blocks of a stage add into one residual stream, so they share one
  permutation ``P_stage{s}``; each block's inner channels get their own
  ``P_stage{s}_block{b}``. The first block of every later stage has a
  projection shortcut (``shortcut_conv``/``shortcut_norm``), where the stream
  permutation changes. Norm scales/biases, and for BatchNorm the running
  ``mean``/``var`` in ``batch_stats``, follow their channels.

  Args:
    stage_sizes: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet20.
    norm: ``'layer' | 'group' | 'batch'``.
    stem_width_equals_first: the stem outputs the first stage's width (no
      shortcut in ``stage0_block0``).
  """
  stage_sizes = check_stages(stage_sizes)
  check_norm(norm)
  axes = {}
  stream = 'P_stage0'
  _conv(axes, 'conv_init', None, stream)
  _norm(axes, 'norm_init', stream, norm)
  for s, n in enumerate(stage_sizes):
    for b in range(n):
      name = f'stage{s}_block{b}'
      p_in, p_out, inner = stream, f'P_stage{s}', f'P_{name}'
      _conv(axes, f'{name}/conv1', p_in, inner)
      _norm(axes, f'{name}/norm1', inner, norm)
      _conv(axes, f'{name}/conv2', inner, p_out)
      _norm(axes, f'{name}/norm2', p_out, norm)
      if b == 0 and (s > 0 or not stem_width_equals_first):
        _conv(axes, f'{name}/shortcut_conv', p_in, p_out)
        _norm(axes, f'{name}/shortcut_norm', p_out, norm)
      stream = p_out
  _dense(axes, 'head', stream, None)
  return PermutationSpec(axes)


def transformer_spec(num_layers: int, *, per_head: bool = True,
                     block: str = 'block{}') -> PermutationSpec:
  """Head-aware spec of a pre-norm Transformer (`models.Transformer`).

  * ``P_res``: the residual stream, one permutation for the whole network
    (embedding, position embeddings, every LayerNorm, Q/K/V and MLP inputs,
    attention-out and MLP-out outputs, final norm, head input).
  * ``P_heads_{i}``: whole heads, jointly on the head axis of Q, K, V, out.
  * ``P_qk_{i}``: within-head dims shared by Q and K (the score contraction);
    ``P_vo_{i}``: within-head dims shared by V and out.
  * ``P_mlp_{i}``: the MLP hidden units.

  With ``per_head`` (default) the within-head groups are *nested* under the
  head group: a different inner permutation per head (arrays ``[H, d_head]``),
  the full symmetry. Without it one inner permutation serves all heads (what
  `infer_spec` derives from a trace).

  Args:
    num_layers: number of blocks.
    per_head: nested per-head inner permutations.
    block: format string of the block names.
  """
  num_layers = check_count(num_layers, 'num_layers', 0)
  axes = {}
  nested = {}
  r = 'P_res'
  _dense(axes, 'embed', None, r)
  axes['pos_embed'] = (None, r)
  for i in range(num_layers):
    b = block.format(i)
    h, qk, vo, m = f'P_heads_{i}', f'P_qk_{i}', f'P_vo_{i}', f'P_mlp_{i}'
    if per_head:
      nested[qk] = h
      nested[vo] = h
    _norm(axes, f'{b}/ln1', r, 'layer')
    for name, inner in (('query', qk), ('key', qk), ('value', vo)):
      axes[f'{b}/attn/{name}/kernel'] = (r, h, inner)
      axes[f'{b}/attn/{name}/bias'] = (h, inner)
    axes[f'{b}/attn/out/kernel'] = (h, vo, r)
    axes[f'{b}/attn/out/bias'] = (r,)
    _norm(axes, f'{b}/ln2', r, 'layer')
    _dense(axes, f'{b}/mlp_in', r, m)
    _dense(axes, f'{b}/mlp_out', m, r)
  _norm(axes, 'ln_f', r, 'layer')
  _dense(axes, 'head', r, None)
  return PermutationSpec(axes, nested=nested)
