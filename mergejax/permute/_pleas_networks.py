"""PLeaS' view of a network: its layers, the unit groups between them, its function.

PLeaS needs to know, for every conv / Dense layer, which group of hidden units
it reads and which it writes, and it needs each layer's input and output on
data, for the two original models and for the partially built merged one.
A `PleasNetwork` says the first; the second comes from running the user's
model function under a Flax method interceptor (`capture`), so no forward pass
is re-implemented and any linen model whose layers fit the description can be
merged.

The description holds when:

* every layer is an ``nn.Dense`` or a 2D ``nn.Conv`` (``'SAME'`` padding, no
  dilation, no feature groups), called once per forward pass, in the order of
  ``layers``;
* what happens between layers acts on every unit of a group alike and unit by
  unit: elementwise activations, pooling over positions, residual additions
  of tensors of the same group, and per-channel norms (``nn.BatchNorm``, or
  ``nn.GroupNorm`` with one channel per group) applied to a layer's output;
  LayerNorm, attention or a softmax over units mix the merged and separate
  blocks and are not supported;
* the last layer, and only it, is the task head (``writes=None``).

`mlp_network`, `cnn_network` and `resnet_network` describe the bundled
`models.MLP`, `models.CNN` and `models.ResNet`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mergejax import permute
  >>> net = permute.mlp_network(1)
  >>> [(l.path, l.reads, l.writes) for l in net.layers]
  [(('Dense_0',), None, 'P_0'), (('Dense_1',), 'P_0', None)]
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from mergejax._src import paths
from mergejax.permute import _builders as builders
from mergejax.permute import models as models_lib
from mergejax.permute._spec import PermutationSpec



class PleasLayer(NamedTuple):
  """One conv / Dense layer of a `PleasNetwork`.

  Attributes:
    path: the layer's module path, e.g. ``('Conv_0',)`` or
      ``('stage0_block0', 'conv1')`` (its params sit under it).
    reads: the hidden group it reads; None for the model's input.
    writes: the hidden group it writes; None for the task head.
    norm: module path of the per-channel norm applied to its output, if any.
  """
  path: tuple[str, ...]
  reads: str | None
  writes: str | None
  norm: tuple[str, ...] | None = None


class PleasNetwork(NamedTuple):
  """A network as PLeaS sees it: a model function and its layer graph.

  Attributes:
    apply: ``apply(variables, x) -> outputs``, the model in inference mode.
      It must run the original models *and* the wider merged model, so it
      reads the widths from the variables' shapes (as the bundled networks
      do) rather than from fixed module attributes.
    layers: the conv / Dense layers in the order the forward pass calls them.
    groups: the hidden groups (the order of `PleasResult.widths` and
      ``ratios``).
    ratio_of: per group, the index of the ratio it uses, for architectures
      whose groups must keep equal widths (a ResNet stage's stream and inner
      groups in `models.ResNet`); None: one ratio per group.
  """
  apply: Callable[[Any, Any], Any]
  layers: tuple[PleasLayer, ...]
  groups: tuple[str, ...]
  ratio_of: tuple[int, ...] | None = None

  @property
  def num_ratios(self) -> int:
    return len(self.groups) if self.ratio_of is None else max(self.ratio_of) + 1


class LayerInfo(NamedTuple):
  """What a forward pass showed about one layer (`describe`)."""
  kind: str                    # 'conv' | 'dense'
  kernel: tuple[int, int]      # conv kernel size ((1, 1) for Dense)
  stride: int
  positions: int               # output positions per example (H * W; 1 for Dense)


# --------------------------------------------------------------------------- #
# The bundled models.
# --------------------------------------------------------------------------- #
def _kernel_out(params, *path):
  tree = params
  for k in path:
    tree = tree[k]
  return int(np.shape(tree['kernel'])[-1])


def _mlp_apply(num_hidden, v, x):
  p = v['params']
  widths = tuple(_kernel_out(p, f'Dense_{l}') for l in range(num_hidden))
  module = models_lib.MLP(widths, num_outputs=_kernel_out(p, f'Dense_{num_hidden}'))
  return module.apply(v, x)


def mlp_network(num_hidden: int) -> PleasNetwork:
  """`models.MLP` with ``num_hidden`` hidden layers (groups as `mlp_spec`).

  Example:
    >>> from mergejax import permute
    >>> permute.mlp_network(2).groups
    ('P_0', 'P_1')
  """
  num_hidden = builders.check_count(num_hidden, 'num_hidden', 0)
  groups = tuple(f'P_{k}' for k in range(num_hidden))
  layers = tuple(PleasLayer((f'Dense_{l}',), groups[l - 1] if l else None,
                            groups[l] if l < num_hidden else None)
                 for l in range(num_hidden + 1))
  return PleasNetwork(functools.partial(_mlp_apply, num_hidden), layers, groups)


def _cnn_apply(num_convs, num_dense, norm, v, x):
  p = v['params']
  module = models_lib.CNN(
      features=tuple(_kernel_out(p, f'Conv_{i}') for i in range(num_convs)),
      dense=tuple(_kernel_out(p, f'Dense_{j}') for j in range(num_dense - 1)),
      num_outputs=_kernel_out(p, f'Dense_{num_dense - 1}'), norm=norm)
  return module.apply(v, x)


def cnn_network(num_convs: int, num_dense: int = 1, *,
                norm: str = 'none') -> PleasNetwork:
  """`models.CNN`: ``Conv_i`` (+ ``Norm_i``), a pool, ``Dense_j`` (groups as `cnn_spec`).

  Args:
    num_convs: number of conv layers.
    num_dense: number of Dense layers, the head included.
    norm: the norm after each conv: ``'none'``, ``'batch'`` or ``'group'``.

  Example:
    >>> from mergejax import permute
    >>> permute.cnn_network(2, 2).groups
    ('P_Conv_0', 'P_Conv_1', 'P_Dense_0')
  """
  num_convs = builders.check_count(num_convs, 'num_convs', 0)
  num_dense = builders.check_count(num_dense, 'num_dense', 1)
  builders.check_norm(norm)
  groups = (tuple(f'P_Conv_{i}' for i in range(num_convs)) +
            tuple(f'P_Dense_{j}' for j in range(num_dense - 1)))
  names = ([f'Conv_{i}' for i in range(num_convs)] +
           [f'Dense_{j}' for j in range(num_dense)])
  layers = tuple(
      PleasLayer((name,), groups[l - 1] if l else None,
                 groups[l] if l < len(groups) else None,
                 (f'Norm_{l}',) if l < num_convs and norm != 'none' else None)
      for l, name in enumerate(names))
  return PleasNetwork(functools.partial(_cnn_apply, num_convs, num_dense, norm),
                      layers, groups)


def _resnet_apply(stage_sizes, norm, v, x):
  p = v['params']
  module = models_lib.ResNet(
      stage_sizes,
      tuple(_kernel_out(p, f'stage{s}_block0', 'conv2')
            for s in range(len(stage_sizes))),
      num_outputs=_kernel_out(p, 'head'), norm=norm)
  return module.apply(v, x)


def resnet_network(stage_sizes: Sequence[int], *, norm: str = 'none') -> PleasNetwork:
  """`models.ResNet`: one residual-stream group per stage, one inner group per block.

  Every block's ``conv2`` (and the stem or the stride-2 projection shortcut)
  writes the stage's stream group, read by the next blocks and the head.
  ``models.ResNet`` has one width per stage, so the stage's stream and inner
  groups share one ratio (``ratio_of``).

  Example:
    >>> from mergejax import permute
    >>> net = permute.resnet_network((1, 1))
    >>> net.groups, net.ratio_of
    (('P_stage0', 'P_stage1', 'P_stage0_block0', 'P_stage1_block0'), (0, 1, 0, 1))
  """
  stage_sizes = builders.check_stages(stage_sizes)
  builders.check_norm(norm)
  nm = lambda *p: p if norm != 'none' else None
  stream = [f'P_stage{s}' for s in range(len(stage_sizes))]
  groups, ratio_of = list(stream), list(range(len(stage_sizes)))
  layers = [PleasLayer(('conv_init',), None, stream[0], nm('norm_init'))]
  for s, n in enumerate(stage_sizes):
    for b in range(n):
      name = f'stage{s}_block{b}'
      inner = f'P_{name}'
      groups.append(inner)
      ratio_of.append(s)
      reads = stream[s - 1] if (s > 0 and b == 0) else stream[s]
      layers.append(PleasLayer((name, 'conv1'), reads, inner, nm(name, 'norm1')))
      layers.append(PleasLayer((name, 'conv2'), inner, stream[s], nm(name, 'norm2')))
      if s > 0 and b == 0:  # models.Block's projection shortcut
        layers.append(PleasLayer((name, 'shortcut_conv'), reads, stream[s],
                                 nm(name, 'shortcut_norm')))
  layers.append(PleasLayer(('head',), stream[-1], None))
  return PleasNetwork(functools.partial(_resnet_apply, stage_sizes, norm),
                      tuple(layers), tuple(groups), tuple(ratio_of))


# --------------------------------------------------------------------------- #
# The bundled models' networks from their parameter names.
# --------------------------------------------------------------------------- #
def _indexed(params, prefix):
  idx = sorted(int(m.group(1)) for k in params
               if (m := re.fullmatch(prefix + r'_(\d+)', str(k))))
  if idx != list(range(len(idx))):
    raise ValueError(f'pleas: {prefix}_i modules must be numbered 0, 1, …; got '
                     f'{[f"{prefix}_{i}" for i in idx]}.')
  return len(idx)


def infer_network(params, num_hidden=None, norm=None, has_stats=False):
  """``(network, arch, stage_sizes)`` of `models.MLP`, `models.CNN` or `models.ResNet` params.

  ``arch`` is ``'mlp' | 'cnn' | 'resnet'``; ``num_hidden`` (MLPs) and
  ``norm`` are checked against the names, ``norm`` inferred when None.
  """
  if not isinstance(params, dict):
    raise ValueError(f'pleas: expected a params dict, got {type(params).__name__}.')
  if 'conv_init' in params:
    return _resnet(params, num_hidden, norm, has_stats)
  num_convs, num_dense = _indexed(params, 'Conv'), _indexed(params, 'Dense')
  if num_dense == 0:
    raise ValueError('pleas: the params have no Dense_j modules (the head); '
                     f'top-level keys: {sorted(params)[:8]}.')
  if num_convs == 0:
    if norm not in (None, 'none'):
      raise ValueError(f'pleas: norm={norm!r} applies to CNNs only (no Conv_i).')
    if num_hidden is not None and num_hidden != num_dense - 1:
      raise ValueError(f'pleas: num_hidden={num_hidden} but the params have '
                       f'{num_dense} Dense layers ({num_dense - 1} hidden).')
    return mlp_network(num_dense - 1), 'mlp', ()
  if num_hidden is not None and num_hidden != num_convs + num_dense - 1:
    raise ValueError(f'pleas: num_hidden={num_hidden} but the CNN has {num_convs} '
                     f'convs and {num_dense} Dense layers ({num_convs + num_dense - 1} '
                     'hidden groups); leave num_hidden out for CNNs.')
  norm = _named_norm_kind(norm, has_stats, 'Norm_0' in params, 'CNN (Norm_i)')
  return cnn_network(num_convs, num_dense, norm=norm), 'cnn', ()


def _named_norm_kind(norm, has_stats, has_norm, what):
  """The bundled models' norm kind (inferred when None), with clear errors."""
  if norm is None:
    if has_stats:
      norm = 'batch'
    elif has_norm:
      raise ValueError(
          f'pleas: the {what} has norm params but no batch_stats, so it is LayerNorm '
          "or GroupNorm. LayerNorm (models' default) normalises over all "
          'channels, mixing the merged and separate blocks, and is not supported; '
          "for GroupNorm with one channel per group pass norm='group'; for "
          "BatchNorm pass {'params': …, 'batch_stats': …}.")
    else:
      norm = 'none'
  if norm == 'layer':
    raise ValueError(
        "pleas: norm='layer' is not supported: LayerNorm normalises over all "
        'channels, mixing the [merged | sep_A | sep_B] blocks (the sep_A <-> sep_B '
        "blocks would no longer be independent). Use norm='batch', 'group' "
        "(one channel per group) or 'none'.")
  if norm not in ('none', 'batch', 'group'):
    raise ValueError(f"pleas: norm must be 'none', 'batch' or 'group', got {norm!r}.")
  if norm == 'batch' and not has_stats:
    raise ValueError("pleas: norm='batch' needs the running statistics: pass "
                     "{'params': …, 'batch_stats': …} for both models.")
  if has_norm != (norm != 'none'):
    raise ValueError(f'pleas: norm={norm!r} but the params '
                     f"{'have' if has_norm else 'have no'} norm modules.")
  return norm


