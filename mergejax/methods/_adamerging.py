"""AdaMerging: task-wise or layer-wise coefficients learned by entropy minimisation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import base
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax.transforms import _coefficients as coeff_lib
from mergejax.transforms import _reduce as reduce


def adamerging(coefficients: Any) -> base.MergeTransformation:
  """Task arithmetic with AdaMerging's coefficients: ``theta_0 + sum_i c_i tau_i``.

  ``coefficients`` is ``[K]`` (task-wise) or a tree like the params with
  ``[K]`` leaves (layer-wise), e.g. `fit_adamerging`'s result. With every
  coefficient equal to ``lambda`` it is task arithmetic.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(1)}
    >>> fts = [{'w': jnp.array([1.])}, {'w': jnp.array([3.])}]
    >>> mj.merge(mj.methods.adamerging(jnp.array([0.5, 1.])), base, fts)['w']
    Array([3.5], dtype=float32)

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
      Learning", ICLR 2024. https://arxiv.org/abs/2310.02575
  """
  return base.chain(reduce.task_vectors(),
                    coeff_lib.coefficient_sum(coefficients),
                    reduce.apply_to_base())


class AdaMergingResult(NamedTuple):
  """Learned ``coefficients`` and the ``losses`` per step."""
  coefficients: Any
  losses: np.ndarray


def fit_adamerging(loss_fn: Callable[[Any, Any], jax.Array], base_params: Any,
                   models: Sequence[Any], batches: Sequence[Any], *,
                   granularity: str = 'layer', init: float = 0.3,
                   steps: int = 100, learning_rate: float = 1e-3,
                   clamp: tuple[float, float] | None = (0.0, 1.0),
                   optimizer: optax.GradientTransformation | None = None
                   ) -> AdaMergingResult:
  """Learns AdaMerging coefficients by minimising an unsupervised loss.

  The merged model ``theta_0 + sum_i c_i tau_i`` (coefficients per model, or
  per model and leaf) is scored by ``loss_fn(params, batch)`` -- AdaMerging
  uses `prediction_entropy` of the merged model's outputs on unlabeled test
  inputs, summed over tasks -- and the coefficients take ``steps`` optax
  steps (Adam by default), the batches cycled; the whole loop is one
  jit-compiled ``lax.scan``. Coefficients are clamped to ``clamp`` after
  every step (None: unclamped).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    base_params: the pre-trained parameters.
    models: the K fine-tuned models.
    batches: batches passed to ``loss_fn`` (all of one shape; stacked and
      cycled inside the scan).
    granularity: ``'layer'`` (a coefficient per model and leaf) or
      ``'task'`` (one per model).
    init: initial coefficient (AdaMerging: 0.3).
    steps: optimisation steps.
    learning_rate: Adam's learning rate (AdaMerging: 1e-3).
    clamp: ``(low, high)`` applied after each step, or None.
    optimizer: an optax optimizer instead of Adam.

  Returns:
    An `AdaMergingResult`; merge with ``adamerging(result.coefficients)``.

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
      Learning", ICLR 2024. https://arxiv.org/abs/2310.02575
  """
  if granularity not in ('layer', 'task'):
    raise ValueError(f"granularity must be 'layer' or 'task', got "
                     f'{granularity!r}.')
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  batches = list(batches)
  if not batches:
    raise ValueError('fit_adamerging: no batches given.')
  k = len(models)
  c0 = jnp.full((k,), init, jnp.float32)
  if granularity == 'layer':
    c0 = jax.tree.map(lambda _: c0, base_params)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  opt = optimizer or optax.adam(learning_rate)
  models = list(models)

  def loss(c, batch):
    merged = merge_lib.merge(adamerging(c), base_params, models,
                             check_finite=False)
    return loss_fn(merged, batch)

  @jax.jit
  def run(c):
    def step(carry, i):
      c, state = carry
      batch = jax.tree.map(lambda b: b[i % len(batches)], stacked)
      value, g = jax.value_and_grad(loss)(c, batch)
      c, state = optim.optax_step(opt, g, state, c)
      if clamp is not None:
        c = jax.tree.map(lambda v: jnp.clip(v, clamp[0], clamp[1]), c)
      return (c, state), value
    (c, _), values = jax.lax.scan(step, (c, opt.init(c)), jnp.arange(steps))
    return c, values

  c, values = run(c0)
  return AdaMergingResult(c, np.asarray(values))
