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
  batches, sources, grid = _check_options(
      batches, inputs=inputs, bn_stats=bn_stats, fit=fit, measure=measure,
      criterion=criterion, ratios=ratios, size=size, batch_tasks=batch_tasks,
      ridge_to=ridge_to, ridge=ridge, fit_steps=fit_steps)
  pa, sa = networks.split_variables(params_a)
  pb, sb = networks.split_variables(params_b)
  if network is None:
    network, arch, stage_sizes = networks.infer_network(
        pa, num_hidden, norm, sa is not None)
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
  _check_pair(pa, pb, sa, sb, network.layers[-1].path)
  va, vb = networks.variables(pa, sa), networks.variables(pb, sb)
  infos, norm_kind = networks.describe(network, va, batches[0])
  if norm_kind == 'batch' and sa is None:
    raise ValueError('pleas: the network has BatchNorm: pass '
                     "{'params': …, 'batch_stats': …} for both models.")
  if ratios is not None and (len(ratios) != network.num_ratios or
                             not all(0.0 <= r <= 1.0 for r in ratios)):
    n = network.num_ratios
    what = (f'{n} stages' if arch == 'resnet' else
            f'{n} free ratios (network.ratio_of)' if network.ratio_of
            else f'{n} hidden groups {network.groups}')
    raise ValueError(f'pleas: ratios must give a value in [0, 1] for each of the '
                     f'{what}, got {ratios!r}.')

  # 1. Matching: B's units permuted onto A's; a score per unit pair.
  run = networks.capture(network)
  vb, sims = _match(network, run, va, vb, batches, align, criterion)
  # 2. Partial permutation: which units stay separate, and the widths.
  plan = _partition(network, sims, _layer_dims(network, pa, infos), ratios, size,
                    measure)
  # 3. Least squares, layer by layer in the forward order: layer l reads
  #    only what layers < l wrote, so the merged model built so far gives
  #    its inputs.
  ctx = _Context(network, jax.jit(run), va, vb, batches, sources, plan)
  heads = [int(np.shape(_get(v['params'], network.layers[-1].path)['kernel'])[-1])
           for v in (va, vb)]
  out, stats_out = _template(network, pa, sa, plan.widths, sum(heads))
  chosen = []
  for l, info in enumerate(infos):
    layer = network.layers[l]
    if least_squares:
      w, lam = _fit_layer(ctx, l, info, networks.variables(out, stats_out),
                          inputs=inputs, grid=grid, ridge_to=ridge_to, fit=fit,
                          fit_steps=fit_steps, fit_lr=fit_lr)
      chosen.append(lam)
    else:
      w = _averaged(ctx, l)[1]
    _set(out, layer.path, _unflatten(ctx, l, info, w))
    if layer.norm is not None:
      _set(out, layer.norm, _assemble_leaves(ctx, l, 'params'))
      if norm_kind == 'batch':
        st = _batch_stats(ctx.run, out, stats_out, batches, l)
        if bn_stats == 'keep_separate':  # [recomputed m | A's s | B's s]
          m = len(ctx.part(layer.writes)[0])
          own = _assemble_leaves(ctx, l, 'batch_stats')
          st = {k: jnp.concatenate([v[:m], own[k][m:]]) for k, v in st.items()}
        _set(stats_out, layer.norm, st)
  extra = {}
  if arch == 'resnet':
    extra = dict(features=plan.widths[:network.num_ratios], stage_sizes=stage_sizes)
  elif arch == 'cnn':
    num_convs = sum(i.kind == 'conv' for i in infos)
    extra = dict(features=plan.widths[:num_convs], dense=plan.widths[num_convs:])
  elif arch == 'mlp':
    extra = dict(dense=plan.widths)
  return PleasResult(out, plan.widths, plan.ratios, plan.size,
                     tuple(chosen) or None, batch_stats=stats_out, norm=norm_kind,
                     network=network, arch=arch, **extra)


def _check_options(batches, *, inputs, bn_stats, fit, measure, criterion, ratios,
                   size, batch_tasks, ridge_to, ridge, fit_steps):
  """Clear errors for bad options; returns ``(batches, sources, ridge grid)``."""
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
  if fit == 'gradient' and int(fit_steps) < 1:
    raise ValueError(f"fit='gradient' needs fit_steps >= 1, got {fit_steps}.")
  return batches, sources, tuple(float(r) for r in grid)


