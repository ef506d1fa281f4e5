"""Representation surgery: per-task adapters that remove a merge's feature bias."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import optim


class SurgeryResult(NamedTuple):
  """Per-task adapters ``down [K, hidden, d]``, ``up [K, d, hidden]`` and losses.

  ``apply(features, task)`` corrects the merged model's ``[..., d]`` features
  for task ``task`` (an int, possibly traced).

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging",
      ICML 2024. https://arxiv.org/abs/2402.02705
  """
  down: jax.Array
  up: jax.Array
  losses: np.ndarray

  def apply(self, features: jax.Array, task: int | jax.Array) -> jax.Array:
    return surgery_apply(self.down[task], self.up[task], features)


def surgery_apply(down: jax.Array, up: jax.Array,
                  features: jax.Array) -> jax.Array:
  """``z - up relu(down z)``: one task's adapter on ``[..., d]`` features.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> z = jnp.ones((2, 3))
    >>> mj.methods.surgery_apply(jnp.ones((4, 3)), jnp.zeros((3, 4)), z)
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging",
      ICML 2024. https://arxiv.org/abs/2402.02705
  """
  z = jnp.asarray(features, jnp.float32)
  return z - jax.nn.relu(z @ down.T) @ up.T


def _l1(d: jax.Array) -> jax.Array:
  # mean |d| with derivative sign(d) (0 at 0, as PyTorch's l1_loss): a task
  # whose merged features already match its expert's gets no update.
  return jnp.mean(jax.lax.stop_gradient(jnp.sign(d)) * d)


def fit_surgery(features_fn: Callable[[Any, jax.Array], jax.Array],
                merged_params: Any, expert_params: Sequence[Any],
                batches: Sequence[jax.Array], *, key: jax.Array,
                hidden: int = 16, steps: int = 1000,
                learning_rate: float = 1e-3,
                optimizer: optax.GradientTransformation | None = None
                ) -> SurgeryResult:
  """Fits representation surgery after any merge, on unlabeled inputs.

  The merged model's features ``z = f(theta_merged, x)`` of task ``t``'s
  inputs are pulled towards the features of that task's own model
  ``z*_t = f(theta_t, x)`` by a light adapter, ``z^_t = z - W_up,t
  relu(W_down,t z)``, trained on the L1 gap ``mean |z^_t - z*_t|`` with the
  merged and expert models frozen. ``W_down`` starts as PyTorch's default
  ``Linear`` initialisation (uniform in ``+-1/sqrt(d)``), ``W_up`` at zero,
  so the adapters start as the identity. The adapters of different tasks
  share no parameters, and Adam acts elementwise: one step on the sum of
  the task losses, as here, is exactly FusionBench's loop of one step per
  task. Features are computed once per batch (both models are frozen); the
  training loop is one jit-compiled ``lax.scan``. At inference the task
  must be known (the adapter is per task), as for a task-specific head.

  Args:
    features_fn: ``features_fn(params, x) -> [n, d]`` features (e.g. the
      backbone's output, or CLIP's normalised projection).
    merged_params: the merged model.
    expert_params: the K task models (the fine-tunes).
    batches: unlabeled inputs, each ``[K, n, ...]``: row ``t`` holds task
      ``t``'s inputs (all batches of one shape; cycled).
    key: PRNG key for ``W_down``'s initialisation.
    hidden: the adapters' hidden width (FusionBench: 16).
    steps: optimisation steps (FusionBench: 1000).
    learning_rate: Adam's learning rate (FusionBench: 1e-3).
    optimizer: an optax optimizer instead of Adam.

  Returns:
    A `SurgeryResult`.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> f = lambda p, x: x @ p['w']
    >>> merged = {'w': jnp.eye(3)}
    >>> experts = [{'w': jnp.eye(3) * 2.0}]
    >>> x = jax.random.normal(jax.random.key(0), (1, 64, 3))
    >>> res = mj.methods.fit_surgery(f, merged, experts, [x],
    ...                              key=jax.random.key(1), steps=300,
    ...                              learning_rate=1e-2)
    >>> bool(res.losses[-1] < 0.5 * res.losses[0])
    True

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging",
      ICML 2024. https://arxiv.org/abs/2402.02705
  """
  if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
    raise ValueError(f'hidden must be an int >= 1, got {hidden!r}.')
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be an int >= 1, got {steps!r}.')
  batches = [jnp.asarray(b) for b in batches]
  experts = list(expert_params)
  k = len(experts)
  if not batches:
    raise ValueError('fit_surgery: no batches given.')
  if not experts:
    raise ValueError('fit_surgery: expert_params is empty.')
  for i, b in enumerate(batches):
    if b.ndim < 2 or b.shape[0] != k or b.shape != batches[0].shape:
      raise ValueError(
          f'batches[{i}] has shape {tuple(b.shape)}: every batch must be '
          f'[K={k}, n, ...] (row t: task t\'s inputs), all of one shape.')

  @jax.jit
  def features(merged, experts, x):
    z = jax.vmap(lambda xt: features_fn(merged, xt))(x)
    target = jax.vmap(features_fn)(experts, x)
    return z.astype(jnp.float32), target.astype(jnp.float32)

  stacked_experts = jax.tree.map(lambda *xs: jnp.stack(xs), *experts)
  pairs = [features(merged_params, stacked_experts, b) for b in batches]
  z = jnp.stack([p[0] for p in pairs])        # [B, K, n, d]
  target = jnp.stack([p[1] for p in pairs])
  if z.ndim != 4 or z.shape != target.shape:
    raise ValueError(
        f'features_fn must return [n, d] features for both models; got '
        f'{tuple(z.shape[2:])} (merged) and {tuple(target.shape[2:])} '
        '(experts).')
  if not bool(jnp.all(jnp.isfinite(z)) & jnp.all(jnp.isfinite(target))):
    raise ValueError('fit_surgery: the features hold NaN/Inf; check the '
                     'inputs and the models.')
  d = z.shape[-1]
  bound = 1.0 / np.sqrt(d)
  params = (jax.random.uniform(key, (k, hidden, d), jnp.float32, -bound, bound),
            jnp.zeros((k, d, hidden), jnp.float32))
  opt = optimizer or optax.adam(learning_rate)

  def loss(p, zb, tb):
    down, up = p
    fixed = jax.vmap(surgery_apply)(down, up, zb)
    return jnp.sum(jax.vmap(_l1)(fixed - tb))  # one term per task

  @jax.jit
  def run(p):
    def step(carry, i):
      p, state = carry
      j = i % z.shape[0]
      value, g = jax.value_and_grad(loss)(p, z[j], target[j])
      p, state = optim.optax_step(opt, g, state, p)
      return (p, state), value
    (p, _), values = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(steps))
    return p, values

  (down, up), values = run(params)
  return SurgeryResult(down, up, np.asarray(values))
