"""WEMoE: weight-ensembling mixture of experts over the dense layers.

Every routed dense layer ``W`` of the model becomes an input-dependent merge
``W(x) = W_0 + sum_i g_i(x) tau_i`` whose coefficients ``g(x)`` come from a
small router on the layer's own input; everything else is merged by task
arithmetic. The routers are trained on unlabeled inputs by minimising the
entropy of the predictions (`fit_wemoe`).

* `wemoe_init`: the state -- merged params, the routed layers' stacked task
  vectors (dense, or pruned to their largest entries, E-WEMoE) and the
  routers.
* `wemoe_gates` / `wemoe_dense`: one router and one routed layer, as pure
  functions: ``x @ W_0 + b_0 + sum_i g_i(x) (x @ tau_i + beta_i)``, so no
  merged kernel is ever formed per input.
* `wemoe_apply`: runs a Flax linen model with its routed ``nn.Dense`` layers
  replaced (``flax.linen.intercept_methods``); a pure function of the state,
  so it jit-compiles, differentiates and vmaps.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import base as base_lib
from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax._src import paths as paths_lib
from mergejax.methods import _common as common
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _select as select


class PrunedTaskVectors(NamedTuple):
  """The largest entries of K task-vector kernels ``[K, m, n]``.

  ``index`` holds flat positions ``row * n + col`` (int32) and ``values``
  their values, ``[K, nnz]`` each: 8 bytes per kept entry instead of 4 per
  entry of the dense kernels.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  index: jax.Array
  values: jax.Array


class WEMoERouter(NamedTuple):
  """``g(x) = relu(x @ w1 + b1) @ w2 + b2``: raw merging coefficients ``[K]``.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  w1: jax.Array  # [m, h]
  b1: jax.Array  # [h]
  w2: jax.Array  # [h, K]
  b2: jax.Array  # [K]


class WEMoEState(NamedTuple):
  """What the routed forward needs.

  Attributes:
    params: the model's params: routed layers at the pre-trained values,
      every other leaf merged by task arithmetic.
    task_vectors: ``{layer path: {'kernel': [K, m, n] or
      PrunedTaskVectors, 'bias': [K, n]}}`` for the routed layers.
    routers: ``{layer path: WEMoERouter}``.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  params: Any
  task_vectors: dict[str, dict[str, Any]]
  routers: dict[str, WEMoERouter]


def _under(leaf_path: str, layer: str) -> bool:
  return not layer or leaf_path.startswith(layer + '/')


def _dense_layers(tree, prefix=()):
  """Paths of the sub-dicts holding a 2-D ``kernel`` and a 1-D ``bias``."""
  out = []
  if isinstance(tree, dict):
    k, b = tree.get('kernel'), tree.get('bias')
    if (k is not None and b is not None and getattr(k, 'ndim', 0) == 2
        and getattr(b, 'ndim', 0) == 1):
      out.append('/'.join(prefix))
    for name, sub in tree.items():
      if isinstance(sub, dict):
        out += _dense_layers(sub, prefix + (name,))
  return out


def _prune(tv: jax.Array, keep: int) -> PrunedTaskVectors:
  flat = tv.reshape(tv.shape[0], -1)
  # The largest magnitudes, exactly `keep` per task, ties to the lowest
  # position: the library's radix select (a sort-based top_k is far slower on
  # CPU), then the kept positions in order.
  (mask,) = select.batched_topk_masks([flat], jnp.full(flat.shape[0], keep))
  index = jax.vmap(lambda m: jnp.nonzero(m, size=keep)[0])(mask).astype(
      jnp.int32)
  return PrunedTaskVectors(index, jnp.take_along_axis(flat, index, axis=-1))