def _match(network, run, va, vb, batches, align, criterion):
  """B's variables permuted onto A's, and per group a score per matched unit.

  Scores are higher for units better merged: the matched correlation
  (``'correlation'``), or ``1 - cost / max cost`` of the first-order merge
  cost (``'sensitivity'``, one scale across groups).
  """
  features = lambda v, x: run(v, x)[2]
  perms, corr = evaluate.activation_matching(features, va, vb, batches,
                                             return_costs=True)
  if not align:
    perms = {g: jnp.arange(p.shape[0], dtype=jnp.int32) for g, p in perms.items()}
  has_stats = 'batch_stats' in vb
  spec = networks.network_spec(network, vb['params'], batch_stats=has_stats)
  vb = (apply_permutation(spec, perms, vb) if has_stats else
        networks.variables(apply_permutation(spec, perms, vb['params'])))
  if criterion == 'correlation':
    return vb, [np.asarray(corr[g])[np.arange(len(perms[g])), np.asarray(perms[g])]
                for g in network.groups]
  cost = _merge_costs(features, va, vb, batches, network)
  top = max(float(np.max(c)) for c in cost) or 1.0
  return vb, [1.0 - c / top for c in cost]


class _Plan(NamedTuple):
  """Per group its ``(merged, separate)`` units; the widths, ratios and size."""
  parts: tuple[tuple[np.ndarray, np.ndarray], ...]
  widths: tuple[int, ...]
  ratios: tuple[float, ...]
  size: float


def _partition(network, sims, dims, ratios, size, measure):
  """Ratios (given, or greedy for ``size``) and the units each group keeps separate."""
  groups_k = {g: k for k, g in enumerate(network.groups)}
  ratio_of = network.ratio_of or tuple(range(len(network.groups)))

  def size_of(free):
    r = [free[t] for t in ratio_of]
    return ratios_lib.layers_size(
        [(d, 0.0 if l.reads is None else r[groups_k[l.reads]],
          1.0 if l.writes is None else r[groups_k[l.writes]])
         for d, l in zip(dims, network.layers)], measure)

  if ratios is None:
    ratios = ratios_lib.greedy_ratios(
        _tied_sims(sims, ratio_of, network.num_ratios, network.groups), size_of,
        size)
  free = tuple(float(r) for r in ratios)
  group_ratios = tuple(free[t] for t in ratio_of)
  parts = []  # merged = the best-matched (1 - r) fraction, separate = the rest
  for k, sim in enumerate(sims):
    n = len(sim)
    n_sep = int(round(group_ratios[k] * n))
    order = np.argsort(-sim, kind='stable')
    parts.append((np.sort(order[:n - n_sep]), np.sort(order[n - n_sep:])))
  widths = tuple(len(m) + 2 * len(s) for m, s in parts)
  return _Plan(tuple(parts), widths, group_ratios, size_of(free))


class _Context(NamedTuple):
  """What every layer's solve reads: the models, the data, the partition."""
  network: networks.PleasNetwork
  run: Any                 # jitted capture: (variables, x) -> (ins, outs, feats)
  va: Any
  vb: Any                  # B permuted onto A
  batches: list[Any]
  sources: list[int | None]
  plan: _Plan

  def part(self, group):
    """The group's ``(merged, separate)`` units; None for the input / the head."""
    return None if group is None else self.plan.parts[self.network.groups.index(group)]

  def index(self, group):
    return -1 if group is None else self.network.groups.index(group)


def _averaged(ctx, l):
  """Layer l's permute-then-average blocks: ``(kernel, bias)`` and flattened."""
  layer = ctx.network.layers[l]
  da, db = (_get(v['params'], layer.path) for v in (ctx.va, ctx.vb))
  k, b = lstsq.average_blocks(lstsq.rows_first(da['kernel']),
                              lstsq.rows_first(db['kernel']), da.get('bias'),
                              db.get('bias'), ctx.part(layer.reads),
                              ctx.part(layer.writes))
  flat = np.concatenate([np.asarray(k, np.float64).reshape(-1, k.shape[-1])] +
                        ([np.asarray(b, np.float64)[None]] if b is not None else []),
                        0)
  return k.shape, flat


def _unflatten(ctx, l, info, w):
  """Layer l's params from the ``[inputs (+ bias), outputs]`` solution."""
  shape = _averaged(ctx, l)[0]
  n_w = int(np.prod(shape[:-1]))
  kernel = np.asarray(w[:n_w]).reshape(shape)
  if info.kind == 'conv':  # [C_in, kh, kw, C_out] -> Flax HWIO
    kernel = kernel.transpose(1, 2, 0, 3)
  new = {'kernel': jnp.asarray(kernel, jnp.float32)}
  if 'bias' in _get(ctx.va['params'], ctx.network.layers[l].path):
    new['bias'] = jnp.asarray(w[n_w], jnp.float32)
  return new


