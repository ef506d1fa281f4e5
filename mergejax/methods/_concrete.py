"""Concrete subspace masks: one shared mask on the task vectors, learned on unlabeled data."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax._src import paths
from mergejax.methods import _adamerging as ada
from mergejax.transforms import _coefficients as coeff_lib
from mergejax.transforms import _reduce as reduce


def concrete(mask: Any, lambda_: Any = 0.3) -> base.MergeTransformation:
  """Task arithmetic on masked task vectors: ``theta_0 + lambda sum_i m * tau_i``.

  ``mask`` is a tree like the params, shared by the K models (e.g.
  ``fit_concrete(...).mask()``); an all-ones mask is task arithmetic.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 2.])}, {'w': jnp.array([3., 4.])}]
    >>> m = {'w': jnp.array([1., 0.])}
    >>> mj.merge(mj.methods.concrete(m, lambda_=0.5), base, fts)['w']
    Array([2., 0.], dtype=float32)

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  return base.chain(reduce.task_vectors(), coeff_lib.shared_mask(mask),
                    reduce.weighted_sum(1.0), reduce.scale(lambda_),
                    reduce.apply_to_base())


def concrete_mask(logits: Any, key: jax.Array | None = None, *,
                  temperature: float = 0.5, normalize: bool = True) -> Any:
  """A relaxed-Bernoulli (binary Concrete) mask from per-parameter logits.

  With a ``key``, a reparameterised sample
  ``m = sigmoid((s + log u - log(1 - u)) / temperature)``, ``u ~ U(0, 1)``
  per entry (differentiable in ``s``); without one, the noise-free
  ``sigmoid(s / temperature)`` (the sample's median). With ``normalize`` each
  leaf is divided by its mean, so the mask keeps the task vector's overall
  scale (the Concrete paper's choice).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> s = {'w': jnp.array([0., 30.])}
    >>> mj.methods.concrete_mask(s, normalize=False)['w']
    Array([0.5, 1. ], dtype=float32)
    >>> mj.methods.concrete_mask(s)['w']  # divided by the mean, 3/4
    Array([0.6666667, 1.3333334], dtype=float32)

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  checks.hparam(temperature, 'temperature', low=0.0, low_inclusive=False)
  leaves, treedef = jax.tree.flatten(logits)
  keys = (jax.random.split(key, len(leaves)) if key is not None
          else [None] * len(leaves))

  for path, s in zip(paths.leaf_paths(logits), leaves):
    if not isinstance(s, jax.core.Tracer) and bool(
        jnp.any(jnp.isnan(jnp.asarray(s, jnp.float32)))):
      raise ValueError(f'concrete_mask: logits[{path!r}] has NaN entries; give '
                       'numbers (+-30 already saturates the mask).')

  def one(s, k):
    s = jnp.asarray(s, jnp.float32)
    if k is not None:
      u = jax.random.uniform(k, s.shape, jnp.float32, minval=1e-6,
                             maxval=1.0 - 1e-6)
      s = s + jnp.log(u) - jnp.log1p(-u)
    m = jax.nn.sigmoid(s / temperature)
    if normalize and m.size:
      # The mean of sigmoids is > 0 unless every logit is -inf-like; the floor
      # keeps an all-off mask at zero instead of NaN.
      m = m / jnp.maximum(jnp.mean(m), 1e-12)
    return m

  return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


class ConcreteResult(NamedTuple):
  """Learned mask ``logits`` (a tree like the params) and ``losses`` per step.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  logits: Any
  losses: np.ndarray
  temperature: float = 0.5

  def mask(self, key: jax.Array | None = None, *,
           normalize: bool = True) -> Any:
    """The mask to merge with: `concrete_mask` of the learned logits.

    FusionBench evaluates one random continuous sample (pass a ``key``);
    without a key the noise-free mask, a deterministic choice.
    """
    return concrete_mask(self.logits, key, temperature=self.temperature,
                         normalize=normalize)


def _check_fit_args(name, models, batches, steps):
  if steps < 1:
    raise ValueError(f'{name}: steps must be >= 1, got {steps}.')
  batches = list(batches)
  if not batches:
    raise ValueError(f'{name}: no batches given.')
  if not list(models):
    raise ValueError(f'{name}: no models given.')
  return batches


def masked_merge(make_tx: Callable[[Any], base.MergeTransformation],
                 logits: Any, key: jax.Array, base_params: Any,
                 models: Sequence[Any], *, temperature: float,
                 detach_mask: bool = False) -> Any:
  """The merge ``make_tx(m)`` for a mask ``m`` sampled from ``logits``.

  The one place the Concrete fits (task arithmetic, AdaMerging, DAM) turn
  mask logits into merged parameters; ``detach_mask`` stops the gradient at
  the mask (a step on other parameters with the mask held fixed).
  """
  m = concrete_mask(logits, key, temperature=temperature)
  if detach_mask:
    m = jax.lax.stop_gradient(m)
  return merge_lib.merge(make_tx(m), base_params, models, check_finite=False)


