"""PLeaS: partial permutations and layer-wise least squares.

Two models of one architecture, e.g. trained on different tasks, are merged
into one wider model of a chosen size between 1x and 2x. The architecture is
a `PleasNetwork` (`mergejax.permute._pleas_networks`): the user's model
function and its conv / Dense layers with the unit groups they read and
write. PLeaS runs that function (under a Flax method interceptor) for every
layer input and output it needs, so nothing about the forward pass is
re-implemented. For the bundled models the network is read from the
parameter names:

* MLPs ``Dense_0 … Dense_L`` (`models.MLP`), hidden groups ``P_0 … P_{L-1}``;
* VGG-style CNNs (`models.CNN`): ``Conv_i`` + an optional per-channel norm
  (``Norm_i``: BatchNorm, or GroupNorm with one channel per group) + ReLU, a
  global mean pool, then ``Dense_j`` layers and the head; groups as
  `cnn_spec`;
* ResNets with basic blocks (`models.ResNet`), groups as `resnet_spec`: one
  residual-stream group per stage, written by every block's ``conv2`` (and
  the stem or shortcut) and read by the next blocks, plus one inner group per
  block; the ratio is chosen per stage and shared by its groups.

LayerNorm mixes the channels of ``[merged | sep_A | sep_B]`` (its mean and
variance run over all of them), which breaks the block structure: it is
rejected.

The method, in three parts:

1. **Matching** (`activation_matching`): B's hidden units are aligned to A's,
   one LAP per group on the inputs of the layers reading it (conv groups use
   every spatial position as a sample); the matched similarity of every unit
   pair is kept.
2. **Partial permutation** (`_pleas_ratios`): per hidden group a ratio
   ``r_k`` of units is kept *separate* (one copy from each model) and the
   best-matched ``1 - r_k`` are merged; the group's width becomes
   ``n_k (1 + r_k)``, ordered ``[merged | sep_A | sep_B]``. Which units are
   worst matched is decided, by default, by their first-order merge cost
   (``criterion='sensitivity'``: the expected squared change that merging a
   pair causes in the pre-activations of the layers reading it), or by their
   correlation (``'correlation'``, PLeaS' choice). `choose_ratios` picks the
   ratios for a budget in parameters (default) or FLOPs with a greedy solver
   (no commercial optimiser): it repeatedly separates the worst-matched units
   per parameter (FLOP) spent.
3. **Least squares** (`_pleas_lstsq`): every layer is solved in closed form.
   Its targets ``Y~ = [(Y_A[m] + Y_B[m])/2, Y_A[s], Y_B[s]]`` are the original
   layers' outputs (before their norms), assembled by blocks. Its inputs are,
   by default, the merged network's own features (layers solved in order);
   PLeaS' reference uses the original models' features
   ``X~ = [(X_A[m] + X_B[m])/2, X_A[s], X_B[s]]`` instead (``inputs=
   'original'``). A conv is a linear map of its im2col patches, so it is
   solved like a Dense layer whose input blocks are the channel blocks
   expanded to their taps, with every spatial position a row. The Gram
   matrices ``X^T X``, ``X^T Y~`` are accumulated over batches in float64;
   each output block is a ridge regression on its allowed input blocks (sep_A
   and sep_B never feed each other). The task heads stay separate: the merged
   model outputs ``[logits_A | logits_B]``. ``fit='gradient'`` replaces the
   closed form by PLeaS' reference fit (Adam, cosine schedule, masked sep_A
   <-> sep_B blocks) on the same statistics.

Norms: merged channels average the two norms' scale and bias, separate
channels keep their own. BatchNorm statistics of the merged model are
recomputed layer by layer, in order, as exact averages over all rows of
``batches`` (what `reset_batch_stats` gives for equal-sized batches; here
computed directly from the merged layer outputs, since each layer's merged
inputs need the statistics of the layers before it).

``least_squares=False`` gives the permute-then-average baseline at the same
widths (PLeaS' block construction), ``align=False`` the no-alignment one. The
data-free variant (PLeaS-free) passes generic inputs (e.g. Gaussian noise)
instead of task data.

References:
  Nasery et al., 2024, "PLeaS: Merging Models with Permutations and Least
  Squares", https://arxiv.org/abs/2407.02447
"""

