"""Expert Merging: layer-wise coefficients that align the merge with each expert."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax._src import paths
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
    chunks: Any = None,
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
  gradients are clipped to ``max_grad_norm`` before Adam. The experts'
  outputs are computed once per batch (they are frozen); the optimisation
  is one jit-compiled ``lax.scan``.

  Expert Merging++ gives a leaf ``n_l`` coefficients per model, one per
  contiguous chunk of the flattened tensor (``chunks``; `importance_chunks`
  allots them from a first fit), and the regulariser sums over every
  chunk's coefficient, as the authors' code does.

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
    chunks: None (one coefficient per model and leaf), or a tree like
      ``base_params`` of ints ``n_l >= 1`` (static): chunk-wise coefficients,
      ``[K, n_l]`` per leaf (Expert Merging++; see `importance_chunks`).
    optimizer: an optax optimizer instead of clipped Adam.

  Returns:
    An `ExpertMergingResult`; merge with ``adamerging(result.coefficients)``
    (leaves ``[K]``, or ``[K, n_l]`` with ``chunks``).

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
  shapes = _coefficient_shapes(base_params, k, chunks)
  r0 = jax.tree.map(lambda shape: jnp.full(shape, jax.scipy.special.logit(
      jnp.float32(init))), shapes, is_leaf=lambda v: isinstance(v, tuple))
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


def _coefficient_shapes(base_params, k, chunks):
  """``(K,)`` per leaf, or ``(K, n_l)`` from a ``chunks`` tree (checked)."""
  if chunks is None:
    return jax.tree.map(lambda _: (k,), base_params)
  flat_p = paths.flatten_to_dict(base_params)
  flat_n = paths.flatten_to_dict(chunks)
  paths.require_same_paths(flat_n, flat_p, 'chunks')
  out = {}
  for p, leaf in flat_p.items():
    n, size = flat_n[p], math.prod(np.shape(leaf))
    if (isinstance(n, bool) or not isinstance(n, (int, np.integer))
        or not 1 <= n <= max(size, 1)):
      raise ValueError(f'chunks[{p!r}] is {n!r} for a leaf of shape '
                       f'{tuple(np.shape(leaf))}: give an int in [1, {size}].')
    out[p] = (k, int(n))
  return paths.unflatten_like(base_params, out)


def importance_chunks(coefficients: Any, base_params: Any,
                      models: Sequence[Any], *, budget: int,
                      max_chunks: int = 16) -> Any:
  """Allots Expert Merging++'s chunk coefficients to the important leaves.

  The paper builds a normalised layer importance from the learned
  coefficients, the task vectors' magnitudes and the parameter counts, and
  gives important layers more chunk-wise coefficients; its formula is not
  in the authors' code (which takes the chunk counts as input), so this
  rule is a design of its own::

      I_l = mean_t c_{t,l} ||tau_t^l||_1 / sum_l' (...)

  -- the share of the merge's total absolute edit that leaf ``l`` applies
  (``||.||_1`` grows with the parameter count, so large layers weigh more);
  ``c`` is a first fit's coefficients (chunk-wise ones are averaged). Each
  leaf keeps one coefficient and the ``budget`` extra ones are shared out
  in proportion to ``I_l`` (largest remainders, ties to the earlier leaf),
  at most ``max_chunks`` per leaf and never more than its entries; what a
  capped leaf cannot take goes to the others. Deterministic.

  Args:
    coefficients: a first `fit_expert_merging` result's coefficients.
    base_params: the pre-trained parameters.
    models: the K experts.
    budget: extra coefficients per model (total ``#leaves + budget``, fewer
      when the caps bind).
    max_chunks: the most chunks of one leaf.

  Returns:
    A tree like ``base_params`` of ints, for ``fit_expert_merging(...,
    chunks=...)``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'big': jnp.zeros(8), 'small': jnp.zeros(2)}
    >>> experts = [{'big': jnp.ones(8), 'small': jnp.ones(2)}]
    >>> c = {'big': jnp.array([0.5]), 'small': jnp.array([0.5])}
    >>> mj.methods.importance_chunks(c, base, experts, budget=5)
    {'big': 5, 'small': 2}

  References:
    Zhang et al., "Expert Merging: Model Merging with Unsupervised Expert
      Alignment and Importance-Guided Layer Chunking", ICLR 2026.
      https://arxiv.org/abs/2509.25712
  """
  for name, v, low in (('budget', budget, 0), ('max_chunks', max_chunks, 1)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
      raise ValueError(f'{name} must be an int >= {low}, got {v!r}.')
  models = list(models)
  if not models:
    raise ValueError('importance_chunks: models is empty.')
  flat_b = paths.flatten_to_dict(base_params)
  flat_c = paths.flatten_to_dict(coefficients)
  paths.require_same_paths(flat_c, flat_b, 'coefficients')
  flat_m = [paths.flatten_to_dict(m) for m in models]
  names = list(flat_b)
  importance, caps = [], []
  for p in names:
    b = jnp.asarray(flat_b[p], jnp.float32)
    c = np.asarray(flat_c[p], np.float64).reshape(len(models), -1).mean(1)
    l1 = np.array([float(jnp.sum(jnp.abs(jnp.asarray(m[p], jnp.float32) - b)))
                   for m in flat_m])
    value = float(np.mean(c * l1))
    if not np.isfinite(value) or value < 0:
      raise ValueError(f'importance_chunks: leaf {p!r} has importance '
                       f'{value!r}; the coefficients must be finite and '
                       'non-negative, the models finite.')
    importance.append(value)
    caps.append(min(int(max_chunks), max(int(b.size), 1)) - 1)
  extra = _largest_remainder(np.array(importance), np.array(caps),
                             int(budget))
  return paths.unflatten_like(base_params, {
      p: 1 + int(e) for p, e in zip(names, extra)})


def _largest_remainder(weights, caps, total):
  """Integers ``<= caps`` summing to ``min(total, caps.sum())``, ``~ weights``.

  Hamilton's method: quotas ``left * w / sum(w)`` over the leaves with room,
  their floors, then one more to each of the largest remainders (ties to the
  earlier leaf); repeated over the leaves that still have room when caps cut
  the floors.
  """
  out = np.zeros(len(weights), np.int64)
  left = total
  while left > 0:
    room = np.where(weights > 0, caps - out, 0)
    if not room.any():
      break
    w = np.where(room > 0, weights, 0.0)
    quota = left * w / w.sum()
    take = np.minimum(np.floor(quota).astype(np.int64), room)
    spare = left - int(take.sum())
    rest = quota - take
    for i in sorted(np.flatnonzero(room - take > 0), key=lambda i: (-rest[i], i)):
      if spare == 0:
        break
      take[i] += 1
      spare -= 1
    out += take
    left -= int(take.sum())
  return out