def _resnet(params, num_hidden, norm, has_stats):
  """`models.ResNet`: stem, stages of basic blocks adding into a stream, head."""
  if num_hidden is not None:
    raise ValueError('pleas: leave num_hidden out for ResNets.')
  if 'head' not in params:
    raise ValueError('pleas: a ResNet (conv_init) needs a Dense `head`; top-level '
                     f'keys: {sorted(params)[:8]}.')
  norm = _named_norm_kind(norm, has_stats, 'norm_init' in params, 'ResNet')
  stage_sizes = []
  while f'stage{len(stage_sizes)}_block0' in params:
    s, n = len(stage_sizes), 0
    while f'stage{s}_block{n}' in params:
      n += 1
    stage_sizes.append(n)
  if not stage_sizes:
    raise ValueError('pleas: a ResNet needs stage{s}_block{b} modules.')
  for s in range(1, len(stage_sizes)):
    if 'shortcut_conv' not in params[f'stage{s}_block0']:
      raise ValueError(f'pleas: stage{s}_block0 changes the stream without a '
                       'shortcut_conv.')
  return resnet_network(stage_sizes, norm=norm), 'resnet', tuple(stage_sizes)


# --------------------------------------------------------------------------- #
# Variables, the permutation spec, checks.
# --------------------------------------------------------------------------- #
def split_variables(tree):
  """``(params, batch_stats or None)`` of a params tree or a variables dict."""
  if isinstance(tree, dict) and 'params' in tree:
    extra = set(tree) - {'params', 'batch_stats'}
    if extra:
      raise ValueError(f'pleas: unsupported variable collections {sorted(extra)}; '
                       "pass params or {'params': …, 'batch_stats': …}.")
    return tree['params'], tree.get('batch_stats')
  return tree, None