def _assemble_leaves(ctx, l, collection):
  """Layer l's norm leaves (params or running statistics), assembled by blocks."""
  layer = ctx.network.layers[l]
  la, lb = (_get(v[collection], layer.norm) for v in (ctx.va, ctx.vb))
  return {k: jnp.asarray(lstsq.assemble(
      np.asarray(la[k], np.float64)[None], np.asarray(lb[k], np.float64)[None],
      ctx.part(layer.writes))[0], jnp.float32) for k in la}


def _layer_grams(ctx, l, info, merged, inputs, holdout):
  """Layer l's Gram statistics ``(X^T X, X^T Y)`` per data source.

  Returns ``(fitting, held_out)``; with ``holdout``, every `_HOLDOUT`-th
  example (counted across batches, with all its positions) is held out.
  """
  layer = ctx.network.layers[l]
  bias = 'bias' in _get(ctx.va['params'], layer.path)
  fit_st, val = {}, {}
  offset = 0
  for x, src in zip(ctx.batches, ctx.sources):
    ins_a, za, _ = ctx.run(ctx.va, x)
    ins_b, zb, _ = ctx.run(ctx.vb, x)
    if layer.reads is None:
      xin = ins_a[l]
    elif inputs == 'merged':  # what merged layer l will actually read
      xin = ctx.run(merged, x)[0][l]
    else:  # PLeaS' reference: the original models' features
      xin = lstsq.assemble(ins_a[l], ins_b[l], ctx.part(layer.reads))
    if info.kind == 'conv':
      xin = lstsq.patches(xin, *info.kernel, info.stride)
    if bias:
      xin = jnp.concatenate([xin, jnp.ones((xin.shape[0], 1), xin.dtype)], 1)
    y = (jnp.concatenate([za[l], zb[l]], -1) if layer.writes is None
         else lstsq.assemble(za[l], zb[l], ctx.part(layer.writes)))
    y = y.reshape(-1, y.shape[-1])
    xin, y = np.asarray(xin, np.float64), np.asarray(y, np.float64)
    n_ex = np.shape(x)[0]
    held = np.repeat((offset + np.arange(n_ex)) % _HOLDOUT == 0,
                     xin.shape[0] // n_ex) & holdout
    offset += n_ex
    for acc, rows in ((fit_st, ~held), (val, held)):
      st = (xin[rows].T @ xin[rows], xin[rows].T @ y[rows])
      acc[src] = st if src not in acc else (acc[src][0] + st[0],
                                            acc[src][1] + st[1])
  return fit_st, val


def _fit_layer(ctx, l, info, merged, *, inputs, grid, ridge_to, fit, fit_steps,
               fit_lr):
  """Layer l's least-squares weights ``[inputs (+ bias), outputs]`` and its ridge."""
  layer = ctx.network.layers[l]
  ka = _get(ctx.va['params'], layer.path)['kernel']
  kb = _get(ctx.vb['params'], layer.path)['kernel']
  bias = 'bias' in _get(ctx.va['params'], layer.path)
  fit_st, val = _layer_grams(ctx, l, info, merged, inputs, len(grid) > 1)
  w_avg = _averaged(ctx, l)[1]
  w0 = w_avg if ridge_to == 'average' else None
  is_head = layer.writes is None
  blocks = lstsq.out_blocks(ctx.plan.parts, ctx.index(layer.writes), is_head,
                            ka.shape[-1], kb.shape[-1])
  in_blocks = lstsq.index_blocks(ctx.plan.parts, ctx.index(layer.reads),
                                 ka.shape[-2], info.kernel[0] * info.kernel[1])
  if fit == 'closed_form':
    solve = lambda st, r: lstsq.solve_blocks(st, blocks, in_blocks, r, w0, bias)
  else:
    solve = lambda st, r: lstsq.fit_gradient(st, blocks, in_blocks, r, w0, w_avg,
                                             fit_steps, fit_lr, bias)
  lam = grid[0]
  if len(grid) > 1:  # choose the ridge on the held-out rows, refit on all
    # The held-out squared error (up to constants): the objective unridged.
    errs = [lstsq.objective(solve(fit_st, r), val, blocks, in_blocks, 0.0,
                            bias=bias) for r in grid]
    lam = grid[int(np.argmin(errs))]
    for src, (g, h) in val.items():
      f = fit_st.get(src)
      fit_st[src] = (g, h) if f is None else (f[0] + g, f[1] + h)
  return solve(fit_st, lam), lam


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