from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths
from mergejax.permute import _evaluate as evaluate
from mergejax.permute import _pleas_lstsq as lstsq
from mergejax.permute import _pleas_networks as networks
from mergejax.permute import _pleas_ratios as ratios_lib
from mergejax.permute import models as models_lib
from mergejax.permute._spec import apply_permutation



class PleasResult(NamedTuple):
  """The merged model and how it was built.

  Attributes:
    params: merged params (the network's layout at the merged widths).
    widths: widths of all hidden groups, in ``network.groups`` order.
    ratios: fraction of units kept separate, per hidden group.
    size: merged size relative to one model (in the ``measure`` used).
    ridges: the ridge used per layer (None without least squares).
    batch_stats: recomputed BatchNorm statistics (``norm='batch'``), else None.
    features: conv widths (empty for an MLP; the stage widths for a ResNet).
    dense: hidden Dense widths (all of ``widths`` for an MLP).
    norm: the norm kind (``'none' | 'batch' | 'group'``).
    stage_sizes: ResNets: blocks per stage (``features``: the stage widths).
    network: the `PleasNetwork` merged (its ``apply`` runs the result).
    arch: ``'mlp' | 'cnn' | 'resnet'`` for the bundled models, else
      ``'custom'``.
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
  network: Any = None
  arch: str = 'custom'

  @property
  def variables(self) -> dict[str, Any]:
    """``{'params': …}`` plus ``'batch_stats'`` when there are any."""
    return networks.variables(self.params, self.batch_stats)

  def apply(self, x):
    """The merged model's outputs ``[logits_A | logits_B]`` on ``x``."""
    return self.network.apply(self.variables, x)

  def module(self, num_outputs: int):
    """The bundled Flax module that applies ``variables`` (``num_outputs = out_a + out_b``)."""
    if self.arch == 'resnet':
      return models_lib.ResNet(self.stage_sizes, self.features,
                               num_outputs=num_outputs, norm=self.norm)
    if self.arch == 'cnn':
      return models_lib.CNN(features=self.features, dense=self.dense,
                            num_outputs=num_outputs, norm=self.norm)
    if self.arch == 'mlp':
      return models_lib.MLP(self.widths, num_outputs=num_outputs)
    raise ValueError('PleasResult.module builds the bundled models only; for a '
                     'custom PleasNetwork use result.apply(x) (its apply '
                     'function) or build the module from result.widths.')


# With a grid of ridges, every _HOLDOUT-th example is held out to choose one.
_HOLDOUT = 5


# --------------------------------------------------------------------------- #
# The bundled models: their network from the parameter names.
# --------------------------------------------------------------------------- #
def _indexed(params, prefix):
  idx = sorted(int(m.group(1)) for k in params
               if (m := re.fullmatch(prefix + r'_(\d+)', str(k))))
  if idx != list(range(len(idx))):
    raise ValueError(f'pleas: {prefix}_i modules must be numbered 0, 1, …; got '
                     f'{[f"{prefix}_{i}" for i in idx]}.')
  return len(idx)


def _bundled_network(params, num_hidden, norm, has_stats):
  """``(network, arch, stage_sizes)`` of `models.MLP`, `models.CNN` or `models.ResNet` params."""
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
    return networks.mlp_network(num_dense - 1), 'mlp', ()
  if num_hidden is not None and num_hidden != num_convs + num_dense - 1:
    raise ValueError(f'pleas: num_hidden={num_hidden} but the CNN has {num_convs} '
                     f'convs and {num_dense} Dense layers ({num_convs + num_dense - 1} '
                     'hidden groups); leave num_hidden out for CNNs.')
  norm = _norm_kind(norm, has_stats, 'Norm_0' in params, 'CNN (Norm_i)')
  return networks.cnn_network(num_convs, num_dense, norm=norm), 'cnn', ()


