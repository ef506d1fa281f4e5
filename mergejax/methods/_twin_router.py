"""Twin-Merging at inference: a task router and per-input mixing.

Twin-Merging (Lu et al. 2024) keeps a shared model ``theta*`` and compressed
exclusive parts ``v_t`` (`methods.twin`). At inference a router maps each
input's features to weights ``w(x) = softmax(router(f(x)))`` over the K tasks
and the model runs with ``theta(x) = theta* + sum_t w_t(x) v_t``.

* `twin_train_router`: the router, trained with optax (AdamW, cross-entropy on
  task ids) on a few labelled examples per task. The reference uses an MLP on
  the shared model's mean-pooled last hidden state (``Linear(d, 2d) -> BN ->
  LeakyReLU -> Dropout -> Linear(2d, 2d) -> ... -> Linear(2d, K)``); here the
  features are standardised with the training statistics (the inference-time
  effect of batch norm), ``hidden`` sets the MLP widths (``()``: a linear
  router) and there is no dropout.
* `twin_route`: router weights for a batch of features.
* `twin_apply`: runs any model per input with its own mixed parameters
  (``jax.lax.map`` over chunks of ``batch_size`` inputs, vmapped inside): one
  mixed model per input in flight, never K.
* `twin_dense`: a dense layer with the per-input mix fused into the matmul,
  ``x @ (K* + sum_t w_t V_t) = x @ K* + sum_t w_t ((x @ U_t) s_t) @ V_t^T``:
  ``O((m + n) K r)`` per input with factorised exclusive parts instead of
  ``O(m n K r)`` for materialising the mixed kernel.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import optim

from mergejax.methods import _common as common
from mergejax.methods import _twin as twin_lib
from mergejax.transforms import _subspace as subspace


class Router(NamedTuple):
  """An MLP router on standardised features: ``logits = mlp((f - mean) / std)``."""
  mean: jax.Array  # [d]
  std: jax.Array  # [d]
  layers: tuple[tuple[jax.Array, jax.Array], ...]  # ((w [in, out], b [out]), ...)


def _init(key, sizes):
  layers = []
  for k, (i, o) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    layers.append((jax.random.normal(k, (i, o), jnp.float32) / np.sqrt(i),
                   jnp.zeros((o,), jnp.float32)))
  return tuple(layers)


def router_logits(router: Router, features: jax.Array) -> jax.Array:
  """``[N, d] -> [N, K]`` router logits."""
  h = (features.astype(jnp.float32) - router.mean[None]) / router.std[None]
  for j, (w, b) in enumerate(router.layers):
    h = h @ w + b[None]
    if j < len(router.layers) - 1:
      h = jax.nn.leaky_relu(h)
  return h


def twin_train_router(features: jax.Array, task_ids: jax.Array,
                      num_tasks: int, *, key: jax.Array,
                      hidden: Sequence[int] = (), steps: int = 300,
                      learning_rate: float = 1e-2,
                      weight_decay: float = 1e-4) -> Router:
  """Trains a task router with optax (full-batch AdamW, cross-entropy).

  Args:
    features: ``[N, d]`` features of the labelled inputs (e.g. the shared
      model's last hidden state, mean-pooled over tokens).
    task_ids: ``[N]`` int task index of each input, in ``[0, num_tasks)``.
    num_tasks: K.
    key: PRNG key for the initialisation.
    hidden: hidden widths of the MLP (``()``: linear; the reference uses
      ``(2 d, 2 d)``).
    steps: optimisation steps (static).
    learning_rate: AdamW learning rate.
    weight_decay: AdamW weight decay.

  Returns:
    The trained `Router`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> f = jnp.array([[1., 0.], [0.9, 0.1], [0., 1.], [0.1, 0.8]])
    >>> r = mj.methods.twin_train_router(f, jnp.array([0, 0, 1, 1]), 2,
    ...                                  key=jax.random.key(0), steps=50)
    >>> mj.methods.twin_route(r, f).argmax(-1)
    Array([0, 0, 1, 1], dtype=int32)

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  features = jnp.asarray(features, jnp.float32)
  task_ids = jnp.asarray(task_ids)
  if features.ndim != 2:
    raise ValueError(f'twin_train_router: features must be [N, d], got shape '
                     f'{features.shape}.')
  if task_ids.shape != features.shape[:1] or not jnp.issubdtype(
      task_ids.dtype, jnp.integer):
    raise ValueError(
        f'twin_train_router: task_ids must be an int array of shape '
        f'({features.shape[0]},) (one task index per feature row), got '
        f'{task_ids.dtype} {task_ids.shape}.')
  if num_tasks < 2:
    raise ValueError(f'twin_train_router: num_tasks must be >= 2, got '
                     f'{num_tasks}.')
  ids = np.asarray(task_ids)
  if ids.min() < 0 or ids.max() >= num_tasks:
    raise ValueError(f'twin_train_router: task_ids must lie in [0, '
                     f'{num_tasks}), got values in [{ids.min()}, {ids.max()}].')
  mean = jnp.mean(features, axis=0)
  std = jnp.std(features, axis=0) + 1e-6
  sizes = (features.shape[1],) + tuple(int(h) for h in hidden) + (num_tasks,)
  router = Router(mean, std, _init(key, sizes))
  return _fit(router, features, task_ids.astype(jnp.int32), steps,
              float(learning_rate), float(weight_decay))


def _fit(router, x, y, steps, lr, wd):
  opt = optax.adamw(lr, weight_decay=wd)

  def loss(layers):
    logits = router_logits(router._replace(layers=layers), x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  @jax.jit
  def run(layers):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      return optim.optax_step(opt, g, s, p), None
    (layers, _), _ = jax.lax.scan(step, (layers, opt.init(layers)), None,
                                  length=steps)
    return layers

  return router._replace(layers=run(router.layers))


def twin_route(router: Router, features: jax.Array,
               temperature: float | jax.Array = 1.0) -> jax.Array:
  """Router weights ``softmax(logits / temperature)``: ``[N, d] -> [N, K]``.

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  return jax.nn.softmax(router_logits(router, features) / temperature, axis=-1)


def _twin_state(state):
  s = common.find_state(state)
  if not isinstance(s, twin_lib.TwinState):
    raise ValueError('This needs the state of a twin(...) merge: '
                     'merge(mj.methods.twin(), base, models, return_state=True).')
  return s


def twin_apply(apply_fn: Callable[[Any, jax.Array], jax.Array], state: Any,
               weights: jax.Array, inputs: jax.Array, *,
               batch_size: int = 32) -> jax.Array:
  """Runs ``apply_fn(theta(x_b), x_b)`` for every input with its own mix.

  ``theta(x_b) = theta* + sum_t weights[b, t] v_t`` (`twin_mix`), evaluated
  in chunks of ``batch_size`` inputs (``jax.lax.map``, vmapped inside a
  chunk), so at most ``batch_size`` mixed models exist at a time and never K
  per input. For dense layers `twin_dense` avoids the mixed kernels entirely.

  Args:
    apply_fn: ``(params, x) -> y`` for ONE input ``x`` (add a batch axis of 1
      inside if the model expects batches).
    state: the state from ``merge(twin(...), ..., return_state=True)``.
    weights: ``[B, K]`` router weights.
    inputs: ``[B, ...]`` inputs (any pytree with leading axis B).
    batch_size: inputs per vmapped chunk (static).

  Returns:
    ``[B, ...]`` outputs.

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  s = _twin_state(state)
  weights = jnp.asarray(weights, jnp.float32)
  k = s.num_tasks
  b = jax.tree.leaves(inputs)[0].shape[0]
  if weights.shape != (b, k):
    raise ValueError(f'twin_apply: weights must have shape ({b}, {k}) (one '
                     f'row of K={k} task weights per input), got '
                     f'{weights.shape}.')

  def one(wx):
    w, x = wx
    return apply_fn(twin_lib.twin_mix(s, w), x)
  return jax.lax.map(one, (weights, inputs), batch_size=batch_size)


def twin_dense(x: jax.Array, weights: jax.Array, state: Any, path: str, *,
               kernel: str = 'kernel', bias: str | None = 'bias') -> jax.Array:
  """A dense layer of the per-input Twin mix, fused into the matmul.

  ``y_b = x_b @ (K* + sum_t w_bt V_t) + (b* + sum_t w_bt c_t)`` computed as
  ``x @ K* + sum_t w_t ((x @ U_t) * s_t) @ V_t^T`` when the exclusive kernel
  is factorised (`SVDBasis`), so neither the K task kernels nor a mixed
  kernel per input is formed.

  Args:
    x: ``[B, m]`` inputs of the layer.
    weights: ``[B, K]`` router weights.
    state: the twin merge state.
    path: ``'/'``-separated path of the layer's params in the model tree
      (e.g. ``'Dense_0'``).
    kernel: name of the ``[m, n]`` kernel leaf under ``path``.
    bias: name of the bias leaf, or None.

  Returns:
    ``[B, n]`` float32.

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
      Merging", NeurIPS 2024.
      https://arxiv.org/abs/2406.15479
  """
  s = _twin_state(state)
  layer, twins = (common.subtree(s.shared_model, path),
                  common.subtree(s.twins, path))
  k_star, v = layer[kernel], twins[kernel]
  x = x.astype(jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if x.ndim != 2 or k_star.ndim != 2 or x.shape[1] != k_star.shape[0]:
    raise ValueError(f'twin_dense: x must be [B, {k_star.shape[0]}] for the '
                     f'{k_star.shape} kernel at {path!r}/{kernel}, got '
                     f'{x.shape}.')
  y = x @ k_star
  if isinstance(v, subspace.SVDBasis):
    z = jnp.einsum('bm,kmr->bkr', x, v.u) * v.s[None] * weights[:, :, None]
    y = y + jnp.einsum('bkr,krn->bn', z, v.vh)
  else:
    y = y + jnp.einsum('bm,kmn,bk->bn', x, v, weights)
  if bias is not None:
    y = y + layer[bias][None] + weights @ twins[bias]  # [B, n]
  return y