def variables(params, stats=None):
  """The variables dict of ``params`` and optional ``batch_stats``."""
  return {'params': params} if stats is None else {'params': params,
                                                   'batch_stats': stats}


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def network_spec(network: PleasNetwork, params: Any, *,
                 batch_stats: bool = False) -> PermutationSpec:
  """The `PermutationSpec` of the network's hidden groups, from its layers.

  A layer's kernel permutes its input axis by ``reads`` and its output axis
  (and bias) by ``writes``; its norm's scale, bias and running statistics by
  ``writes``.

  Args:
    network: the `PleasNetwork`.
    params: the params of one model (the kernels' ranks are read from it).
    batch_stats: include the norms' ``mean`` / ``var`` (BatchNorm).
  """
  axes = {}
  for layer in network.layers:
    name = '/'.join(layer.path)
    leaves = _get(params, layer.path)
    ndim = np.ndim(leaves['kernel'])
    axes[f'{name}/kernel'] = (None,) * (ndim - 2) + (layer.reads, layer.writes)
    if 'bias' in leaves:
      axes[f'{name}/bias'] = (layer.writes,)
    if layer.norm is not None:
      norm = '/'.join(layer.norm)
      for k in _get(params, layer.norm):
        axes[f'{norm}/{k}'] = (layer.writes,)
      if batch_stats:
        axes[f'{norm}/mean'] = axes[f'{norm}/var'] = (layer.writes,)
  return PermutationSpec(axes)