def _norm_kind(norm, has_stats, has_norm, what):
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
  norm = _norm_kind(norm, has_stats, 'norm_init' in params, 'ResNet')
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
  return networks.resnet_network(stage_sizes, norm=norm), 'resnet', tuple(stage_sizes)


def _check_pair(pa, pb, sa, sb, head):
  """Same structure and shapes, except the heads' output sizes."""
  head = '/'.join(head)
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


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _layer_dims(network, params, infos):
  """`LayerDims` of every layer (a forward pass gave the conv positions)."""
  dims = []
  for layer, info in zip(network.layers, infos):
    leaves = _get(params, layer.path)
    k = np.shape(leaves['kernel'])
    per_unit = int('bias' in leaves) + (2 if layer.norm is not None else 0)
    dims.append(ratios_lib.LayerDims(k[-2], k[-1], int(np.prod(k[:-2])),
                                     info.positions, per_unit))
  return dims


def _template(network, pa, sa, widths, num_outputs):
  """Merged params (and batch_stats) at the merged widths, all zeros (var: ones).

  The merged model is run while it is built: layer ``l``'s inputs depend on
  the layers solved before it only, so the unsolved ones are placeholders.
  """
  width = dict(zip(network.groups, widths))
  out, stats = {}, (None if sa is None else {})
  for layer in network.layers:
    leaves = _get(pa, layer.path)
    k = np.shape(leaves['kernel'])
    n_in = k[-2] if layer.reads is None else width[layer.reads]
    n_out = num_outputs if layer.writes is None else width[layer.writes]
    new = {'kernel': jnp.zeros(k[:-2] + (n_in, n_out), jnp.float32)}
    if 'bias' in leaves:
      new['bias'] = jnp.zeros((n_out,), jnp.float32)
    _set(out, layer.path, new)
    if layer.norm is not None:
      _set(out, layer.norm, {key: jnp.zeros((n_out,), jnp.float32)
                             for key in _get(pa, layer.norm)})
      if sa is not None:
        _set(stats, layer.norm, {key: (jnp.ones if key == 'var' else jnp.zeros)(
            (n_out,), jnp.float32) for key in _get(sa, layer.norm)})
  return out, stats


def _tied_sims(sims, ratio_of, num_ratios, groups):
  """One score array per free ratio: a move separates units of all its groups."""
  out = []
  for t in range(num_ratios):
    tied = [np.sort(sims[g]) for g in range(len(sims)) if ratio_of[g] == t]
    if len({len(s) for s in tied}) > 1:
      names = [groups[g] for g in range(len(sims)) if ratio_of[g] == t]
      raise ValueError(f'pleas: groups {names} share a ratio (ratio_of) but have '
                       f'widths {[len(s) for s in tied]}; tied groups need one width.')
    out.append(1.0 - sum(1.0 - s for s in tied))
  return out