def mask_logits_init(base_params: Any, init_logit: float) -> Any:
  """One float32 logit per parameter of ``base_params``, all ``init_logit``."""
  return jax.tree.map(lambda p: jnp.full(jnp.shape(p), init_logit, jnp.float32),
                      base_params)


def fit_concrete(loss_fn: Callable[[Any, Any], jax.Array], base_params: Any,
                 models: Sequence[Any], batches: Sequence[Any], *,
                 key: jax.Array, lambda_: float = 0.3,
                 temperature: float = 0.5, init_logit: float = 0.0,
                 steps: int = 100, learning_rate: float = 1e-3,
                 optimizer: optax.GradientTransformation | None = None
                 ) -> ConcreteResult:
  """Learns a shared Concrete mask for task arithmetic (Concrete TA).

  Each step draws a mask ``m`` with `concrete_mask` (a fresh key per step),
  merges ``theta_0 + lambda sum_i m * tau_i`` and takes an optax step on the
  mask logits to minimise ``loss_fn(params, batch)`` -- the Concrete paper
  uses the `prediction_entropy` of the merged model on unlabeled inputs of
  every task. The loop is one jit-compiled ``lax.scan``; the batches cycle.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    base_params: the pre-trained parameters.
    models: the K fine-tuned models.
    batches: batches for ``loss_fn`` (all of one shape).
    key: PRNG key for the mask samples.
    lambda_: task arithmetic's scale (FusionBench: 0.3).
    temperature: the relaxation's temperature (0.5).
    init_logit: initial logit of every entry (0: keep probability 1/2).
    steps: optimisation steps.
    learning_rate: Adam's learning rate (1e-3).
    optimizer: an optax optimizer instead of Adam.

  Returns:
    A `ConcreteResult`; merge with ``concrete(result.mask(), lambda_)``.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  batches = _check_fit_args('fit_concrete', models, batches, steps)
  checks.hparam(lambda_, 'lambda_')
  opt = optimizer or optax.adam(learning_rate)
  models = list(models)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def loss(s, k, batch):
    return loss_fn(masked_merge(lambda m: concrete(m, lambda_), s, k,
                                base_params, models, temperature=temperature),
                   batch)

  @jax.jit
  def run(s, keys):
    def step(carry, xs):
      s, state = carry
      i, k = xs
      batch = jax.tree.map(lambda b: b[i % len(batches)], stacked)
      value, g = jax.value_and_grad(loss)(s, k, batch)
      s, state = optim.optax_step(opt, g, state, s)
      return (s, state), value
    (s, _), values = jax.lax.scan(step, (s, opt.init(s)),
                                  (jnp.arange(steps), keys))
    return s, values

  s, values = run(mask_logits_init(base_params, init_logit),
                  jax.random.split(key, steps))
  return ConcreteResult(s, np.asarray(values), float(temperature))


def concrete_adamerging(mask: Any, coefficients: Any
                        ) -> base.MergeTransformation:
  """AdaMerging on masked task vectors: ``theta_0 + sum_i c_i (m * tau_i)``.

  ``coefficients`` are AdaMerging's (``[K]`` task-wise, or a tree of ``[K]``
  leaves layer-wise); with an all-ones mask this is `adamerging`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 2.])}, {'w': jnp.array([3., 4.])}]
    >>> m = {'w': jnp.array([1., 0.])}
    >>> tx = mj.methods.concrete_adamerging(m, jnp.array([1., 0.5]))
    >>> mj.merge(tx, base, fts)['w']
    Array([2.5, 0. ], dtype=float32)

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  return base.chain(reduce.task_vectors(), coeff_lib.shared_mask(mask),
                    coeff_lib.coefficient_sum(coefficients),
                    reduce.apply_to_base())


