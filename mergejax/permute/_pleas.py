"""PLeaS: partial permutations and layer-wise least squares, for MLPs, CNNs, ResNets.

Two models of one architecture, e.g. trained on different tasks, are merged
into one wider model of a chosen size between 1x and 2x. Supported chains
(inferred from the parameter names):

* MLPs ``Dense_0 … Dense_L`` (`models.MLP`), hidden groups ``P_0 … P_{L-1}``;
* VGG-style CNNs (`models.CNN`): ``Conv_i`` (3x3, stride 1, ``SAME``) + an
  optional per-channel norm (``Norm_i``: BatchNorm, or GroupNorm with one
  channel per group) + ReLU, a global mean pool, then ``Dense_j`` layers and
  the head; groups ``P_Conv_i``, ``P_Dense_j`` as `cnn_spec`;
* ResNets with basic blocks (`models.ResNet`: ``conv_init``, ``stage{s}_block{b}``
  with ``conv1``/``conv2`` and stride-2 projection shortcuts, ``head``), groups
  as `resnet_spec`: one residual-stream group per stage, written by every
  block's ``conv2`` (and the stem or shortcut) and read by the next blocks,
  plus one inner group per block. Each layer reads one group and writes one,
  so the least squares is the same per layer; the convs have no bias (no ones
  column). ``models.ResNet`` has one width per stage, so the ratio is chosen
  per stage and shared by the stage's stream and inner groups.

LayerNorm mixes the channels of ``[merged | sep_A | sep_B]`` (its mean and
variance run over all of them), which breaks the block structure: it is
rejected.

The method:

1. **Matching**: activation matching (correlation) aligns B's hidden units to
   A's, one LAP per group (conv groups use every spatial position as a
   sample); the matched similarity ``c_i`` of every unit pair is kept.
2. **Partial permutation**: per hidden group a ratio ``r_k`` of units is kept
   *separate* (one copy from each model) and the best-matched ``1 - r_k`` are
   merged; the group's width becomes ``n_k (1 + r_k)``, ordered
   ``[merged | sep_A | sep_B]``. Which units are worst matched is decided,
   by default, by their first-order merge cost (``criterion='sensitivity'``:
   the expected squared change that merging a pair causes in the
   pre-activations of the layers reading it), or by their correlation
   (``'correlation'``, PLeaS' choice). `choose_ratios` picks the ratios for a
   budget in parameters (default) or FLOPs with a greedy solver (no
   commercial optimiser): it repeatedly separates the worst-matched units per
   parameter (FLOP) spent.
3. **Least squares**: every layer is solved in closed form. Its targets
   ``Y~ = [(Y_A[m] + Y_B[m])/2, Y_A[s], Y_B[s]]`` are the original layers'
   pre-activations (pre-norm for convs), assembled by blocks. Its inputs are,
   by default, the merged network's own features (layers solved in order);
   PLeaS' reference uses the original models' features
   ``X~ = [(X_A[m] + X_B[m])/2, X_A[s], X_B[s]]`` instead (``inputs=
   'original'``). A conv is a linear map of its im2col patches
   (`jax.lax.conv_general_dilated_patches`, channel-major: patch index
   ``c * kh * kw + tap``), so it is solved like a Dense layer whose input
   blocks are the channel blocks expanded to their taps, with every spatial
   position a row. The Gram matrices ``X^T X``, ``X^T Y~`` are accumulated
   over batches in float64; each output block is a ridge regression on its
   allowed input blocks (sep_A and sep_B never feed each other). The task
   heads stay separate: the merged model outputs ``[logits_A | logits_B]``.
   ``fit='gradient'`` replaces the closed form by PLeaS' reference fit (Adam,
   cosine schedule, masked sep_A <-> sep_B blocks) on the same statistics.
4. **Norms**: merged channels average the two norms' scale and bias,
   separate channels keep their own. BatchNorm statistics of the merged model
   are recomputed layer by layer, in order, as exact averages over all rows of
   ``batches`` (what `evaluate.reset_batch_stats` gives for equal-sized
   batches; here computed directly from the merged pre-norm outputs, since
   each layer's merged inputs need the statistics of the layers before it).

``least_squares=False`` gives the permute-then-average baseline at the same
widths (PLeaS' block construction), ``align=False`` the no-alignment one. The
data-free variant (PLeaS-free) passes generic inputs (e.g. Gaussian noise)
instead of task data.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import optim
from mergejax._src import paths
from mergejax.permute import _evaluate as evaluate
from mergejax.permute import models as models_lib
from mergejax.permute._builders import cnn_spec
from mergejax.permute._builders import mlp_spec
from mergejax.permute._builders import resnet_spec
from mergejax.permute._spec import apply_permutation


class PleasResult(NamedTuple):
  """The merged model and how it was built.

  Attributes:
    params: merged params (`models.MLP` or `models.CNN` layout).
    widths: widths of all hidden groups, in order (convs, then hidden denses).
    ratios: fraction of units kept separate, per hidden group.
    size: merged size relative to one model (in the ``measure`` used).
    ridges: the ridge used per layer (None without least squares).
    batch_stats: recomputed BatchNorm statistics (``norm='batch'``), else None.
    features: conv widths (empty for an MLP; the stage widths for a ResNet).
    dense: hidden Dense widths (all of ``widths`` for an MLP).
    norm: the CNN's norm (``'none' | 'batch' | 'group'``).
    stage_sizes: ResNets: blocks per stage (``features``: the stage widths).
  """
  params: Any
  widths: tuple[int, ...]
  ratios: tuple[float, ...]
  size: float
  ridges: tuple[float, ...] | None = None
  batch_stats: Any = None
  features: tuple[int, ...] = ()
  dense: tuple[int, ...] = ()
  norm: str = 'none'
  stage_sizes: tuple[int, ...] = ()

  @property
  def variables(self) -> dict[str, Any]:
    """``{'params': …}`` plus ``'batch_stats'`` when there are any."""
    if self.batch_stats is None:
      return {'params': self.params}
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def module(self, num_outputs: int):
    """The Flax module that applies ``variables`` (``num_outputs = out_a + out_b``)."""
    if self.stage_sizes:
      return models_lib.ResNet(self.stage_sizes, self.features, num_outputs=num_outputs,
                               norm=self.norm)
    if self.features:
      return models_lib.CNN(features=self.features, dense=self.dense,
                            num_outputs=num_outputs, norm=self.norm)
    return models_lib.MLP(self.widths, num_outputs=num_outputs)


class LayerDims(NamedTuple):
  """Sizes of one layer for `merged_size` (a plain ``(n_in, n_out)`` is a Dense).

  Attributes:
    n_in: input units (channels).
    n_out: output units (channels).
    taps: kernel taps per input channel (``kh * kw`` for a conv, 1 for Dense).
    positions: output positions per example (``H * W`` for a conv): FLOPs only.
    per_unit: parameters per output unit besides the weights (bias, norm scale
      and bias).
  """
  n_in: int
  n_out: int
  taps: int = 1
  positions: int = 1
  per_unit: int = 1


# With a grid of ridges, every _HOLDOUT-th example is held out to choose one.
_HOLDOUT = 5
_BN_EPS = 1e-5   # flax.linen.BatchNorm's default epsilon
_GN_EPS = 1e-6   # flax.linen.GroupNorm's default epsilon
_MEASURES = ('params', 'flops')


def merged_size(dims: Sequence[tuple[int, ...]], ratios: Sequence[float], *,
                measure: str = 'params') -> float:
  """Size of the merged model relative to one model (heads kept separate).

  A layer between groups with ratios ``r_in``, ``r_out`` has
  ``taps n_in n_out ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` weights (the
  zero sep_A/sep_B cross blocks removed) plus ``per_unit n_out (1 + r_out)``
  biases and norm parameters; the input is shared (``r = 0``) and the heads
  are separate (``r = 1``). ``measure='flops'`` counts multiply-adds, PLeaS'
  model ``base ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` with
  ``base = positions taps n_in n_out``, so conv layers weigh by their spatial
  positions.

  Args:
    dims: per layer ``(n_in, n_out)`` (Dense) or a `LayerDims`.
    ratios: fraction of units kept separate per hidden group (one fewer than
      layers).
    measure: ``'params'`` or ``'flops'``.

  Example:
    >>> from mergejax import permute
    >>> permute.merged_size([(4, 8), (8, 2)], [1.0])
    2.0
    >>> conv = permute.LayerDims(1, 8, taps=9, positions=64, per_unit=1)
    >>> round(permute.merged_size([conv, (8, 2)], [0.0], measure='flops'), 3)
    1.003
  """
  if measure not in _MEASURES:
    raise ValueError(f"measure must be 'params' or 'flops', got {measure!r}.")
  if len(ratios) != len(dims) - 1:
    raise ValueError(f'merged_size: {len(dims)} layers need {len(dims) - 1} ratios '
                     f'(one per hidden group), got {len(ratios)}.')
  r = [0.0] + list(ratios) + [1.0]
  return _size([(d, r[l], r[l + 1]) for l, d in enumerate(dims)], measure)


def _size(layers, measure):
  """Merged / one-model size of ``[(dims, r_in, r_out)]`` (`merged_size`)."""
  total = one = 0.0
  for d, ri, ro in layers:
    d = LayerDims(*d)
    f = (1 + ri) * (1 + ro) - 2 * ri * ro
    if measure == 'params':
      w = d.n_in * d.n_out * d.taps
      total += w * f + d.per_unit * d.n_out * (1 + ro)
      one += w + d.per_unit * d.n_out
    else:
      w = d.positions * d.taps * d.n_in * d.n_out
      total += w * f
      one += w
  return total / one


def choose_ratios(similarities: Sequence[np.ndarray], dims: Sequence[tuple[int, ...]],
                  size: float, *, step: int | None = None,
                  measure: str = 'params') -> tuple[float, ...]:
  """Greedy ratios for a size budget: separate the worst-matched units first.

  Each move separates ``step`` more units of one group (default 1/16 of its
  width); among the moves that fit the budget it takes the one with the largest
  summed dissimilarity ``sum (1 - c_i)`` of the units it separates per
  parameter (or FLOP) added. Stops when no move fits.

  Args:
    similarities: per hidden group, a score per unit, higher = better to
      merge (the matched correlation, or ``1 - cost / max cost``); the gain of
      separating a unit is ``1 - score``.
    dims: per layer ``(n_in, n_out)`` or `LayerDims` (one more than groups).
    size: target size relative to one model (>= the all-merged size).
    step: units per move (default ``max(1, n // 16)``).
    measure: ``'params'`` or ``'flops'`` (`merged_size`).

  Returns:
    The ratios ``r_k`` (fraction of units kept separate) per hidden group.
  """
  return _greedy_ratios(similarities, functools.partial(merged_size, dims,
                                                       measure=measure), size, step)


def _greedy_ratios(similarities, size_of, size, step=None):
  """`choose_ratios` for any ``size_of(ratios)`` (per group of ``similarities``)."""
  sims = [np.sort(np.asarray(s, np.float64)) for s in similarities]  # worst first
  widths = [len(s) for s in sims]
  kept = [0] * len(sims)
  while True:
    best, best_gain = None, -np.inf
    for k, n in enumerate(widths):
      st = step or max(1, n // 16)
      if kept[k] >= n:
        continue
      new = list(kept)
      new[k] = min(n, kept[k] + st)
      ratios = [c / w for c, w in zip(new, widths)]
      cur = size_of([c / w for c, w in zip(kept, widths)])
      nxt = size_of(ratios)
      if nxt > size + 1e-9:
        continue
      gain = np.sum(1.0 - sims[k][kept[k]:new[k]]) / max(nxt - cur, 1e-12)
      if gain > best_gain:
        best, best_gain = new, gain
    if best is None:
      return tuple(c / w for c, w in zip(kept, widths))
    kept = best


# --------------------------------------------------------------------------- #
# The layer chain: names, forward pass, permutation spec.
# --------------------------------------------------------------------------- #
class _Node(NamedTuple):
  """One conv / Dense layer: where it reads from and writes to."""
  path: tuple[str, ...]     # module path, e.g. ('Conv_0',) or ('stage0_block0', 'conv1')
  kind: str                 # 'conv' | 'dense'
  g_in: int                 # index of the group it reads (-1: the shared input)
  g_out: int | None         # index of the group it writes (None: the heads)
  norm: tuple[str, ...] | None = None  # path of its norm module
  stride: int = 1
  bias: bool = True


class _Chain(NamedTuple):
  layers: tuple[tuple[str, str], ...]  # (module name, 'conv' | 'dense'), in order
  groups: tuple[str, ...]              # hidden group names (one per layer but the head)
  norm: str                            # conv norm: 'none' | 'batch' | 'group'
  cnn: bool
  nodes: tuple[_Node, ...] = ()
  stage_sizes: tuple[int, ...] = ()    # ResNets: blocks per stage
  tie: tuple[int, ...] = ()            # ResNets: stage of every group


def _nodes(chain):
  if chain.nodes:
    return chain.nodes
  n = len(chain.layers)
  return tuple(_Node((name,), kind, l - 1, None if l == n - 1 else l,
                     (f'Norm_{name.split("_")[1]}',) if kind == 'conv' and
                     chain.norm != 'none' else None)
               for l, (name, kind) in enumerate(chain.layers))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _split_variables(tree):
  """``(params, batch_stats or None)`` of a params tree or a variables dict."""
  if isinstance(tree, dict) and 'params' in tree:
    extra = set(tree) - {'params', 'batch_stats'}
    if extra:
      raise ValueError(f'pleas: unsupported variable collections {sorted(extra)}; '
                       "pass params or {'params': …, 'batch_stats': …}.")
    return tree['params'], tree.get('batch_stats')
  return tree, None


def _indexed(params, prefix):
  idx = sorted(int(m.group(1)) for k in params
               if (m := re.fullmatch(prefix + r'_(\d+)', str(k))))
  if idx != list(range(len(idx))):
    raise ValueError(f'pleas: {prefix}_i modules must be numbered 0, 1, …; got '
                     f'{[f"{prefix}_{i}" for i in idx]}.')
  return len(idx)


def _infer_chain(params, num_hidden, norm, has_stats) -> _Chain:
  """The layer chain from the module names (``Conv_i``, ``Norm_i``, ``Dense_j``)."""
  if not isinstance(params, dict):
    raise ValueError(f'pleas: expected a params dict, got {type(params).__name__}.')
  if 'conv_init' in params:
    return _infer_resnet(params, num_hidden, norm, has_stats)
  num_convs, num_dense = _indexed(params, 'Conv'), _indexed(params, 'Dense')
  if num_dense == 0:
    raise ValueError('pleas: the params have no Dense_j modules (the head); '
                     f'top-level keys: {sorted(params)[:8]}.')
  if num_convs == 0:  # MLP: num_hidden (as given; default all but the head)
    if norm not in (None, 'none'):
      raise ValueError(f'pleas: norm={norm!r} applies to CNNs only (no Conv_i).')
    if num_hidden is None:
      num_hidden = num_dense - 1
    if not 0 <= num_hidden < num_dense:
      raise ValueError(f'pleas: num_hidden={num_hidden} but the params have '
                       f'{num_dense} Dense layers (at most {num_dense - 1} hidden).')
    layers = tuple((f'Dense_{l}', 'dense') for l in range(num_hidden + 1))
    return _Chain(layers, tuple(f'P_{k}' for k in range(num_hidden)), 'none', False)
  if num_hidden is not None and num_hidden != num_convs + num_dense - 1:
    raise ValueError(f'pleas: num_hidden={num_hidden} but the CNN has {num_convs} '
                     f'convs and {num_dense} Dense layers ({num_convs + num_dense - 1} '
                     'hidden groups); leave num_hidden out for CNNs.')
  norm = _norm_kind(norm, has_stats, 'Norm_0' in params, 'CNN (Norm_i)')
  for i in range(num_convs):
    if 'bias' not in params[f'Conv_{i}'] or params[f'Conv_{i}']['kernel'].ndim != 4:
      raise ValueError(f'pleas: Conv_{i} must be a 2D conv with a bias (models.CNN); '
                       f'got leaves {sorted(params[f"Conv_{i}"])}.')
  layers = (tuple((f'Conv_{i}', 'conv') for i in range(num_convs)) +
            tuple((f'Dense_{j}', 'dense') for j in range(num_dense)))
  groups = (tuple(f'P_Conv_{i}' for i in range(num_convs)) +
            tuple(f'P_Dense_{j}' for j in range(num_dense - 1)))
  return _Chain(layers, groups, norm, True)


def _norm_kind(norm, has_stats, has_norm, what):
  """The conv norm kind (inferred when None), with clear errors for unsupported ones."""
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


def _infer_resnet(params, num_hidden, norm, has_stats) -> _Chain:
  """`models.ResNet`: stem, stages of basic blocks adding into a stream, head."""
  if num_hidden is not None:
    raise ValueError('pleas: leave num_hidden out for ResNets.')
  if 'head' not in params:
    raise ValueError('pleas: a ResNet (conv_init) needs a Dense `head`; top-level '
                     f'keys: {sorted(params)[:8]}.')
  norm = _norm_kind(norm, has_stats, 'norm_init' in params, 'ResNet')
  stage_sizes = []
  while f'stage{len(stage_sizes)}_block0' in params:
    s = len(stage_sizes)
    n = 0
    while f'stage{s}_block{n}' in params:
      n += 1
    stage_sizes.append(n)
  if not stage_sizes:
    raise ValueError('pleas: a ResNet needs stage{s}_block{b} modules.')
  groups, tie = [f'P_stage{s}' for s in range(len(stage_sizes))], list(
      range(len(stage_sizes)))
  nm = lambda *p: p if norm != 'none' else None
  nodes = [_Node(('conv_init',), 'conv', -1, 0, nm('norm_init'), 1, False)]
  stream = 0
  for s, n in enumerate(stage_sizes):
    for b in range(n):
      name = f'stage{s}_block{b}'
      groups.append(f'P_{name}')
      tie.append(s)
      inner = len(groups) - 1
      stride = 2 if (s > 0 and b == 0) else 1
      nodes.append(_Node((name, 'conv1'), 'conv', stream, inner, nm(name, 'norm1'),
                         stride, False))
      if 'shortcut_conv' in params[name]:
        nodes.append(_Node((name, 'shortcut_conv'), 'conv', stream, s,
                           nm(name, 'shortcut_norm'), stride, False))
      elif stride != 1 or stream != s:
        raise ValueError(f'pleas: {name} changes the stream without a shortcut_conv.')
      nodes.append(_Node((name, 'conv2'), 'conv', inner, s, nm(name, 'norm2'), 1,
                         False))
      stream = s
  nodes.append(_Node(('head',), 'dense', stream, None))
  return _Chain((), tuple(groups), norm, True, tuple(nodes), tuple(stage_sizes),
                tuple(tie))


def _check_pair(pa, pb, sa, sb, chain):
  """Same structure and shapes, except the heads' output sizes."""
  head = '/'.join(_nodes(chain)[-1].path)
  fa, fb = paths.flatten_to_dict(pa), paths.flatten_to_dict(pb)
  if set(fa) != set(fb):
    raise ValueError('pleas: the two models have different parameter trees: only in '
                     f'A {sorted(set(fa) - set(fb))[:6]}, only in B '
                     f'{sorted(set(fb) - set(fa))[:6]}.')
  for p in fa:
    shape_a, shape_b = tuple(np.shape(fa[p])), tuple(np.shape(fb[p]))
    same = shape_a[:-1] == shape_b[:-1] if p.startswith(head + '/') else shape_a == shape_b
    if not same:
      raise ValueError(f'pleas: leaf {p!r} has shape {shape_a} in A and {shape_b} in B; '
                       'the models must share an architecture (only the heads may '
                       'differ in their number of outputs).')
  if (sa is None) != (sb is None):
    raise ValueError('pleas: pass batch_stats for both models or for neither.')


def _bcast(v, ndim):
  return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def _conv(h, kernel, stride=1):
  return jax.lax.conv_general_dilated(h, kernel, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _preact(d, h, node):
  """Layer output before its norm (Dense: ``h @ kernel + bias``)."""
  if node.kind == 'conv':
    z = _conv(h, d['kernel'], node.stride)
    return z + _bcast(d['bias'], 4) if node.bias else z
  return h @ d['kernel'] + d['bias'][None]


class _Stop(Exception):
  pass


@functools.partial(jax.jit, static_argnames=('chain', 'upto'))
def _resnet_forward(params, stats, x, chain, upto=None):
  """`_run` for `models.ResNet` (nodes in the order the forward pass meets them)."""
  nodes = chain.nodes
  n = len(nodes) if upto is None else upto
  ins, zs = [], []
  feats = {g: [] for g in chain.groups}

  def layer(h):
    i = len(ins)
    if nodes[i].kind == 'dense' and h.ndim == 4:
      h = jnp.mean(h, axis=(1, 2))
    ins.append(h)
    if i == n:
      raise _Stop
    zs.append(_preact(_get(params, nodes[i].path), h, nodes[i]))
    return zs[-1], nodes[i]

  def norm(z, node):
    if node.norm is None:
      return z
    st = _get(stats, node.norm) if chain.norm == 'batch' else None
    return _normalize(z, _get(params, node.norm), st, chain.norm)

  try:
    h = jax.nn.relu(norm(*layer(x)))
    feats[chain.groups[0]].append(h)
    k = len(chain.stage_sizes)
    for s, nb in enumerate(chain.stage_sizes):
      for b in range(nb):
        y = jax.nn.relu(norm(*layer(h)))
        feats[chain.groups[k]].append(y)
        k += 1
        sc = norm(*layer(h)) if nodes[len(ins)].path[-1] == 'shortcut_conv' else h
        h = jax.nn.relu(sc + norm(*layer(y)))
        feats[chain.groups[s]].append(h)
    layer(h)
  except _Stop:
    pass
  return ins, zs, feats


def _run(params, stats, x, chain, upto=None):
  """``(ins, zs, feats)``: per node its input and pre-norm output; group features."""
  if chain.nodes:
    return _resnet_forward(params, stats, x, chain, upto)
  ins, zs, hs = _forward(params, stats, x, chain, upto)
  return ins, zs, dict(zip(chain.groups, hs))


def _patches(h, kh, kw, stride=1):
  """im2col ``[N, H, W, C] -> [N H' W', C kh kw]``, channel-major (``c * kh * kw + tap``)."""
  p = jax.lax.conv_general_dilated_patches(
      h, (kh, kw), (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return p.reshape(-1, p.shape[-1])


def _normalize(z, p, st, norm):
  if norm == 'none':
    return z
  if norm == 'batch':
    mean, var, eps = _bcast(st['mean'], z.ndim), _bcast(st['var'], z.ndim), _BN_EPS
  else:  # GroupNorm, one channel per group: per example over the positions
    mean = jnp.mean(z, axis=(1, 2), keepdims=True)
    var = jnp.maximum(jnp.mean(z * z, axis=(1, 2), keepdims=True) - mean * mean, 0.0)
    eps = _GN_EPS
  return ((z - mean) * jax.lax.rsqrt(var + eps) * _bcast(p['scale'], z.ndim)
          + _bcast(p['bias'], z.ndim))


@functools.partial(jax.jit, static_argnames=('chain', 'upto'))
def _forward(params, stats, x, chain, upto=None):
  """``(ins, zs, hs)``: per layer its input and pre-norm output; hidden features.

  ``upto=l`` runs layers ``0 … l-1`` and also returns the input of layer ``l``
  as ``ins[l]`` (pooled if it is the first Dense after the convs).
  """
  n = len(chain.layers) if upto is None else upto
  ins, zs, hs = [], [], []
  h = x
  for l, (name, kind) in enumerate(chain.layers[:n + 1]):
    if kind == 'dense' and h.ndim == 4:  # global mean pool after the convs
      h = jnp.mean(h, axis=(1, 2))
    ins.append(h)
    if l == n:
      break
    d = params[name]
    if kind == 'conv':
      z = _conv(h, d['kernel']) + _bcast(d['bias'], 4)
    else:
      z = h @ d['kernel'] + d['bias'][None]
    zs.append(z)
    if l < len(chain.layers) - 1:
      if kind == 'conv':
        i = name.split('_')[1]
        z = _normalize(z, params.get(f'Norm_{i}'), (stats or {}).get(f'Norm_{i}'),
                       chain.norm)
      h = jax.nn.relu(z)
      hs.append(h)
  return ins, zs, hs


def _spec(chain):
  if chain.nodes:
    return resnet_spec(chain.stage_sizes, norm=chain.norm)
  if not chain.cnn:
    return mlp_spec(len(chain.groups))
  num_convs = sum(k == 'conv' for _, k in chain.layers)
  return cnn_spec(num_convs, len(chain.layers) - num_convs, norm=chain.norm)


def _layer_dims(params, chain, x):
  """`LayerDims` of every layer (input ``x`` gives the conv positions)."""
  dims = []
  res = {-1: tuple(x.shape[1:3]) if x.ndim == 4 else (1, 1)}  # per group: H, W
  for node in _nodes(chain):
    k = _get(params, node.path)['kernel']
    if node.kind == 'conv':
      hw = tuple(-(-r // node.stride) for r in res[node.g_in])  # SAME padding
      res[node.g_out] = hw
      per_unit = int(node.bias) + (2 if node.norm is not None else 0)
      dims.append(LayerDims(k.shape[2], k.shape[3], k.shape[0] * k.shape[1],
                            hw[0] * hw[1], per_unit))
    else:
      dims.append(LayerDims(k.shape[0], k.shape[1]))
  return dims


# --------------------------------------------------------------------------- #
# PLeaS.
# --------------------------------------------------------------------------- #
def pleas(params_a: Any, params_b: Any, batches: Iterable[Any] | Any, *,
          size: float, num_hidden: int | None = None,
          ridge: float | Sequence[float] = 1e-3,
          least_squares: bool = True, align: bool = True,
          ratios: Sequence[float] | None = None,
          inputs: str = 'merged', ridge_to: str = 'zero',
          batch_tasks: Sequence[int | None] | None = None,
          norm: str | None = None, measure: str = 'params',
          fit: str = 'closed_form', fit_steps: int = 400,
          fit_lr: float = 5e-4, bn_stats: str = 'recompute',
          criterion: str = 'sensitivity') -> PleasResult:
  """Merges two MLPs, CNNs or ResNets into one of ``size`` x one model (module docstring).

  Args:
    params_a: model A: params of `models.MLP` (``Dense_0 … Dense_L``),
      `models.CNN` (``Conv_i``, ``Norm_i``, ``Dense_j``) or `models.ResNet`
      (``conv_init``, ``stage{s}_block{b}``, ``head``); for BatchNorm the
      variables ``{'params': …, 'batch_stats': …}``.
    params_b: model B, same architecture (its own head).
    batches: a list of input batches (``[N, d_in]`` for an MLP,
      ``[N, H, W, C]`` for a CNN) for matching and the least-squares
      statistics (task data, or generic data for PLeaS-free).
    size: target size relative to one model, in ``[1, 2]`` (sizes below the
      all-merged trunk plus two heads give that model; 2.0 keeps both models
      whole).
    num_hidden: MLPs: number of hidden layers L (default: all Dense layers
      but the last). CNNs: leave it out (the chain is read from the names).
    ridge: ridge strength relative to the mean diagonal of each Gram matrix;
      or a sequence of candidates: then every 5th example is held out, each
      layer takes the candidate with the smallest held-out squared error and
      is refitted on all rows with it (`PleasResult.ridges`).
    least_squares: solve the weights (PLeaS); False averages the blocks
      (permute-then-average at the same widths).
    align: match units first; False keeps B's order (no-alignment baseline).
    ratios: explicit ratios per hidden group (ResNets: per stage; overrides
      ``size``).
    inputs: the features each layer's least squares is fitted on.
      ``'merged'`` (default): the merged network's own features, layer by
      layer in order, so each layer is fitted to what it will actually read
      (the errors of earlier merged layers are absorbed instead of
      compounding). ``'original'``: PLeaS' reference, the assembled features
      of the original models, every layer independently.
    ridge_to: ``'zero'`` (plain ridge) or ``'average'``: the ridge pulls
      towards the permute-then-average weights, so a large ridge falls back
      to them (with a grid of ridges, per layer, as the held-out rows
      decide).
    batch_tasks: optional task of each batch: 0 (A's task), 1 (B's) or
      None. Merged outputs are fitted on every row; A's separate outputs and
      head (they serve only task A) on A's and untagged rows, B's likewise.
    norm: CNN norm: ``'none'``, ``'batch'`` or ``'group'`` (GroupNorm with
      one channel per group); default inferred (``'batch'`` when
      ``batch_stats`` are given, ``'none'`` without ``Norm_i`` modules).
      ``'layer'`` raises (LayerNorm mixes the blocks).
    measure: what ``size`` counts: ``'params'`` (default) or ``'flops'``
      (`merged_size`; conv FLOPs scale with the spatial positions).
    fit: ``'closed_form'`` (default) or ``'gradient'``: PLeaS' reference fit,
      Adam with a cosine schedule from the permute-then-average weights on
      the same (full-batch) objective, the sep_A <-> sep_B blocks masked.
    fit_steps: Adam steps per layer for ``fit='gradient'`` (reference: 400).
    fit_lr: peak learning rate for ``fit='gradient'`` (reference: 5e-4).
    criterion: which units to keep separate (and so the ratios).
      ``'sensitivity'`` (default): the units whose merging changes the
      pre-activations of the layers reading them most, to first order:
      ``E[(h_a - h_b)^2] (|W_a[i]|^2 + |W_b[i]|^2) / 4`` with ``W[i]`` the
      unit's kernel rows in those layers (identity skips not counted).
      ``'correlation'``: the worst-correlated units (PLeaS' ``get_blocks``).
    bn_stats: BatchNorm running statistics of the merged model.
      ``'recompute'`` (default, PLeaS' reference): every channel's, on the
      merged model over all rows of ``batches``, layer by layer.
      ``'keep_separate'``: separate channels keep their own model's running
      statistics (their least-squares targets are that model's pre-norm
      outputs), merged channels are recomputed; at size 2.0 this is the exact
      ensemble whatever data the endpoints' statistics came from.

  Returns:
    A `PleasResult`; evaluate with
    ``result.module(out_a + out_b).apply(result.variables, x)``
    (``models.MLP(result.widths, …)``, ``models.CNN(result.features,
    result.dense, …, norm=result.norm)`` or ``models.ResNet(result.stage_sizes,
    result.features, …)``). For ResNets ``ratios`` and ``widths`` are per
    group (stream groups first, then the blocks' inner groups).

  Example:
    >>> import jax
    >>> from mergejax import permute
    >>> from mergejax.permute import models
    >>> cnn = models.CNN(features=(4,), dense=(), num_outputs=2, norm='none')
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 1))
    >>> a = cnn.init(jax.random.key(1), x)['params']
    >>> b = cnn.init(jax.random.key(2), x)['params']
    >>> r = permute.pleas(a, b, [x], size=2.0)
    >>> r.features, r.module(4).apply(r.variables, x).shape
    ((8,), (8, 4))
  """
  if inputs not in ('merged', 'original'):
    raise ValueError(f"inputs must be 'merged' or 'original', got {inputs!r}.")
  if bn_stats not in ('recompute', 'keep_separate'):
    raise ValueError("bn_stats must be 'recompute' or 'keep_separate', got "
                     f'{bn_stats!r}.')
  if fit not in ('closed_form', 'gradient'):
    raise ValueError(f"fit must be 'closed_form' or 'gradient', got {fit!r}.")
  if measure not in _MEASURES:
    raise ValueError(f"measure must be 'params' or 'flops', got {measure!r}.")
  if criterion not in ('sensitivity', 'correlation'):
    raise ValueError("criterion must be 'sensitivity' or 'correlation', got "
                     f'{criterion!r}.')
  if ratios is None and not 1.0 <= float(size) <= 2.0:
    raise ValueError(f'size must be in [1, 2] (x one model), got {size!r}.')
  batches = list(batches) if isinstance(batches, (list, tuple)) else (
      [batches] if hasattr(batches, 'shape') else list(batches))
  if not batches:
    raise ValueError('pleas: no batches given.')
  sources = [None] * len(batches) if batch_tasks is None else list(batch_tasks)
  if len(sources) != len(batches) or any(t not in (None, 0, 1) for t in sources):
    raise ValueError('batch_tasks must give 0 (task A), 1 (task B) or None for '
                     f'each of the {len(batches)} batches, got {batch_tasks!r}.')
  if ridge_to not in ('zero', 'average'):
    raise ValueError(f"ridge_to must be 'zero' or 'average', got {ridge_to!r}.")
  ridges = np.atleast_1d(np.asarray(ridge, np.float64))
  if ridges.size == 0 or not np.all(np.isfinite(ridges)) or np.any(ridges < 0):
    raise ValueError(f'ridge must be a finite value >= 0 or a non-empty list of '
                     f'them, got {ridge!r}.')
  if fit == 'gradient' and int(fit_steps) < 1:
    raise ValueError(f"fit='gradient' needs fit_steps >= 1, got {fit_steps}.")
  pa, sa = _split_variables(params_a)
  pb, sb = _split_variables(params_b)
  chain = _infer_chain(pa, num_hidden, norm, sa is not None)
  _check_pair(pa, pb, sa, sb, chain)
  if chain.cnn and batches[0].ndim != 4:
    raise ValueError(f'pleas: a CNN needs [N, H, W, C] batches, got shape '
                     f'{tuple(batches[0].shape)}.')
  nodes = _nodes(chain)
  resnet = bool(chain.stage_sizes)
  num_ratios = len(chain.stage_sizes) if resnet else len(chain.groups)
  if ratios is not None and (len(ratios) != num_ratios or
                             not all(0.0 <= r <= 1.0 for r in ratios)):
    what = (f'{num_ratios} stages' if resnet else
            f'{num_ratios} hidden groups {chain.groups}')
    raise ValueError(f'pleas: ratios must give a value in [0, 1] for each of the '
                     f'{what}, got {ratios!r}.')

  def features(v, x):
    return _run(v[0], v[1], x, chain)[2]

  perms, costs = evaluate.activation_matching(features, (pa, sa), (pb, sb), batches,
                                              return_costs=True)
  if not align:
    perms = {g: jnp.arange(p.shape[0], dtype=jnp.int32) for g, p in perms.items()}
  spec = _spec(chain)
  if sb is None:
    pb = apply_permutation(spec, perms, pb)
  else:
    vb = apply_permutation(spec, perms, {'params': pb, 'batch_stats': sb})
    pb, sb = vb['params'], vb['batch_stats']
  if criterion == 'correlation':
    sims = [np.asarray(costs[g])[np.arange(len(perms[g])), np.asarray(perms[g])]
            for g in chain.groups]
  else:  # scores in [0, 1] on one scale across groups: 1 - cost / max cost
    cost = _merge_costs(features, (pa, sa), (pb, sb), batches, chain)
    top = max(float(np.max(c)) for c in cost) or 1.0
    sims = [1.0 - c / top for c in cost]
  dims = _layer_dims(pa, chain, batches[0])
  if resnet:
    # One ratio per stage, shared by its stream and inner groups (models.ResNet
    # has one width per stage); a move separates the worst-matched units of
    # every group of the stage.
    def size_of(stage_r):
      r = [stage_r[t] for t in chain.tie]
      return _size([(d, 0.0 if nd.g_in < 0 else r[nd.g_in],
                     1.0 if nd.g_out is None else r[nd.g_out])
                    for d, nd in zip(dims, nodes)], measure)
    if ratios is None:
      stage_sims = [1.0 - sum(1.0 - np.sort(sims[g]) for g in range(len(sims))
                              if chain.tie[g] == st) for st in range(num_ratios)]
      ratios = _greedy_ratios(stage_sims, size_of, size)
    stage_ratios = tuple(float(r) for r in ratios)
    group_ratios = [stage_ratios[t] for t in chain.tie]
    merged = size_of(stage_ratios)
  else:
    if ratios is None:
      ratios = choose_ratios(sims, dims, size, measure=measure)
    group_ratios = list(ratios)
    merged = merged_size(dims, ratios, measure=measure)
  # Units: merged = best matched (1 - r) fraction, separate = the rest.
  groups = []
  for k in range(len(sims)):
    n = len(sims[k])
    n_sep = int(round(group_ratios[k] * n))
    order = np.argsort(-sims[k], kind='stable')
    groups.append((np.sort(order[:n - n_sep]), np.sort(order[n - n_sep:])))
  widths = tuple(len(m) + 2 * len(s) for m, s in groups)

  def assemble(xa, xb, k):
    """[(a[m] + b[m])/2, a[s], b[s]] along the last axis for group k."""
    m, s = groups[k]
    return jnp.concatenate([(xa[..., m] + xb[..., m]) / 2, xa[..., s], xb[..., s]],
                           axis=-1)

  out, stats_out = {}, ({} if chain.norm == 'batch' else None)
  chosen = []
  grid = tuple(float(r) for r in np.atleast_1d(np.asarray(ridge, np.float64)))
  for l, node in enumerate(nodes):  # in order: node l reads nodes < l
    head = node.g_out is None
    da, db = _get(pa, node.path), _get(pb, node.path)
    ka, kb = da['kernel'], db['kernel']
    conv = node.kind == 'conv'
    taps = ka.shape[0] * ka.shape[1] if conv else 1
    avg = _average_blocks(_rows_first(ka), _rows_first(kb), da.get('bias'),
                          db.get('bias'), groups[node.g_in] if node.g_in >= 0 else None,
                          None if head else groups[node.g_out])
    flat = lambda k, b: np.concatenate(
        [np.asarray(k, np.float64).reshape(-1, k.shape[-1])] +
        ([np.asarray(b, np.float64)[None]] if node.bias else []), 0)
    if not least_squares:
      w = flat(*avg)
    else:
      fit_st, val = {}, {}  # per data source: (X^T X, X^T Y), fitting / held out
      offset = 0
      for x, src in zip(batches, sources):
        ins_a, za, _ = _run(pa, sa, x, chain)
        ins_b, zb, _ = _run(pb, sb, x, chain)
        if node.g_in < 0:
          xin = ins_a[l]
        elif inputs == 'merged':  # what merged layer l will actually read
          xin = _run(out, stats_out, x, chain, upto=l)[0][l]
        else:  # PLeaS' reference: the original models' features
          xin = assemble(ins_a[l], ins_b[l], node.g_in)
        if conv:
          xin = _patches(xin, ka.shape[0], ka.shape[1], node.stride)
        if node.bias:
          xin = jnp.concatenate([xin, jnp.ones((xin.shape[0], 1), xin.dtype)], 1)
        y = (jnp.concatenate([za[l], zb[l]], -1) if head
             else assemble(za[l], zb[l], node.g_out))
        y = y.reshape(-1, y.shape[-1])
        xin, y = np.asarray(xin, np.float64), np.asarray(y, np.float64)
        # Every `_HOLDOUT`-th example (counted across batches) is held out,
        # with all its positions.
        n_ex = x.shape[0]
        held = np.repeat((offset + np.arange(n_ex)) % _HOLDOUT == 0,
                         xin.shape[0] // n_ex)
        offset += n_ex
        if len(grid) == 1:
          held[:] = False
        for acc, rows in ((fit_st, ~held), (val, held)):
          st = (xin[rows].T @ xin[rows], xin[rows].T @ y[rows])
          acc[src] = st if src not in acc else (acc[src][0] + st[0],
                                                acc[src][1] + st[1])
      w_avg = flat(*avg)
      w0 = w_avg if ridge_to == 'average' else None
      blocks = _out_blocks(groups, node.g_out, head, ka.shape[-1], kb.shape[-1])
      in_blocks = _index_blocks(groups, node.g_in, ka.shape[-2], taps)
      if fit == 'closed_form':
        solve = lambda st, r: _solve_blocks(st, blocks, in_blocks, r, w0, node.bias)
      else:
        solve = lambda st, r: _fit_gradient(st, blocks, in_blocks, r, w0, w_avg,
                                            fit_steps, fit_lr, node.bias)
      lam = grid[0]
      if len(grid) > 1:  # choose the ridge on the held-out rows, refit on all
        # The held-out squared error (up to constants): the objective unridged.
        errs = [_objective(solve(fit_st, r), val, blocks, in_blocks, 0.0,
                           bias=node.bias) for r in grid]
        lam = grid[int(np.argmin(errs))]
        for src, (g, h) in val.items():
          f = fit_st.get(src)
          fit_st[src] = (g, h) if f is None else (f[0] + g, f[1] + h)
      chosen.append(lam)
      w = solve(fit_st, lam)
    n_w = int(np.prod(avg[0].shape[:-1]))
    kernel = np.asarray(w[:n_w]).reshape(avg[0].shape)
    if conv:  # [C_in, kh, kw, C_out] -> Flax HWIO
      kernel = kernel.transpose(1, 2, 0, 3)
    layer = {'kernel': jnp.asarray(kernel, jnp.float32)}
    if node.bias:
      layer['bias'] = jnp.asarray(w[n_w], jnp.float32)
    _set(out, node.path, layer)
    if node.norm is not None:
      na, nb = _get(pa, node.norm), _get(pb, node.norm)
      _set(out, node.norm, {k: jnp.asarray(assemble(
          np.asarray(na[k], np.float64)[None], np.asarray(nb[k], np.float64)[None],
          node.g_out)[0], jnp.float32) for k in ('scale', 'bias')})
      if chain.norm == 'batch':
        st = _batch_stats(out, stats_out, batches, chain, l)
        if bn_stats == 'keep_separate':  # [recomputed m | A's s | B's s]
          m = len(groups[node.g_out][0])
          st = {k: jnp.concatenate([v[:m], jnp.asarray(assemble(
              np.asarray(_get(sa, node.norm)[k])[None],
              np.asarray(_get(sb, node.norm)[k])[None], node.g_out)[0, m:],
              jnp.float32)]) for k, v in st.items()}
        _set(stats_out, node.norm, st)
  if resnet:
    stage_widths = tuple(widths[:num_ratios])
    return PleasResult(out, widths, tuple(group_ratios), merged, tuple(chosen) or None,
                       batch_stats=stats_out, features=stage_widths, norm=chain.norm,
                       stage_sizes=chain.stage_sizes)
  num_convs = sum(k == 'conv' for _, k in chain.layers)
  return PleasResult(out, widths, tuple(float(r) for r in ratios), merged,
                     tuple(chosen) or None, batch_stats=stats_out,
                     features=widths[:num_convs], dense=widths[num_convs:],
                     norm=chain.norm)


def _merge_costs(features, va, vb, batches, chain):
  """Per group and unit: the first-order cost of merging the matched pair.

  Merging unit ``i`` replaces A's feature ``h_a`` by ``(h_a + h_b) / 2``, a
  change ``(h_b - h_a) / 2`` that every layer reading the group multiplies by
  the unit's kernel rows. Ignoring the correlations between units, the
  expected squared change of those layers' pre-activations, summed over both
  models, is ``E[(h_a - h_b)^2] / 4 * (|W_a[i]|^2 + |W_b[i]|^2)``, with the
  expectation over the rows of ``batches`` (and positions, for convs) and
  ``|W[i]|^2`` the squared norm of unit ``i``'s rows in every reading layer.
  Unlike the correlation, this weighs a unit by how large its mismatch is and
  by how much the next layers use it (identity skips are not counted).
  """
  sq = [0.0] * len(chain.groups)
  rows = [0] * len(chain.groups)
  for x in batches:
    fa, fb = features(va, x), features(vb, x)
    for k, g in enumerate(chain.groups):
      for ha, hb in zip(evaluate.as_list(fa[g]), evaluate.as_list(fb[g])):
        d = np.asarray(ha, np.float64) - np.asarray(hb, np.float64)
        d = d.reshape(-1, d.shape[-1])
        sq[k] = sq[k] + np.sum(d * d, axis=0)
        rows[k] += d.shape[0]
  use = [0.0] * len(chain.groups)
  for node in _nodes(chain):
    if node.g_in >= 0:
      for params in (va[0], vb[0]):
        w = _rows_first(np.asarray(_get(params, node.path)['kernel'], np.float64))
        use[node.g_in] = use[node.g_in] + np.sum(
            (w * w).reshape(len(sq[node.g_in]), -1), axis=1)
  return [s / max(r, 1) * u / 4 for s, r, u in zip(sq, rows, use)]


def _rows_first(kernel):
  """A kernel with input units first: Dense ``[in, out]``; conv ``[C_in, kh, kw, C_out]``."""
  k = np.asarray(kernel, np.float64)
  return k.transpose(2, 0, 1, 3) if k.ndim == 4 else k


def _batch_stats(out, stats_out, batches, chain, l):
  """Exact mean / variance of merged layer l's pre-norm output over all rows."""
  s = ss = 0.0
  n = 0
  node = _nodes(chain)[l]
  d = _get(out, node.path)
  for x in batches:
    h = _run(out, stats_out, x, chain, upto=l)[0][l]
    z = np.asarray(_preact(d, h, node), np.float64)
    z = z.reshape(-1, z.shape[-1])
    s, ss, n = s + z.sum(0), ss + (z * z).sum(0), n + z.shape[0]
  mean = s / n
  return {'mean': jnp.asarray(mean, jnp.float32),
          'var': jnp.asarray(np.maximum(ss / n - mean ** 2, 0.0), jnp.float32)}


def _block_stats(stats, allowed):
  """``(X^T X, X^T Y)`` of the data sources an output block is fitted on.

  Merged outputs use every row; a model's separate outputs and head (they
  read no input of the other model) only rows of that model's task and
  untagged rows, when tagged rows exist.
  """
  own = {('m', 'a'): 0, ('m', 'b'): 1}.get(tuple(allowed))
  keys = [k for k in stats if own is None or k in (None, own)]
  if not keys:
    keys = list(stats)
  g = sum(stats[k][0] for k in keys)
  h = sum(stats[k][1] for k in keys)
  return g, h


def _block_rows(in_blocks, allowed, d_in, bias=True):
  return np.concatenate([in_blocks[a] for a in allowed] +
                        ([[d_in]] if bias else [])).astype(int)


def _solve_blocks(stats, blocks, in_blocks, ridge, w0=None, bias=True):
  """Block ridge least squares of one layer from per-source Gram statistics.

  Minimises ``|X W - Y|^2 + lam |W - w0|^2`` per output block (``w0 = 0``
  if None; ``lam`` relative to the mean diagonal of the block's ``X^T X``),
  with the block's weights restricted to its allowed input rows
  (``in_blocks``: patch indices for a conv). Returns the ``[d_in + 1, d_out]``
  float64 solution (last row: the bias; no such row without ``bias``).
  """
  g_all, h_all = _block_stats(stats, ('m', 'a', 'b'))
  d_in = g_all.shape[0] - int(bias)
  w = np.zeros((g_all.shape[0], h_all.shape[1]))
  for cols, allowed in blocks:
    g, h = _block_stats(stats, allowed)
    lam = ridge * np.mean(np.diag(g))
    rows = _block_rows(in_blocks, allowed, d_in, bias)
    gi = g[np.ix_(rows, rows)] + lam * np.eye(len(rows))
    rhs = h[np.ix_(rows, cols)]
    if w0 is not None:
      rhs = rhs + lam * w0[np.ix_(rows, cols)]
    try:
      w[np.ix_(rows, cols)] = np.linalg.solve(gi, rhs)
    except np.linalg.LinAlgError:
      raise ValueError(
          'pleas: a layer\'s least-squares system is singular (its features '
          f'are rank-deficient at ridge={ridge}); pass a ridge > 0, e.g. '
          'ridge=1e-3, or more data.') from None
  return w


def _objective(w, stats, blocks, in_blocks, ridge, w0=None, bias=True):
  """The ridge objective `_solve_blocks` minimises, summed over the output blocks."""
  total = 0.0
  d_in = _block_stats(stats, ('m', 'a', 'b'))[0].shape[0] - int(bias)
  for cols, allowed in blocks:
    g, h = _block_stats(stats, allowed)
    lam = ridge * np.mean(np.diag(g))
    wc = w[:, cols]
    ref = 0.0 if w0 is None else w0[:, cols]
    rows = _block_rows(in_blocks, allowed, d_in, bias)
    total += (np.sum(wc * (g @ wc)) - 2 * np.sum(wc * h[:, cols]) +
              lam * np.sum((wc[rows] - (ref if w0 is None else ref[rows])) ** 2))
  return total


def _fit_gradient(stats, blocks, in_blocks, ridge, w0, w_init, steps, lr, bias=True):
  """PLeaS' reference fit: Adam + cosine schedule on the block objective.

  The same objective as `_solve_blocks` (per output block, from its Gram
  statistics, i.e. full batch), scaled to a mean over rows and outputs; the
  weights start at ``w_init`` (permute-then-average) and a mask keeps every
  disallowed (sep_A <-> sep_B) entry at zero.
  """
  g_all, h_all = _block_stats(stats, ('m', 'a', 'b'))
  d_in, d_out = g_all.shape[0] - int(bias), h_all.shape[1]
  gs, hs, colmask, lams, scale = [], [], [], [], []
  mask = np.zeros((g_all.shape[0], d_out))
  for cols, allowed in blocks:
    g, h = _block_stats(stats, allowed)
    mask[np.ix_(_block_rows(in_blocks, allowed, d_in, bias), cols)] = 1.0
    cm = np.zeros(d_out)
    cm[cols] = 1.0
    gs.append(g)
    hs.append(h)
    colmask.append(cm)
    lams.append(ridge * np.mean(np.diag(g)))
    # Rows (the bias column's Gram; without one, the mean diagonal) x outputs.
    scale.append(max(g[-1, -1] if bias else np.mean(np.diag(g)), 1.0) * d_out)
  f32 = lambda v: jnp.asarray(np.asarray(v), jnp.float32)
  w0 = np.zeros_like(mask) if w0 is None else w0
  w = _adam_fit(f32(gs), f32(hs), f32(colmask), f32(lams), f32(scale), f32(mask),
                f32(w_init * mask), f32(w0 * mask), jnp.float32(lr), steps=int(steps))
  return np.asarray(w, np.float64) * mask


@functools.partial(jax.jit, static_argnames=('steps',))
def _adam_fit(gs, hs, colmask, lams, scale, mask, w_init, w0, lr, steps):
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss(w):
    quad = jnp.sum(jnp.einsum('bij,jo->bio', gs, w) * w[None], axis=1)  # [B, d_out]
    lin = jnp.sum(hs * w[None], axis=1)
    reg = jnp.sum(mask * (w - w0) ** 2, axis=0)
    per = (quad - 2 * lin + lams[:, None] * reg[None]) * colmask
    return jnp.sum(per / scale[:, None])

  def step(carry, _):
    w, state = carry
    grad = jax.grad(loss)(w) * mask  # the structural zeros get no update
    return optim.optax_step(opt, grad, state, w), None

  (w, _), _ = jax.lax.scan(step, (w_init, opt.init(w_init)), None, length=steps)
  return w


def _index_blocks(groups, k, d_in=None, taps=1):
  """Input index blocks {'m','a','b'} of the layer reading group k (-1: the input).

  With ``taps`` (a conv's ``kh * kw``) every channel ``c`` expands to its
  patch indices ``c * taps … c * taps + taps - 1``.
  """
  if k < 0:  # the shared input
    ch = {'m': np.arange(d_in), 'a': np.zeros(0, int), 'b': np.zeros(0, int)}
  else:
    nm, ns = len(groups[k][0]), len(groups[k][1])
    ch = {'m': np.arange(nm), 'a': nm + np.arange(ns), 'b': nm + ns + np.arange(ns)}
  return {b: (c[:, None] * taps + np.arange(taps)[None]).reshape(-1)
          for b, c in ch.items()}


def _out_blocks(groups, l, head, na, nb):  # l: the output group
  """(output columns, allowed input blocks) of merged layer l (heads: na, nb outputs)."""
  if head:  # separate heads
    return [(np.arange(na), ('m', 'a')), (na + np.arange(nb), ('m', 'b'))]
  nm, ns = len(groups[l][0]), len(groups[l][1])
  return [(np.arange(nm), ('m', 'a', 'b')), (nm + np.arange(ns), ('m', 'a')),
          (nm + ns + np.arange(ns), ('m', 'b'))]


def _average_blocks(ka, kb, ba, bb, part_in, part_out):
  """PLeaS' block construction without least squares.

  ``ka``, ``kb``: kernels with the input units first and the output units
  last (`_rows_first`); ``part_in``/``part_out``: the (merged, separate)
  units of the input / output group (None: the shared input / the heads).
  Returns the merged ``(kernel, bias)`` in that layout (bias None if absent).
  """
  head = part_out is None
  nobias = ba is None
  ba = np.zeros(ka.shape[-1]) if nobias else np.asarray(ba)
  bb = np.zeros(kb.shape[-1]) if nobias else np.asarray(bb)
  if part_in is None:
    mi, si = np.arange(ka.shape[0]), np.zeros(0, int)
  else:
    mi, si = part_in
  zeros = lambda k: np.zeros((len(si),) + k.shape[1:])
  ka_full = np.concatenate([ka[mi], ka[si], zeros(ka)], 0)  # inputs m | a | b
  kb_full = np.concatenate([kb[mi], zeros(kb), kb[si]], 0)
  if head:
    # Heads: A's head reads merged + sep_A; B's head merged + sep_B.
    return np.concatenate([ka_full, kb_full], -1), np.concatenate([ba, bb])
  # Merged outputs: average of A and B (each reading its own separate inputs
  # with half weight, the merged inputs averaged); separate outputs: own model.
  mo, so = part_out
  k_m = (ka_full[..., mo] + kb_full[..., mo]) / 2
  k = np.concatenate([k_m, ka_full[..., so], kb_full[..., so]], -1)
  b = np.concatenate([(ba[mo] + bb[mo]) / 2, ba[so], bb[so]])
  return k, (None if nobias else b)
