"""Expert Merging: layer-wise coefficients that align the merge with each expert."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax.methods import _adamerging as ada


class ExpertMergingResult(NamedTuple):
  """Learned layer-wise ``coefficients`` (merge with `adamerging`) and ``losses``.

  References:
    Zhang et al., "Expert Merging: Model Merging with Unsupervised Expert
      Alignment and Importance-Guided Layer Chunking", ICLR 2026.
      https://arxiv.org/abs/2509.25712
  """
  coefficients: Any
  losses: np.ndarray


def _alignment(outputs, targets, temperature, hidden_weight):
  """``T^2 KL(expert || merged)`` at temperature T, plus the hidden-state MSE."""
  (hid, logits), (thid, tlogp) = outputs, targets
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.mean(jnp.sum(jnp.exp(tlogp) * (tlogp - logp), axis=-1))
  errs = [jnp.mean(jnp.square(h.astype(jnp.float32) - t))
          for h, t in zip(jax.tree.leaves(hid), jax.tree.leaves(thid))]
  mse = sum(errs) / len(errs) if errs else 0.0
  return temperature ** 2 * kl + hidden_weight * mse


def fit_expert_merging(
    outputs_fn: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]],
    base_params: Any, models: Sequence[Any], batches: Sequence[Any], *,
    init: float = 0.1, steps: int = 200, learning_rate: float = 1e-4,
    temperature: float = 3.0, hidden_weight: float = 0.1,
    regularization: float = 0.1,
    task_weights: Sequence[float] | None = None, max_grad_norm: float = 1.0,
    optimizer: optax.GradientTransformation | None = None
) -> ExpertMergingResult:
  """Learns layer-wise merging coefficients that make the merge mimic each expert.

  The merged model ``theta(c) = theta_0 + sum_t c_{t,l} tau_t^l`` has one
  coefficient per model and leaf, kept in ``(0, 1)`` as ``c = sigmoid(r)``
  (``r`` starts at ``logit(init)``). On unlabeled calibration inputs of every
  task the merge is pulled towards that task's own model::

      loss = sum_t [ w_t ( T^2 KL(p_T(theta_t; x_t) || p_T(theta(c); x_t))
                           + hidden_weight mean_l MSE(h_l(theta(c); x_t),
                                                      h_l(theta_t; x_t)) )
                     + regularization mean_l |c_{., l} - init|_1 ]

  with ``p_T`` the softmax at temperature ``T`` and ``h_l`` the hidden states
  ``outputs_fn`` returns. This follows the authors' code: their soft-target
  cross-entropy has the KL's gradient (the expert's entropy is a constant);
  their loop of one task per step becomes one step on the sum over tasks;
  gradients are clipped to ``max_grad_norm`` before Adam. Expert
  Merging++'s importance-guided chunking (several coefficients for one
  tensor) is not implemented. The experts' outputs are computed once per
  batch (they are frozen); the optimisation is one jit-compiled
  ``lax.scan``.

  Args:
    outputs_fn: ``outputs_fn(params, x, t) -> (hiddens, logits)``: any
      pytree of hidden states (e.g. captured layer outputs; may be empty)
      and ``[n, C]`` logits of the model ``params`` on task ``t``'s inputs
      ``x`` (``t`` is a traced index, for task-specific heads; ignore it
      otherwise).
    base_params: the pre-trained parameters.
    models: the K experts (fine-tunes).
    batches: unlabeled inputs, each with a leading task axis ``[K, n, ...]``
      (row ``t``: task ``t``'s inputs), all of one shape; cycled.
    init: initial coefficient in ``(0, 1)`` and the regulariser's centre
      (authors: 0.1).
    steps: optimisation steps.
    learning_rate: Adam's learning rate (authors: 1e-4).
    temperature: the logits' temperature ``T`` (authors: 3).
    hidden_weight: weight of the hidden-state term (authors: 0.1).
    regularization: weight of the L1 pull towards ``init`` (authors: 0.1).
    task_weights: ``w_t`` (default 1 each).
    max_grad_norm: global gradient-norm clip (authors: 1; None: no clip).
    optimizer: an optax optimizer instead of clipped Adam.

  Returns:
    An `ExpertMergingResult`; merge with ``adamerging(result.coefficients)``.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> experts = [{'w': 3.0 * jnp.eye(2)}]
    >>> out = lambda p, x, t: ({'h': x @ p['w']}, x @ p['w'])
    >>> x = jax.random.normal(jax.random.key(0), (1, 16, 2))
    >>> res = mj.methods.fit_expert_merging(out, base, experts, [x], steps=500,
    ...                                     learning_rate=0.05, regularization=0.0)
    >>> bool(res.coefficients['w'][0] > 0.95)
    True

  References:
    Zhang et al., "Expert Merging: Model Merging with Unsupervised Expert
      Alignment and Importance-Guided Layer Chunking", ICLR 2026.
      https://arxiv.org/abs/2509.25712
  """
  if not 0.0 < float(init) < 1.0:
    raise ValueError(f'init must lie in (0, 1) (coefficients are sigmoids), '
                     f'got {init!r}.')
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be an int >= 1, got {steps!r}.')
  models = list(models)
  k = len(models)
  if not k:
    raise ValueError('fit_expert_merging: models is empty.')
  batches = [jax.tree.map(jnp.asarray, b) for b in batches]
  if not batches:
    raise ValueError('fit_expert_merging: no batches given.')
  for i, b in enumerate(batches):
    for leaf in jax.tree.leaves(b):
      if leaf.ndim < 1 or leaf.shape[0] != k:
        raise ValueError(
            f'batches[{i}] has a leaf of shape {tuple(leaf.shape)}: batches '
            f'need a leading task axis of size K={k} (row t: task t\'s '
            'inputs).')
  temp = checks.hparam(temperature, 'temperature', low=0.0, low_inclusive=False)
  hid_w = checks.hparam(hidden_weight, 'hidden_weight', low=0.0)
  gamma = checks.hparam(regularization, 'regularization', low=0.0)
  w = checks.hparam(1.0 if task_weights is None else task_weights,
                    'task_weights', low=0.0)
  w = checks.per_model(w, k, 'task_weights')
  tasks = jnp.arange(k)
  stacked_models = jax.tree.map(lambda *xs: jnp.stack(xs), *models)

  @jax.jit
  def expert_targets(x):
    hid, logits = jax.vmap(outputs_fn)(stacked_models, x, tasks)
    hid = jax.tree.map(lambda h: h.astype(jnp.float32), hid)
    return hid, jax.nn.log_softmax(logits.astype(jnp.float32) / temp, axis=-1)

  targets = [expert_targets(b) for b in batches]
  for i, (hid, tlogp) in enumerate(targets):
    leaves = jax.tree.leaves(hid) + [tlogp]
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in leaves):
      raise ValueError(f'fit_expert_merging: the experts\' outputs on '
                       f'batches[{i}] hold NaN/Inf; check the inputs.')
  stacked_batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  stacked_targets = jax.tree.map(lambda *xs: jnp.stack(xs), *targets)
  r0 = jax.tree.map(lambda _: jnp.full((k,), jax.scipy.special.logit(
      jnp.float32(init))), base_params)
  if optimizer is None:
    optimizer = optax.adam(learning_rate)
    if max_grad_norm is not None:
      optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm),
                              optimizer)
  opt = optimizer
  n_leaves = len(jax.tree.leaves(r0))

  def loss(r, x, target):
    c = jax.tree.map(jax.nn.sigmoid, r)
    merged = merge_lib.merge(ada.adamerging(c), base_params, models,
                             check_finite=False)
    outs = jax.vmap(lambda xt, t: outputs_fn(merged, xt, t))(x, tasks)
    per_task = jax.vmap(lambda o, tg: _alignment(o, tg, temp, hid_w))(
        outs, target)
    # The L1 pull towards init, per coefficient of one expert, once per task.
    reg = sum(jnp.sum(jnp.abs(v - init)) for v in jax.tree.leaves(c))
    return jnp.sum(w * per_task) + k * gamma * reg / n_leaves

  @jax.jit
  def run(r):
    def step(carry, i):
      r, state = carry
      j = i % len(batches)
      x = jax.tree.map(lambda b: b[j], stacked_batches)
      target = jax.tree.map(lambda b: b[j], stacked_targets)
      value, g = jax.value_and_grad(loss)(r, x, target)
      r, state = optim.optax_step(opt, g, state, r)
      return (r, state), value
    (r, _), values = jax.lax.scan(step, (r, opt.init(r)), jnp.arange(steps))
    return jax.tree.map(jax.nn.sigmoid, r), values

  c, values = run(r0)
  return ExpertMergingResult(c, np.asarray(values))