def wemoe_init(base_params: Any, models: Sequence[Any], *, key: jax.Array,
               routed: Sequence[str] | None = None,
               lambda_: float | jax.Array = 0.3, init_lambda: float = 0.3,
               hidden: int | None = None, prune: float = 0.0,
               dtype: Any = jnp.float32) -> WEMoEState:
  """Builds the WEMoE state: task-arithmetic params, routed task vectors, routers.

  Args:
    base_params: the pre-trained params (a nested dict, e.g. Flax linen's).
    models: the K fine-tuned models, same structure.
    key: PRNG key for the routers' initialisation.
    routed: ``'/'``-separated paths of the dense layers to route (sub-dicts
      with a 2-D ``kernel`` ``[m, n]`` and a ``bias`` ``[n]``, Flax
      orientation); None routes every such layer. WEMoE routes the MLP of
      every transformer block.
    lambda_: task-arithmetic scale of the other leaves (FusionBench: 0.3).
    init_lambda: initial merging coefficient of every task (the routers'
      last bias; FusionBench: 0.3, so training starts at task arithmetic).
    hidden: the routers' hidden width (None: the layer's input width, as
      FusionBench's ``Linear(h, h) -> ReLU -> Linear(h, K)``).
    prune: fraction of each task vector kernel's entries dropped by
      magnitude (E-WEMoE's ``tv_prune_ratio``, e.g. 0.9); 0 keeps them
      dense. Pruning bounds the routed layers' memory at
      ``8 (1 - prune)`` bytes per entry and task instead of 4 (fp32).
    dtype: dtype of the stored task vectors and routers.

  Returns:
    A `WEMoEState`; run it with `wemoe_apply`, train it with `fit_wemoe`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> base = {'d': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)}}
    >>> fts = [jax.tree.map(lambda x, i=i: x + i, base) for i in (1., 2.)]
    >>> s = mj.methods.wemoe_init(base, fts, key=jax.random.key(0))
    >>> s.task_vectors['d']['kernel'].shape, s.routers['d'].w2.shape
    ((2, 3, 2), (3, 2))

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  models = list(models)
  checks.check_models(base_params, models)
  k = len(models)
  if not 0.0 <= float(prune) < 1.0:
    raise ValueError(f'wemoe_init: prune must be in [0, 1) (the fraction of '
                     f'task-vector entries dropped), got {prune}.')
  layers = _dense_layers(base_params)
  routed = list(layers if routed is None else routed)
  missing = [p for p in routed if p not in layers]
  if missing:
    raise ValueError(
        f'wemoe_init: routed names {missing}, which are not dense layers '
        f'(a sub-dict with a 2-D kernel and a 1-D bias) of the params; the '
        f'dense layers are {layers}.')
  if not routed:
    raise ValueError('wemoe_init: no dense layer to route (the params have '
                     'no sub-dict with a 2-D kernel and a 1-D bias).')
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  taus = [jax.tree.map(lambda a, b: f32(a) - f32(b), m, base_params)
          for m in models]
  # Task arithmetic, composed from its building blocks.
  ta = base_lib.chain(reduce.task_vectors(), reduce.weighted_sum(None),
                      reduce.scale(lambda_), reduce.apply_to_base())
  merged = merge_lib.merge(ta, base_params, models)
  task_vectors, routers = {}, {}
  for path, rk in zip(routed, jax.random.split(key, len(routed))):
    layer_taus = [common.subtree(t, path) for t in taus]
    kern = jnp.stack([t['kernel'] for t in layer_taus]).astype(dtype)
    bias = jnp.stack([t['bias'] for t in layer_taus]).astype(dtype)
    if prune > 0:
      keep = max(1, int(round((1.0 - float(prune)) * kern[0].size)))
      kern = _prune(kern, keep)
    task_vectors[path] = {'kernel': kern, 'bias': bias}
    m = common.subtree(base_params, path)['kernel'].shape[0]
    h = m if hidden is None else int(hidden)
    k1, k2 = jax.random.split(rk)
    routers[path] = WEMoERouter(
        0.01 * jax.random.normal(k1, (m, h), dtype), jnp.zeros((h,), dtype),
        0.01 * jax.random.normal(k2, (h, k), dtype),
        jnp.full((k,), init_lambda, dtype))
  # The routed layers run at theta_0 plus their routed deltas.
  params = paths_lib.tree_map_with_path(
      lambda p, m, b: b if any(_under(p, r) for r in routed) else m,
      merged, base_params)
  return WEMoEState(params, task_vectors, routers)


def wemoe_gates(router: WEMoERouter, x: jax.Array, *, batch_reduce: bool = False,
                top_k: int | None = None) -> jax.Array:
  """The merging coefficients ``[B, K]`` of one routed layer for inputs ``x``.

  ``x`` is ``[B, m]`` or ``[B, ..., m]``; the router sees the mean over the
  middle (token) axes, as WEMoE averages its gates over tokens.

  Args:
    router: the layer's `WEMoERouter`.
    x: the layer's inputs.
    batch_reduce: average the coefficients over the batch too (one merged
      layer per batch, FusionBench's ``batch_reduce``).
    top_k: keep only the ``top_k`` largest coefficients per input and zero
      the others (static; None keeps all).

  Returns:
    ``[B, K]`` float32 coefficients (not normalised: WEMoE uses the router's
    outputs as task-arithmetic coefficients).

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim > 2:
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
  r = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), router)
  g = jax.nn.relu(x @ r.w1 + r.b1[None]) @ r.w2 + r.b2[None]
  if batch_reduce:
    g = jnp.broadcast_to(jnp.mean(g, axis=0, keepdims=True), g.shape)
  if top_k is not None:
    k = checks.static_int(top_k, 'top_k', owner='wemoe_gates', low=1)
    if k < g.shape[-1]:
      kth = jax.lax.top_k(g, k)[0][..., -1:]
      g = jnp.where(g >= kth, g, 0.0)
  return g