def pleas(params_a: Any, params_b: Any, batches: Iterable[Any] | Any, *,
          size: float, network: networks.PleasNetwork | None = None,
          num_hidden: int | None = None,
          ridge: float | Sequence[float] = 1e-3,
          least_squares: bool = True, align: bool = True,
          ratios: Sequence[float] | None = None,
          inputs: str = 'merged', ridge_to: str = 'zero',
          batch_tasks: Sequence[int | None] | None = None,
          norm: str | None = None, measure: str = 'params',
          fit: str = 'closed_form', fit_steps: int = 400,
          fit_lr: float = 5e-4, bn_stats: str = 'recompute',
          criterion: str = 'sensitivity') -> PleasResult:
  """Merges two models into one of ``size`` x one model (module docstring).

  Args:
    params_a: model A's params, or the variables ``{'params': …,
      'batch_stats': …}`` for BatchNorm. Without ``network``: params of
      `models.MLP` (``Dense_0 … Dense_L``), `models.CNN` (``Conv_i``,
      ``Norm_i``, ``Dense_j``) or `models.ResNet` (``conv_init``,
      ``stage{s}_block{b}``, ``head``).
    params_b: model B, same architecture (its own head).
    batches: a list of input batches for matching and the least-squares
      statistics (task data, or generic data for PLeaS-free).
    size: target size relative to one model, in ``[1, 2]`` (sizes below the
      all-merged trunk plus two heads give that model; 2.0 keeps both models
      whole).
    network: the model function and layer graph (`PleasNetwork`, e.g.
      `mlp_network`, `cnn_network`, `resnet_network`, or one describing the
      user's own linen model); default: the bundled model the parameter names
      show.
    num_hidden: bundled MLPs: the number of hidden layers, checked against
      the params (default: all Dense layers but the last).
    ridge: ridge strength relative to the mean diagonal of each Gram matrix;
      or a sequence of candidates: then every 5th example is held out, each
      layer takes the candidate with the smallest held-out squared error and
      is refitted on all rows with it (`PleasResult.ridges`).
    least_squares: solve the weights (PLeaS); False averages the blocks
      (permute-then-average at the same widths).
    align: match units first; False keeps B's order (no-alignment baseline).
    ratios: explicit ratios, one per free ratio (per group, or per
      ``network.ratio_of`` index: per stage for ResNets; overrides ``size``).
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
    norm: bundled CNNs and ResNets: ``'none'``, ``'batch'`` or ``'group'``
      (GroupNorm with one channel per group); default inferred (``'batch'``
      when ``batch_stats`` are given, ``'none'`` without norm modules).
      ``'layer'`` raises (LayerNorm mixes the blocks). A custom network's
      norms are read from its modules.
    measure: what ``size`` counts: ``'params'`` (default) or ``'flops'``
      (`merged_size`; conv FLOPs scale with the spatial positions).
    fit: ``'closed_form'`` (default) or ``'gradient'``: PLeaS' reference fit,
      Adam with a cosine schedule from the permute-then-average weights on
      the same (full-batch) objective, the sep_A <-> sep_B blocks masked.
    fit_steps: Adam steps per layer for ``fit='gradient'`` (reference: 400).
    fit_lr: peak learning rate for ``fit='gradient'`` (reference: 5e-4).
    bn_stats: BatchNorm running statistics of the merged model.
      ``'recompute'`` (default, PLeaS' reference): every channel's, on the
      merged model over all rows of ``batches``, layer by layer.
      ``'keep_separate'``: separate channels keep their own model's running
      statistics (their least-squares targets are that model's pre-norm
      outputs), merged channels are recomputed; at size 2.0 this is the exact
      ensemble whatever data the endpoints' statistics came from.
    criterion: which units to keep separate (and so the ratios).
      ``'sensitivity'`` (default): the units whose merging changes the
      pre-activations of the layers reading them most, to first order:
      ``E[(h_a - h_b)^2] (|W_a[i]|^2 + |W_b[i]|^2) / 4`` with ``W[i]`` the
      unit's kernel rows in those layers (identity skips not counted).
      ``'correlation'``: the worst-correlated units (PLeaS' ``get_blocks``).

  Returns:
    A `PleasResult`; ``result.apply(x)`` gives ``[logits_A | logits_B]``
    (for the bundled models also ``result.module(out_a + out_b).apply(
    result.variables, x)``). ``ratios`` and ``widths`` are per group, in
    ``network.groups`` order (ResNets: stream groups first, then the blocks'
    inner groups).

  Example:
    >>> import jax
    >>> from mergejax import permute
    >>> from mergejax.permute import models
    >>> cnn = models.CNN(features=(4,), dense=(), num_outputs=2, norm='none')
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 1))
    >>> a = cnn.init(jax.random.key(1), x)['params']
    >>> b = cnn.init(jax.random.key(2), x)['params']
    >>> r = permute.pleas(a, b, [x], size=2.0)
    >>> r.features, r.apply(x).shape
    ((8,), (8, 4))
  """
  if inputs not in ('merged', 'original'):
    raise ValueError(f"inputs must be 'merged' or 'original', got {inputs!r}.")
  if bn_stats not in ('recompute', 'keep_separate'):
    raise ValueError("bn_stats must be 'recompute' or 'keep_separate', got "
                     f'{bn_stats!r}.')
  if fit not in ('closed_form', 'gradient'):
    raise ValueError(f"fit must be 'closed_form' or 'gradient', got {fit!r}.")
  if measure not in ratios_lib.MEASURES:
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
  grid = np.atleast_1d(np.asarray(ridge, np.float64))
  if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
    raise ValueError(f'ridge must be a finite value >= 0 or a non-empty list of '
                     f'them, got {ridge!r}.')
  grid = tuple(float(r) for r in grid)
  if fit == 'gradient' and int(fit_steps) < 1:
    raise ValueError(f"fit='gradient' needs fit_steps >= 1, got {fit_steps}.")
  pa, sa = networks.split_variables(params_a)
  pb, sb = networks.split_variables(params_b)
  if network is None:
    network, arch, stage_sizes = _bundled_network(pa, num_hidden, norm,
                                                  sa is not None)
    if arch != 'mlp' and np.ndim(batches[0]) != 4:
      raise ValueError(f'pleas: a CNN needs [N, H, W, C] batches, got shape '
                       f'{tuple(np.shape(batches[0]))}.')
  else:
    if num_hidden is not None or norm is not None:
      raise ValueError('pleas: num_hidden and norm describe the bundled models; '
                       'a PleasNetwork gives its layers, and its norms are read '
                       'from its modules.')
    arch, stage_sizes = 'custom', ()
  networks.check_network(network, pa)
  head = network.layers[-1]
  _check_pair(pa, pb, sa, sb, head.path)
  va, vb = networks.variables(pa, sa), networks.variables(pb, sb)
  infos, norm_kind = networks.describe(network, va, batches[0])
  if norm_kind == 'batch' and sa is None:
    raise ValueError('pleas: the network has BatchNorm: pass '
                     "{'params': …, 'batch_stats': …} for both models.")
  num_ratios = network.num_ratios
  ratio_of = network.ratio_of or tuple(range(len(network.groups)))
  if ratios is not None and (len(ratios) != num_ratios or
                             not all(0.0 <= r <= 1.0 for r in ratios)):
    what = (f'{num_ratios} stages' if arch == 'resnet' else
            f'{num_ratios} free ratios (network.ratio_of)' if network.ratio_of
            else f'{num_ratios} hidden groups {network.groups}')
    raise ValueError(f'pleas: ratios must give a value in [0, 1] for each of the '
                     f'{what}, got {ratios!r}.')

  run = networks.capture(network)
  run_jit = jax.jit(run)
  features = lambda v, x: run(v, x)[2]
  perms, costs = evaluate.activation_matching(features, va, vb, batches,
                                              return_costs=True)
  if not align:
    perms = {g: jnp.arange(p.shape[0], dtype=jnp.int32) for g, p in perms.items()}
  spec = networks.network_spec(network, pa, batch_stats=sb is not None)
  vb = apply_permutation(spec, perms, vb) if sb is not None else networks.variables(
      apply_permutation(spec, perms, pb))
  pb, sb = vb['params'], vb.get('batch_stats')
  groups_k = {g: k for k, g in enumerate(network.groups)}
  if criterion == 'correlation':
    sims = [np.asarray(costs[g])[np.arange(len(perms[g])), np.asarray(perms[g])]
            for g in network.groups]
  else:  # scores in [0, 1] on one scale across groups: 1 - cost / max cost
    cost = _merge_costs(features, va, vb, batches, network)
    top = max(float(np.max(c)) for c in cost) or 1.0
    sims = [1.0 - c / top for c in cost]
  dims = _layer_dims(network, pa, infos)

  def size_of(free):
    r = [free[t] for t in ratio_of]
    return ratios_lib.layers_size(
        [(d, 0.0 if l.reads is None else r[groups_k[l.reads]],
          1.0 if l.writes is None else r[groups_k[l.writes]])
         for d, l in zip(dims, network.layers)], measure)

  if ratios is None:
    ratios = ratios_lib.greedy_ratios(
        _tied_sims(sims, ratio_of, num_ratios, network.groups), size_of, size)
  free = tuple(float(r) for r in ratios)
  group_ratios = tuple(free[t] for t in ratio_of)
  merged_size = size_of(free)
  # Units: merged = best matched (1 - r) fraction, separate = the rest.
  parts = []
  for k in range(len(sims)):
    n = len(sims[k])
    n_sep = int(round(group_ratios[k] * n))
    order = np.argsort(-sims[k], kind='stable')
    parts.append((np.sort(order[:n - n_sep]), np.sort(order[n - n_sep:])))
  widths = tuple(len(m) + 2 * len(s) for m, s in parts)
  part = lambda g: None if g is None else parts[groups_k[g]]
  na = int(np.shape(_get(pa, head.path)['kernel'])[-1])
  nb = int(np.shape(_get(pb, head.path)['kernel'])[-1])
  out, stats_out = _template(network, pa, sa, widths, na + nb)

  chosen = []
  for l, (layer, info) in enumerate(zip(network.layers, infos)):
    # In order: layer l reads only what layers < l wrote.
    is_head = layer.writes is None
    da, db = _get(pa, layer.path), _get(pb, layer.path)
    ka, kb = da['kernel'], db['kernel']
    bias = 'bias' in da
    conv = info.kind == 'conv'
    kh, kw = info.kernel
    gi = -1 if layer.reads is None else groups_k[layer.reads]
    avg = lstsq.average_blocks(lstsq.rows_first(ka), lstsq.rows_first(kb),
                               da.get('bias'), db.get('bias'), part(layer.reads),
                               part(layer.writes))
    flat = lambda k, b: np.concatenate(
        [np.asarray(k, np.float64).reshape(-1, k.shape[-1])] +
        ([np.asarray(b, np.float64)[None]] if bias else []), 0)
    if not least_squares:
      w = flat(*avg)
    else:
      fit_st, val = {}, {}  # per data source: (X^T X, X^T Y), fitting / held out
      offset = 0
      for x, src in zip(batches, sources):
        ins_a, za, _ = run_jit(va, x)
        ins_b, zb, _ = run_jit(vb, x)
        if layer.reads is None:
          xin = ins_a[l]
        elif inputs == 'merged':  # what merged layer l will actually read
          xin = run_jit(networks.variables(out, stats_out), x)[0][l]
        else:  # PLeaS' reference: the original models' features
          xin = lstsq.assemble(ins_a[l], ins_b[l], part(layer.reads))
        if conv:
          xin = lstsq.patches(xin, kh, kw, info.stride)
        if bias:
          xin = jnp.concatenate([xin, jnp.ones((xin.shape[0], 1), xin.dtype)], 1)
        y = (jnp.concatenate([za[l], zb[l]], -1) if is_head
             else lstsq.assemble(za[l], zb[l], part(layer.writes)))
        y = y.reshape(-1, y.shape[-1])
        xin, y = np.asarray(xin, np.float64), np.asarray(y, np.float64)
        # Every `_HOLDOUT`-th example (counted across batches) is held out,
        # with all its positions.
        n_ex = np.shape(x)[0]
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
      blocks = lstsq.out_blocks(parts, None if is_head else groups_k[layer.writes],
                                is_head, ka.shape[-1], kb.shape[-1])
      in_blocks = lstsq.index_blocks(parts, gi,
                                     ka.shape[-2], kh * kw)
      if fit == 'closed_form':
        solve = lambda st, r: lstsq.solve_blocks(st, blocks, in_blocks, r, w0, bias)
      else:
        solve = lambda st, r: lstsq.fit_gradient(st, blocks, in_blocks, r, w0,
                                                 w_avg, fit_steps, fit_lr, bias)
      lam = grid[0]
      if len(grid) > 1:  # choose the ridge on the held-out rows, refit on all
        # The held-out squared error (up to constants): the objective unridged.
        errs = [lstsq.objective(solve(fit_st, r), val, blocks, in_blocks, 0.0,
                                bias=bias) for r in grid]
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
    new = {'kernel': jnp.asarray(kernel, jnp.float32)}
    if bias:
      new['bias'] = jnp.asarray(w[n_w], jnp.float32)
    _set(out, layer.path, new)
    if layer.norm is not None:
      na_, nb_ = _get(pa, layer.norm), _get(pb, layer.norm)
      _set(out, layer.norm, {k: jnp.asarray(lstsq.assemble(
          np.asarray(na_[k], np.float64)[None], np.asarray(nb_[k], np.float64)[None],
          part(layer.writes))[0], jnp.float32) for k in na_})
      if norm_kind == 'batch':
        st = _batch_stats(run_jit, out, stats_out, batches, l)
        if bn_stats == 'keep_separate':  # [recomputed m | A's s | B's s]
          m = len(part(layer.writes)[0])
          st = {k: jnp.concatenate([v[:m], jnp.asarray(lstsq.assemble(
              np.asarray(_get(sa, layer.norm)[k])[None],
              np.asarray(_get(sb, layer.norm)[k])[None], part(layer.writes))[0, m:],
              jnp.float32)]) for k, v in st.items()}
        _set(stats_out, layer.norm, st)
  extra = {}
  if arch == 'resnet':
    extra = dict(features=widths[:num_ratios], stage_sizes=stage_sizes)
  elif arch == 'cnn':
    num_convs = sum(i.kind == 'conv' for i in infos)
    extra = dict(features=widths[:num_convs], dense=widths[num_convs:])
  elif arch == 'mlp':
    extra = dict(dense=widths)
  return PleasResult(out, widths, group_ratios, merged_size, tuple(chosen) or None,
                     batch_stats=stats_out, norm=norm_kind, network=network,
                     arch=arch, **extra)