class ConcreteAdaMergingResult(NamedTuple):
  """The frozen ``mask``, AdaMerging's ``coefficients`` for it, and the losses.

  ``mask_losses`` are the first stage's (mask training), ``losses`` the
  second's (AdaMerging on the masked task vectors).

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  mask: Any
  coefficients: Any
  mask_losses: np.ndarray
  losses: np.ndarray


def fit_concrete_adamerging(
    loss_fn: Callable[[Any, Any], jax.Array], base_params: Any,
    models: Sequence[Any], batches: Sequence[Any], *, key: jax.Array,
    granularity: str = 'layer', init: float = 0.3, temperature: float = 0.5,
    init_logit: float = 0.0, steps: int = 1000, coefficient_lr: float = 1.0,
    learning_rate: float = 1e-3, adamerging_steps: int = 1000,
    adamerging_lr: float = 1e-3, clamp: tuple[float, float] | None = None
) -> ConcreteAdaMergingResult:
  """Concrete AdaMerging: a shared mask learned bi-level with the coefficients.

  Stage 1 (FusionBench's first-order bi-level loop), per step: draw a mask
  ``m`` (`concrete_mask`); reset the coefficients to ``init`` and take one
  Adam step on them at ``coefficient_lr`` with ``m`` held fixed (that
  optimizer's moments persist across steps); then, with those coefficients
  held fixed, one Adam step on the mask logits at ``learning_rate`` through
  a fresh batch. No gradient flows through the coefficient step. Stage 2:
  one continuous mask sample is frozen and layer-wise (or task-wise)
  AdaMerging (`fit_adamerging`) runs on the masked task vectors from
  ``init``. Each stage is one jit-compiled ``lax.scan``; ``loss_fn`` is
  AdaMerging's (e.g. `prediction_entropy` on unlabeled inputs of every
  task), and the batches cycle.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    base_params: the pre-trained parameters.
    models: the K fine-tuned models.
    batches: batches for ``loss_fn`` (all of one shape).
    key: PRNG key for the mask samples.
    granularity: ``'layer'`` or ``'task'`` coefficients.
    init: the coefficients' initial (and reset) value (0.3).
    temperature: the relaxation's temperature (0.5).
    init_logit: initial mask logit (0).
    steps: stage-1 steps (FusionBench: 1000).
    coefficient_lr: Adam's learning rate of the stage-1 coefficient step
      (FusionBench's ``base_lr``: 1).
    learning_rate: Adam's learning rate of the mask logits (1e-3).
    adamerging_steps: stage-2 steps (1000).
    adamerging_lr: stage-2 learning rate (1e-3).
    clamp: stage-2 clamp of the coefficients (FusionBench: none).

  Returns:
    A `ConcreteAdaMergingResult`; merge with
    ``concrete_adamerging(result.mask, result.coefficients)``.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination
      for Multi-task Model Fusion", 2023. https://arxiv.org/abs/2312.06173
  """
  if granularity not in ('layer', 'task'):
    raise ValueError(f"granularity must be 'layer' or 'task', got "
                     f'{granularity!r}.')
  batches = _check_fit_args('fit_concrete_adamerging', models, batches, steps)
  models = list(models)
  k = len(models)
  c0 = jnp.full((k,), init, jnp.float32)
  if granularity == 'layer':
    c0 = jax.tree.map(lambda _: c0, base_params)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  coef_opt, mask_opt = optax.adam(coefficient_lr), optax.adam(learning_rate)
  n = len(batches)

  def loss(s, c, k_mask, batch, *, detach_mask):
    return loss_fn(masked_merge(lambda m: concrete_adamerging(m, c), s, k_mask,
                                base_params, models, temperature=temperature,
                                detach_mask=detach_mask), batch)

  @jax.jit
  def run(s, keys):
    def step(carry, xs):
      s, mask_state, coef_state = carry
      i, k_mask = xs
      batch = jax.tree.map(lambda b: b[i % n], stacked)
      g_c = jax.grad(lambda c: loss(s, c, k_mask, batch, detach_mask=True))(c0)
      c1, coef_state = optim.optax_step(coef_opt, g_c, coef_state, c0)
      c1 = jax.lax.stop_gradient(c1)
      batch = jax.tree.map(lambda b: b[(i + 1) % n], stacked)
      value, g_s = jax.value_and_grad(
          lambda q: loss(q, c1, k_mask, batch, detach_mask=False))(s)
      s, mask_state = optim.optax_step(mask_opt, g_s, mask_state, s)
      return (s, mask_state, coef_state), value
    (s, _, _), values = jax.lax.scan(
        step, (s, mask_opt.init(s), coef_opt.init(c0)),
        (jnp.arange(steps), keys))
    return s, values

  k_steps, k_final = jax.random.split(key)
  s, mask_losses = run(mask_logits_init(base_params, init_logit),
                       jax.random.split(k_steps, steps))
  mask = concrete_mask(s, k_final, temperature=temperature)
  masked = [jax.tree.map(lambda b, x, m_: b + m_ * (x - b), base_params, mdl,
                         mask) for mdl in models]
  res = ada.fit_adamerging(loss_fn, base_params, masked, batches,
                           granularity=granularity, init=init,
                           steps=adamerging_steps,
                           learning_rate=adamerging_lr, clamp=clamp)
  return ConcreteAdaMergingResult(mask, res.coefficients,
                                  np.asarray(mask_losses), res.losses)