def wemoe_dense(x: jax.Array, gates: jax.Array, kernel: jax.Array,
                bias: jax.Array, task_vectors: dict[str, Any]) -> jax.Array:
  """One routed dense layer: ``x @ W_0 + b_0 + sum_i g_i (x @ tau_i + beta_i)``.

  The per-input merge is fused into the matmuls, so the cost is K small
  matmuls per layer and no kernel ``[B, m, n]`` of per-input merged weights
  is ever formed; pruned task vectors (`PrunedTaskVectors`) are stored
  compactly and densified one task at a time during the layer's call.

  Args:
    x: ``[B, ..., m]`` inputs.
    gates: ``[B, K]`` coefficients (`wemoe_gates`).
    kernel: ``[m, n]`` pre-trained kernel.
    bias: ``[n]`` pre-trained bias.
    task_vectors: ``{'kernel': [K, m, n] or PrunedTaskVectors,
      'bias': [K, n]}``.

  Returns:
    ``[B, ..., n]`` in the dtype of ``x`` (computed in float32).

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  out_dtype = x.dtype
  x = x.astype(jnp.float32)
  gates = gates.astype(jnp.float32)
  m, n = kernel.shape
  if x.shape[-1] != m:
    raise ValueError(f'wemoe_dense: x must end in the kernel\'s input width '
                     f'{m} (kernel {kernel.shape}), got {x.shape}.')
  lead = x.shape[1:-1]
  g = gates.reshape(gates.shape[:1] + (1,) * len(lead) + gates.shape[1:])
  y = x @ kernel.astype(jnp.float32)
  y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (n,))
  tv = task_vectors['kernel']
  if isinstance(tv, PrunedTaskVectors):
    # One task at a time: its kept entries scattered into one dense [m, n]
    # kernel (a scatter of nnz entries per call rather than B * nnz per
    # input), so the layer's temporary memory is one kernel, not K.
    def one_task(acc, task):
      index, values, gk = task
      dense = jnp.zeros((m * n,), jnp.float32).at[index].set(
          values.astype(jnp.float32)).reshape(m, n)
      return acc + (x @ dense) * gk[..., None], None
    y, _ = jax.lax.scan(one_task, y, (tv.index, tv.values,
                                      jnp.moveaxis(g, -1, 0)))
  else:
    y = y + jnp.einsum('...m,kmn,...k->...n', x, tv.astype(jnp.float32), g)
  y = y + jnp.einsum('...k,kn->...n', g, task_vectors['bias'].astype(
      jnp.float32))
  return y.astype(out_dtype)


def wemoe_apply(module: nn.Module, state: WEMoEState, *args: Any,
                batch_reduce: bool = False, top_k: int | None = None,
                method: Any = None, **kwargs: Any) -> Any:
  """Runs a Flax linen ``module`` with its routed dense layers as WEMoE layers.

  Every ``nn.Dense`` call whose module path is a routed layer of ``state``
  computes `wemoe_gates` on its own input and returns `wemoe_dense`; all
  other calls run unchanged on ``state.params``. The function is pure in
  ``state``, so ``jax.jit``, ``jax.grad`` (for router training) and
  ``jax.vmap`` apply.

  Args:
    module: the Flax linen model whose params ``state`` was built from.
    state: the `WEMoEState`.
    *args: the model's inputs (batch first).
    batch_reduce: one merged layer per batch (see `wemoe_gates`).
    top_k: keep the ``top_k`` largest coefficients per input.
    method: passed to ``module.apply``.
    **kwargs: passed to ``module.apply``.

  Returns:
    The model's outputs.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, mergejax as mj
    >>> net = nn.Dense(2)
    >>> base = net.init(jax.random.key(0), jnp.zeros((1, 3)))['params']
    >>> fts = [jax.tree.map(lambda x, i=i: x + i, base) for i in (1., 2.)]
    >>> s = mj.methods.wemoe_init(base, fts, key=jax.random.key(1),
    ...                           routed=[''])
    >>> mj.methods.wemoe_apply(net, s, jnp.ones((4, 3))).shape
    (4, 2)

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  routed = state.routers

  def interceptor(next_fun, a, kw, context):
    mod = context.module
    path = '/'.join(mod.path)
    if (context.method_name != '__call__' or not isinstance(mod, nn.Dense)
        or path not in routed):
      return next_fun(*a, **kw)
    x = a[0]
    g = wemoe_gates(routed[path], x, batch_reduce=batch_reduce, top_k=top_k)
    p = mod.variables['params']
    return wemoe_dense(x, g, p['kernel'], p['bias'], state.task_vectors[path])

  with nn.intercept_methods(interceptor):
    return module.apply({'params': state.params}, *args, method=method,
                        **kwargs)