def _merge_costs(features, va, vb, batches, network):
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
  groups = network.groups
  sq, rows = [0.0] * len(groups), [0] * len(groups)
  step = jax.jit(lambda x: (features(va, x), features(vb, x)))
  for x in batches:
    fa, fb = step(x)
    for k, g in enumerate(groups):
      for ha, hb in zip(evaluate.as_list(fa[g]), evaluate.as_list(fb[g])):
        d = np.asarray(ha, np.float64) - np.asarray(hb, np.float64)
        d = d.reshape(-1, d.shape[-1])
        sq[k] = sq[k] + np.sum(d * d, axis=0)
        rows[k] += d.shape[0]
  use = [0.0] * len(groups)
  for layer in network.layers:
    if layer.reads is not None:
      k = groups.index(layer.reads)
      for v in (va, vb):
        w = lstsq.rows_first(np.asarray(_get(v['params'], layer.path)['kernel'],
                                        np.float64))
        use[k] = use[k] + np.sum((w * w).reshape(len(sq[k]), -1), axis=1)
  return [s / max(r, 1) * u / 4 for s, r, u in zip(sq, rows, use)]


def _batch_stats(run, out, stats_out, batches, l):
  """Exact mean / variance of merged layer l's output (before its norm) over all rows."""
  s = ss = 0.0
  n = 0
  for x in batches:
    z = np.asarray(run(networks.variables(out, stats_out), x)[1][l], np.float64)
    z = z.reshape(-1, z.shape[-1])
    s, ss, n = s + z.sum(0), ss + (z * z).sum(0), n + z.shape[0]
  mean = s / n
  return {'mean': jnp.asarray(mean, jnp.float32),
          'var': jnp.asarray(np.maximum(ss / n - mean ** 2, 0.0), jnp.float32)}