def check_network(network: PleasNetwork, params: Any) -> None:
  """Clear errors when the layer graph and the params do not fit together."""
  layers = network.layers
  if not layers or layers[-1].writes is not None or any(
      l.writes is None for l in layers[:-1]):
    raise ValueError('pleas: the last layer, and only it, must be the task head '
                     f'(writes=None); got writes {[l.writes for l in layers]}.')
  for l in layers:
    if l.reads is not None and l.reads == l.writes:
      raise ValueError(
          f'pleas: layer {"/".join(l.path)!r} reads and writes group {l.reads!r}; '
          'a permutation acts on one axis of a kernel per group, so a layer '
          'that maps a group to itself needs two groups (e.g. a residual '
          'stream and the block inside it).')
  groups = set(network.groups)
  if len(groups) != len(network.groups):
    raise ValueError(f'pleas: network.groups repeats a name: {network.groups}.')
  written = {l.writes for l in layers[:-1]}
  read = {l.reads for l in layers} - {None}
  for what, names in (('written', written), ('read', read)):
    if names - groups:
      raise ValueError(f'pleas: groups {sorted(names - groups)} are {what} by a '
                       f'layer but not in network.groups {network.groups}.')
  if groups - written or groups - read:
    raise ValueError(f'pleas: every group must be written and read by a layer; '
                     f'{sorted(groups - written)} never written, '
                     f'{sorted(groups - read)} never read.')
  if network.ratio_of is not None and (
      len(network.ratio_of) != len(network.groups) or
      sorted(set(network.ratio_of)) != list(range(network.num_ratios))):
    raise ValueError('pleas: ratio_of must give each group a ratio index, using '
                     f'0 … n-1; got {network.ratio_of} for {network.groups}.')
  if not isinstance(params, dict):
    raise ValueError(f'pleas: expected a params dict, got {type(params).__name__}.')
  owned = set()
  for layer in layers:
    for path in (layer.path, layer.norm):
      if path is None:
        continue
      try:
        leaves = _get(params, path)
      except (KeyError, TypeError):
        raise ValueError(f'pleas: the params have no module {"/".join(path)!r}; '
                         f'top-level keys: {sorted(params)[:8]}.') from None
      owned.add('/'.join(path))
      if path is layer.path and 'kernel' not in leaves:
        raise ValueError(f'pleas: layer {"/".join(path)!r} has no kernel; got '
                         f'leaves {sorted(leaves)}.')
  for leaf in paths.flatten_to_dict(params):
    if not any(leaf.startswith(o + '/') for o in owned):
      raise ValueError(
          f'pleas: parameter {leaf!r} belongs to no layer or norm of the network; '
          'PLeaS merges conv / Dense layers and their per-channel norms only '
          '(describe every layer in the PleasNetwork).')