class WEMoEResult(NamedTuple):
  """The trained ``state`` and the ``losses`` per step.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  state: WEMoEState
  losses: np.ndarray


def fit_wemoe(loss_fn: Callable[[WEMoEState, Any], jax.Array],
              state: WEMoEState, batches: Sequence[Any], *, steps: int = 1000,
              learning_rate: float | jax.Array = 1e-4,
              optimizer: optax.GradientTransformation | None = None
              ) -> WEMoEResult:
  """Trains the routers by minimising ``loss_fn`` (WEMoE: prediction entropy).

  Only ``state.routers`` change; the task vectors and params stay fixed. The
  loop is one jit-compiled ``lax.scan`` over ``steps`` optax steps (Adam by
  default) with the batches cycled; ``learning_rate`` is traced, so a sweep
  compiles once.

  Args:
    loss_fn: ``loss_fn(state, batch) -> scalar``, e.g. the summed
      `prediction_entropy` of `wemoe_apply`'s outputs on unlabeled inputs.
    state: the initial `WEMoEState` (`wemoe_init`).
    batches: batches for ``loss_fn``, all of one shape.
    steps: optimisation steps (static; FusionBench: 1000).
    learning_rate: Adam's learning rate (FusionBench: 1e-4).
    optimizer: an optax optimizer instead of Adam.

  Returns:
    A `WEMoEResult`.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
      Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  steps = checks.static_int(steps, 'steps', owner='fit_wemoe', low=1)
  batches = list(batches)
  if not batches:
    raise ValueError('fit_wemoe: no batches given.')
  lr = checks.hparam(learning_rate, 'learning_rate', low=0.0,
                     low_inclusive=False)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  routers, values = _fit(state, stacked, lr, loss_fn=loss_fn,
                         num_batches=len(batches), steps=steps,
                         optimizer=optimizer)
  return WEMoEResult(state._replace(routers=routers), np.asarray(values))


# Module-level and keyed on the loss function, so a sweep over the (traced)
# learning rate reuses one executable.
@functools.partial(jax.jit, static_argnames=('loss_fn', 'num_batches',
                                             'steps', 'optimizer'))
def _fit(state, stacked, lr, *, loss_fn, num_batches, steps, optimizer):
  opt = optimizer or optax.adam(lr)

  def loss(routers, batch):
    return loss_fn(state._replace(routers=routers), batch)

  def step(carry, i):
    r, s = carry
    batch = jax.tree.map(lambda b: b[i % num_batches], stacked)
    value, g = jax.value_and_grad(loss)(r, batch)
    return optim.optax_step(opt, g, s, r), value

  (routers, _), values = jax.lax.scan(
      step, (state.routers, opt.init(state.routers)), jnp.arange(steps))
  return routers, values
