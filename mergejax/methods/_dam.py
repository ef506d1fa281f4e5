"""Backdoor-aware merging (DAM): a Concrete mask trained against universal perturbations."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import checks
from mergejax._src import optim
from mergejax.methods import _common
from mergejax.methods import _concrete

SAFE_LOSSES = ('consistency', 'entropy')
ATTACKS = ('targeted', 'untargeted')


class DamResult(NamedTuple):
  """Learned mask ``logits``, the universal ``perturbation`` and per-step losses.

  Attributes:
    logits: mask logits, a tree like the params (merge with
      ``concrete(result.mask(), lambda_)``).
    perturbation: the last universal perturbation, shaped like a batch with
      its example axis of size 1 (per row, the most successful candidate).
    target: per row, the class that perturbation pulls towards
      (``attack='targeted'``), or None.
    losses: the mask objective per step.
    attack_losses: the perturbation's objective per step, the best
      candidate's per row, averaged: the mean log-probability of its class
      (``attack='targeted'``) or the cross-entropy against the clean
      predictions (``'untargeted'``).
    temperature: the relaxation's temperature.

  References:
    Yang et al., "Mitigating the Backdoor Effect for Multi-Task Model Merging
      via Safety-Aware Subspace", ICLR 2025. https://arxiv.org/abs/2410.13910
  """
  logits: Any
  perturbation: jax.Array
  target: jax.Array | None
  losses: np.ndarray
  attack_losses: np.ndarray
  temperature: float = 0.5

  def mask(self, key: jax.Array | None = None, *,
           normalize: bool = True) -> Any:
    """`mergejax.methods.concrete_mask` of the learned logits."""
    return _concrete.concrete_mask(self.logits, key,
                                   temperature=self.temperature,
                                   normalize=normalize)


def _norm(delta, example_axis):
  """L2 norm of each perturbation, over the feature axes (kept as size 1)."""
  axes = tuple(range(example_axis + 1, delta.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(delta), axis=axes, keepdims=True))


def _unit(g, example_axis):
  return g / jnp.maximum(_norm(g, example_axis), 1e-12)


def _project_l2(delta, epsilon, example_axis):
  """Scales each perturbation into the L2 ball of radius ``epsilon``."""
  norm = _norm(delta, example_axis)
  return delta * jnp.minimum(1.0, epsilon / jnp.maximum(norm, 1e-12))


def _own_label_ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float32), labels))


def fit_dam(logits_fn: Callable[[Any, jax.Array], jax.Array],
            base_params: Any, models: Sequence[Any],
            batches: Sequence[jax.Array], *, key: jax.Array,
            epsilon: float, example_axis: int = 0,
            input_range: tuple[float, float] | None = (0.0, 1.0),
            attack: str = 'targeted', safe_loss: str = 'consistency',
            adversarial_weight: float = 0.1,
            attack_step: float = 0.25, lambda_: float = 0.3,
            temperature: float = 0.5, init_logit: float = 0.0,
            steps: int = 100, learning_rate: float = 1e-3
            ) -> DamResult:
  """Learns a backdoor-aware Concrete mask for task arithmetic (DAM).

  A poisoned fine-tune brings its trigger into the merge through its task
  vector. DAM keeps the parameters the tasks need and drops those that carry
  a trigger, without knowing the trigger. A trigger is a small universal
  perturbation that pulls every input towards one class, so each step

  1. takes a projected gradient-ascent step (normalised, of length
     ``attack_step * epsilon``) on a universal perturbation ``delta`` -- one
     per batch row before ``example_axis``, shared by its examples, L2 norm
     over the feature axes at most ``epsilon`` -- with the merged weights
     fixed. ``attack='targeted'`` (default) keeps one perturbation per
     class ``c``, each maximising ``mean_n log p_c(x_n + delta_c)``, and
     the mask step below trains against the most successful one per row,
     as trigger reconstruction (Neural Cleanse) does; ``'untargeted'``
     keeps one that maximises the cross-entropy against the merged model's
     clean predictions, as FusionBench's Safe Concrete does;
  2. takes an Adam step on the shared mask logits of Concrete task
     arithmetic (`fit_concrete`) minimising

       ``H(p(x)) + adversarial_weight * L_safe(x + delta)``

     where ``H`` is AdaMerging's prediction entropy on the clean unlabeled
     inputs and ``L_safe`` is, with ``safe_loss='consistency'`` (default),
     the cross-entropy against the merged model's clean predictions (the
     merge must ignore the perturbation) or, with ``'entropy'``, the entropy
     on perturbed inputs (FusionBench's choice, which rewards the confident
     wrong answer a trigger gives).

  With ``adversarial_weight = 0`` the mask step is exactly `fit_concrete`'s
  with the same key. The paper's abstract describes two masks optimised
  alternately (task-shared against interference, backdoor-detection against
  triggers); this follows FusionBench's realisation (one shared mask,
  universal perturbations, alternating steps, ``adversarial_weight`` 0.1)
  with the targeted attack, the consistency loss and the L2 budget designed
  here (FusionBench's budget is unused). Untargeted adversarial
  perturbations of a non-robust model flip many clean predictions, and
  training against them costs clean accuracy; a targeted universal
  perturbation of small norm is what a backdoor makes unusually easy. One
  jit-compiled ``lax.scan``; the batches cycle.

  Args:
    logits_fn: ``logits_fn(params, x) -> [..., classes]`` for an input batch
      ``x`` (e.g. ``[tasks, n, features]``, each task through its head).
    base_params: the pre-trained parameters.
    models: the K fine-tuned models (one may be poisoned).
    batches: clean unlabeled input batches, all of one shape.
    key: PRNG key for the mask samples.
    epsilon: L2 budget of each universal perturbation (> 0).
    example_axis: the examples' axis in a batch; the perturbation is shared
      along it.
    input_range: ``(low, high)`` the perturbed inputs are clipped to, or None.
    attack: ``'targeted'`` or ``'untargeted'``.
    safe_loss: ``'consistency'`` or ``'entropy'``.
    adversarial_weight: weight of the perturbed-input term.
    attack_step: length of each ascent step as a fraction of ``epsilon``.
    lambda_: task arithmetic's scale.
    temperature: the Concrete relaxation's temperature.
    init_logit: initial mask logit of every parameter.
    steps: alternating steps.
    learning_rate: Adam's learning rate for the mask logits.

  Returns:
    A `DamResult`; merge with ``concrete(result.mask(), lambda_)``.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 3))}
    >>> fts = [{'w': jnp.ones((2, 3))}, {'w': -jnp.ones((2, 3))}]
    >>> res = mj.methods.fit_dam(lambda p, x: x @ p['w'], base, fts,
    ...                          [jnp.ones((4, 2))], key=jax.random.key(0),
    ...                          epsilon=0.5, steps=3)
    >>> res.perturbation.shape, res.losses.shape
    ((1, 2), (3,))

  References:
    Yang et al., "Mitigating the Backdoor Effect for Multi-Task Model Merging
      via Safety-Aware Subspace", ICLR 2025. https://arxiv.org/abs/2410.13910
  """
  batches = _concrete._check_fit_args('fit_dam', models, batches, steps)  # pylint: disable=protected-access
  if attack not in ATTACKS:
    raise ValueError(f'attack must be one of {ATTACKS}, got {attack!r}.')
  if safe_loss not in SAFE_LOSSES:
    raise ValueError(f'safe_loss must be one of {SAFE_LOSSES}, got '
                     f'{safe_loss!r}.')
  checks.hparam(epsilon, 'epsilon', low=0.0, low_inclusive=False)
  checks.hparam(adversarial_weight, 'adversarial_weight', low=0.0)
  checks.hparam(attack_step, 'attack_step', low=0.0, low_inclusive=False)
  checks.hparam(lambda_, 'lambda_')
  shape = jnp.shape(batches[0])
  if not -len(shape) <= example_axis < len(shape) - 1 or not shape:
    raise ValueError(f'fit_dam: example_axis {example_axis} must name an axis '
                     f'before the features of a batch, whose shape is {shape}.')
  example_axis %= len(shape)
  if input_range is not None and not input_range[0] < input_range[1]:
    raise ValueError(f'input_range must be (low, high) with low < high, got '
                     f'{input_range}.')
  models = list(models)
  stacked = jnp.stack([jnp.asarray(b, jnp.float32) for b in batches])
  out = jax.eval_shape(logits_fn, base_params, stacked[0])
  if out.ndim != example_axis + 2:
    raise ValueError(f'fit_dam: logits_fn returned shape {out.shape} for a batch '
                     f'of shape {shape}; with example_axis={example_axis} it must '
                     f'be [..., examples, classes] with {example_axis + 2} axes.')
  rows = shape[:example_axis]
  # Candidates: one perturbation per class (targeted), or one (untargeted).
  num_candidates = out.shape[-1] if attack == 'targeted' else 1
  delta_shape = rows + (1,) + shape[example_axis + 1:]
  cand_axis = example_axis + 1  # the example axis once candidates lead
  mask_opt = optax.adam(learning_rate)

  def perturb(x, delta):
    x = x + delta
    return x if input_range is None else jnp.clip(x, *input_range)

  def merged(s, k):
    return _concrete.masked_merge(lambda m: _concrete.concrete(m, lambda_), s,
                                  k, base_params, models,
                                  temperature=temperature)

  def objective(deltas, params, x, labels):
    """``[candidates, *rows]``: how well each perturbation does its job."""
    adv = jax.vmap(lambda d: logits_fn(params, perturb(x, d)))(deltas)
    logp = jax.nn.log_softmax(jnp.asarray(adv, jnp.float32), axis=-1)
    if attack == 'targeted':  # candidate c pulls towards class c
      per_class = jnp.mean(logp, axis=cand_axis)  # [candidates, *rows, classes]
      eye = jnp.eye(num_candidates).reshape(
          (num_candidates,) + (1,) * len(rows) + (num_candidates,))
      return jnp.sum(per_class * eye, axis=-1)
    own = jnp.take_along_axis(logp, labels[None, ..., None], axis=-1)[..., 0]
    return -jnp.mean(own, axis=cand_axis)  # cross-entropy vs clean labels

  def select(deltas, obj):
    """Per row, the candidate with the best objective."""
    best = jnp.argmax(obj, axis=0)  # [*rows]
    idx = best.reshape((1,) + rows + (1,) * (len(delta_shape) - len(rows)))
    return jnp.take_along_axis(deltas, idx, axis=0)[0], best

  def mask_loss(s, k, x, delta):
    params = merged(s, k)
    clean = logits_fn(params, x)
    labels = jax.lax.stop_gradient(jnp.argmax(clean, axis=-1))
    adv = logits_fn(params, perturb(x, delta))
    safe = (_own_label_ce(adv, labels) if safe_loss == 'consistency'
            else _common.prediction_entropy(adv))
    return _common.prediction_entropy(clean) + adversarial_weight * safe

  @jax.jit
  def run(s, deltas, keys):
    def step(carry, xs):
      s, deltas, ms = carry
      i, k = xs
      x = stacked[i % len(batches)]
      params = jax.lax.stop_gradient(merged(s, k))
      labels = jnp.argmax(logits_fn(params, x), axis=-1)
      g = jax.grad(lambda d: jnp.sum(objective(d, params, x, labels)))(deltas)
      # Ascent, normalised per perturbation, then back into the ball.
      deltas = _project_l2(deltas + attack_step * epsilon * _unit(g, cand_axis),
                           epsilon, cand_axis)
      obj = objective(deltas, params, x, labels)
      delta, target = select(deltas, obj)
      value, g = jax.value_and_grad(mask_loss)(s, k, x, delta)
      s, ms = optim.optax_step(mask_opt, g, ms, s)
      return (s, deltas, ms), (value, jnp.mean(jnp.max(obj, axis=0)), delta,
                               target)
    init = (s, deltas, mask_opt.init(s))
    (s, _, _), (values, attacks, delta, target) = jax.lax.scan(
        step, init, (jnp.arange(steps), keys))
    return s, delta[-1], target[-1], values, attacks

  s, delta, target, values, attacks = run(
      _concrete.mask_logits_init(base_params, init_logit),
      jnp.zeros((num_candidates,) + delta_shape, jnp.float32),
      jax.random.split(key, steps))
  return DamResult(s, delta, target if attack == 'targeted' else None,
                   np.asarray(values), np.asarray(attacks), float(temperature))