# --------------------------------------------------------------------------- #
# Running the model function.
# --------------------------------------------------------------------------- #
def _interceptor(network, on_layer, on_norm):
  """A Flax method interceptor calling back on the network's layers and norms."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  layer_index = {l.path: i for i, l in enumerate(network.layers)}
  norm_paths = {l.norm for l in network.layers if l.norm is not None}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if path in layer_index:
      return on_layer(layer_index[path], context.module, next_fun, args, kwargs)
    if path in norm_paths:
      on_norm(path, context.module)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def _module_norm_kind(module, path):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  name = '/'.join(path)
  if isinstance(module, nn.BatchNorm):
    if not module.use_running_average:
      raise ValueError(f'pleas: BatchNorm {name!r} runs in training mode; the '
                       'network apply must use the running statistics.')
    return 'batch'
  if isinstance(module, nn.GroupNorm) and module.group_size == 1:
    return 'group'
  if isinstance(module, nn.LayerNorm) or isinstance(module, nn.GroupNorm):
    raise ValueError(
        f"pleas: {name!r} is a {type(module).__name__}, which normalises over "
        'several channels, mixing the [merged | sep_A | sep_B] blocks (the '
        'sep_A <-> sep_B blocks would no longer be independent). Use BatchNorm, '
        'GroupNorm with one channel per group, or no norm.')
  raise ValueError(f'pleas: norm {name!r} is a {type(module).__name__}; PLeaS '
                   'supports nn.BatchNorm and nn.GroupNorm(group_size=1).')


def _conv_info(module, name):
  """``(kernel, stride)`` of a supported ``nn.Conv``, else a clear error."""
  ks = tuple(module.kernel_size)
  strides = module.strides if module.strides is not None else 1
  strides = (strides,) * len(ks) if isinstance(strides, int) else tuple(strides)
  ok = (len(ks) == 2 and module.padding == 'SAME' and len(set(strides)) == 1
        and module.feature_group_count == 1
        and module.kernel_dilation in (None, 1, (1, 1))
        and module.input_dilation in (None, 1, (1, 1)))
  if not ok:
    raise ValueError(
        f'pleas: conv {name!r} must be a 2D nn.Conv with padding="SAME", equal '
        'strides, no dilation and feature_group_count=1 (its im2col patches '
        f'are then its inputs); got kernel_size={ks}, padding={module.padding!r}, '
        f'strides={strides}.')
  return ks, strides[0]


def describe(network: PleasNetwork, variables_: Any, x: Any):
  """Runs ``network.apply`` abstractly; returns per layer `LayerInfo` and the norm kind.

  Checks that every layer is a supported ``nn.Dense`` / ``nn.Conv``, called
  once, in the order of ``network.layers``, and that the norms are
  per-channel (one kind for the network).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  infos, order, kinds = {}, [], set()

  def on_layer(i, module, next_fun, args, kwargs):
    name = '/'.join(network.layers[i].path)
    if i in infos:
      raise ValueError(f'pleas: layer {name!r} is called twice per forward pass; '
                       'each layer must be called once.')
    out = next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv):
      ks, stride = _conv_info(module, name)
      infos[i] = LayerInfo('conv', ks, stride, int(np.prod(out.shape[1:-1])))
    elif isinstance(module, nn.Dense):
      infos[i] = LayerInfo('dense', (1, 1), 1, 1)
      if np.ndim(args[0]) != 2:
        raise ValueError(f'pleas: Dense layer {name!r} reads a rank-'
                         f'{np.ndim(args[0])} input; PLeaS solves Dense layers on '
                         '[N, units] inputs (pool or flatten before them).')
    else:
      raise ValueError(f'pleas: layer {name!r} is a {type(module).__name__}; '
                       'PLeaS layers are nn.Dense or nn.Conv.')
    order.append(i)
    return out

  def on_norm(path, module):
    kinds.add(_module_norm_kind(module, path))

  def run(v, x):
    with _interceptor(network, on_layer, on_norm):
      return network.apply(v, x)

  jax.eval_shape(run, variables_, x)
  missing = [('/'.join(l.path)) for i, l in enumerate(network.layers) if i not in infos]
  if missing:
    raise ValueError(f'pleas: layers {missing} are never called by network.apply '
                     '(check their module paths).')
  if order != sorted(order):
    called = ['/'.join(network.layers[i].path) for i in order]
    raise ValueError('pleas: network.layers must be listed in the order the '
                     f'forward pass calls them: {called}.')
  if len(kinds) > 1:
    raise ValueError(f'pleas: the norms mix kinds {sorted(kinds)}; use one kind.')
  return tuple(infos[i] for i in range(len(network.layers))), (
      kinds.pop() if kinds else 'none')


def capture(network: PleasNetwork):
  """``run(variables, x) -> (ins, outs, features)`` through the model function.

  ``ins[l]`` / ``outs[l]``: layer ``l``'s input and output (before its norm);
  ``features[g]``: the distinct inputs of the layers reading group ``g`` (a
  tensor read by several layers, e.g. a block input and its shortcut, counts
  once).
  """
  readers = {g: [i for i, l in enumerate(network.layers) if l.reads == g]
             for g in network.groups}

  def run(v, x):
    ins, outs = {}, {}

    def on_layer(i, module, next_fun, args, kwargs):
      del module
      ins[i] = args[0]
      outs[i] = next_fun(*args, **kwargs)
      return outs[i]

    with _interceptor(network, on_layer, lambda *_: None):
      network.apply(v, x)
    n = len(network.layers)
    feats = {}
    for g, idx in readers.items():
      seen = []
      for i in idx:  # one array object read by several layers counts once
        if not any(ins[i] is s for s in seen):
          seen.append(ins[i])
      feats[g] = seen
    return [ins[i] for i in range(n)], [outs[i] for i in range(n)], feats

  return run
