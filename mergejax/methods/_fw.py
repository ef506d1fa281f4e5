"""FW-Merging: Frank-Wolfe over a pool of checkpoints.

Each iteration takes the gradient of an objective at the current merge, asks
a linear minimisation oracle for the pool member best aligned against it, and
moves the merge a step towards it (hard), or merges the per-task picks with
learned layer-wise coefficients (soft). The pool is visited one candidate at a
time -- as a ``lax.scan`` over a stacked pool in memory, or by loading one
candidate after another from the host (`CandidatePool`) -- so a pool larger
than the device memory merges in the memory of a few models.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import base as base_lib
from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import optim
from mergejax.transforms import _coefficients as coeff_lib
from mergejax.transforms import _reduce as reduce

F32 = jnp.float32
_VARIANTS = ('hard', 'soft')
_GRANULARITIES = ('task', 'layer')
_LMOS = ('cosine', 'linear')
_INITS = ('task_arithmetic', 'base')


class CandidatePool(NamedTuple):
  """A pool of ``size`` checkpoints read one at a time by ``load(i)``.

  ``load(i)`` returns candidate ``i``'s params (host arrays, e.g. read from a
  checkpoint file); FW-Merging holds one candidate on the device at a time.

  References:
    Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe
      Optimization", ICCV 2025. https://arxiv.org/abs/2503.12649
  """
  size: int
  load: Callable[[int], Any]


class FWResult(NamedTuple):
  """What `fit_fw_merging` returns.

  Attributes:
    params: the merged params, in the base model's dtypes.
    picks: per iteration, the chosen candidate index (``granularity='task'``;
      ``pool size`` is the initial merge, a hard-variant candidate) or a tree
      of per-leaf indices (``'layer'``); the soft variant gives a list of
      picks (one per objective) per iteration.
    scores: per iteration, the oracle's best alignment score (summed over
      leaves and, for the soft variant, over objectives).
    losses: per iteration, the objective at the merge before the step.
    streamed: whether candidates were loaded one at a time from the host.

  References:
    Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe
      Optimization", ICCV 2025. https://arxiv.org/abs/2503.12649
  """
  params: Any
  picks: list
  scores: np.ndarray
  losses: np.ndarray
  streamed: bool


def _tree_bytes(tree) -> int:
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
             for x in jax.tree.leaves(tree))


# --- The oracle: one candidate at a time, a running best per leaf. ---------

class _Best(NamedTuple):
  params: Any   # the best candidate's leaves so far (fp32)
  score: Any    # per-leaf best score
  index: Any    # per-leaf index of the best candidate


def _leaf_scores(grad, cand, lmo):
  def one(g, c):
    c = c.astype(F32)
    dot = jnp.vdot(g, c)
    if lmo == 'linear':
      return dot
    den = jnp.linalg.norm(g) * jnp.linalg.norm(c)
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)
  return jax.tree.map(one, grad, cand)


def _offer(best, cand, i, excluded, *, grad, lmo, granularity):
  """Offers candidate ``i`` to the running best (``excluded[leaf]``: skip)."""
  scores = _leaf_scores(grad, cand, lmo)
  if granularity == 'task':
    total = sum(jax.tree.leaves(scores))
    scores = jax.tree.map(lambda _: total, scores)
  take = jax.tree.map(lambda s, b, ex: (s < b) & ~ex[i], scores, best.score,
                      excluded)
  return _Best(
      jax.tree.map(lambda t, c, p: jnp.where(t, c.astype(F32), p), take, cand,
                   best.params),
      jax.tree.map(lambda t, s, b: jnp.where(t, s, b), take, scores,
                   best.score),
      jax.tree.map(lambda t, b: jnp.where(t, i, b), take, best.index))


def _empty_best(theta):
  return _Best(jax.tree.map(jnp.zeros_like, theta),
               jax.tree.map(lambda _: jnp.array(jnp.inf, F32), theta),
               jax.tree.map(lambda _: jnp.array(-1, jnp.int32), theta))


@functools.partial(jax.jit, static_argnames=('lmo', 'granularity'))
def _offer_jit(best, cand, i, excluded, grad, *, lmo, granularity):
  return _offer(best, cand, i, excluded, grad=grad, lmo=lmo,
                granularity=granularity)


@functools.partial(jax.jit, static_argnames=('lmo', 'granularity'))
def _scan_pool(best, stacked, excluded, grad, *, lmo, granularity):
  def body(b, args):
    cand, i = args
    return _offer(b, cand, i, excluded, grad=grad, lmo=lmo,
                  granularity=granularity), None
  n = jax.tree.leaves(stacked)[0].shape[0]
  best, _ = jax.lax.scan(body, best, (stacked, jnp.arange(n)))
  return best


class _Pool:
  """The pool as a stacked device array or as a host loader."""

  def __init__(self, pool, base_params, memory_budget):
    if isinstance(pool, CandidatePool):
      self.size = checks.static_int(pool.size, 'pool.size',
                                    owner='fit_fw_merging', low=1)
      self.load = pool.load
      self.stacked, self.streamed = None, True
      return
    pool = list(pool)
    if not pool:
      raise ValueError('fit_fw_merging: the pool is empty.')
    checks.check_models(base_params, pool, check_finite=False)
    self.size = len(pool)
    self.load = lambda i: pool[i]
    need = _tree_bytes(base_params) * len(pool)
    self.streamed = memory_budget is not None and need > memory_budget
    self.stacked = None if self.streamed else jax.tree.map(
        lambda *xs: jnp.stack(xs), *pool)

  def best(self, theta, grad, excluded, *, lmo, granularity):
    best = _empty_best(theta)
    if not self.streamed:
      return _scan_pool(best, self.stacked, excluded, grad, lmo=lmo,
                        granularity=granularity)
    for i in range(self.size):
      best = _offer_jit(best, jax.device_put(self.load(i)), jnp.int32(i),
                        excluded, grad, lmo=lmo, granularity=granularity)
    return best

  def task_arithmetic(self, base_params, lambda_):
    """``theta_0 + lambda sum_i tau_i`` over the pool (streamed if need be)."""
    if not self.streamed:
      return _stacked_task_arithmetic(base_params, self.stacked, lambda_)
    acc = jax.tree.map(lambda b: jnp.zeros(b.shape, F32), base_params)
    for i in range(self.size):
      acc = _add_tv(acc, jax.device_put(self.load(i)), base_params)
    return _axpy(_f32(base_params), acc, lambda_)


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, F32), tree)


@jax.jit
def _stacked_task_arithmetic(base_params, stacked, lambda_):
  # One fused reduction over the stacked pool: no per-model copies.
  def one(b, s):
    b = b.astype(F32)
    return b + lambda_ * jnp.sum(s.astype(F32) - b[None], axis=0)
  return jax.tree.map(one, base_params, stacked)


@jax.jit
def _add_tv(acc, cand, base_params):
  return jax.tree.map(lambda a, c, b: a + c.astype(F32) - b.astype(F32), acc,
                      cand, base_params)


@jax.jit
def _axpy(x, y, a):
  return jax.tree.map(lambda u, v: u + a * v, x, y)


@jax.jit
def _toward(theta, target, step):
  """``theta + step (target - theta)``: one Frank-Wolfe step."""
  return jax.tree.map(lambda t, c: t + step * (c - t), theta, target)


@functools.partial(jax.jit, static_argnames=('loss_fn',))
def _value_and_grad(theta, batches, *, loss_fn):
  """Mean over the objectives of ``loss_fn(theta, batch_t)``, and its gradient."""
  def total(p):
    return sum(loss_fn(p, b) for b in batches) / len(batches)
  return jax.value_and_grad(total)(theta)


def fit_fw_merging(loss_fn: Callable[[Any, Any], jax.Array], base_params: Any,
                   pool: Sequence[Any] | CandidatePool,
                   batches: Sequence[Any], *, variant: str = 'hard',
                   granularity: str = 'task', lmo: str = 'cosine',
                   steps: int = 10, step_size: float | jax.Array = 0.1,
                   scaling_factor: float | jax.Array = 0.3,
                   init: str = 'task_arithmetic',
                   ada_loss_fn: Callable[[Any, Any], jax.Array] | None = None,
                   ada_batches: Sequence[Any] | None = None,
                   ada_steps: int = 500,
                   ada_learning_rate: float | jax.Array = 1e-3,
                   ada_init: float = 0.3, ada_coeff: float = 1e-8,
                   memory_budget: int | None = None) -> FWResult:
  """Merges a pool of checkpoints by Frank-Wolfe steps (FW-Merging).

  **Hard** (FusionBench ``fw_hard``): start from task arithmetic over the
  whole pool at ``scaling_factor`` (or from the base) and add that initial
  merge to the candidates; then, ``steps`` times, take the gradient ``g`` of
  the mean of ``loss_fn(theta, batch)`` over ``batches`` (one batch per
  objective, e.g. a labeled batch per task), let the oracle pick the
  candidate minimising ``sum_leaves cos(g, theta_cand)`` (``lmo='cosine'``,
  FusionBench: cosine against the candidate's weights, leaf by leaf) or
  ``<g, theta_cand>`` (``lmo='linear'``: the exact linear minimisation over
  the pool's convex hull), per model (``granularity='task'``) or per leaf
  (``'layer'``), and step ``theta += gamma_k scaling_factor (theta_cand -
  theta)`` with ``gamma_k = 2 / (k + 2) step_size``.

  **Soft** (``fw_soft``): start from the base; each iteration picks, for each
  objective in turn, the best candidate on that objective's gradient (no
  candidate twice), then merges the picks as ``theta + sum_i c_i (pick_i -
  theta)`` with layer-wise AdaMerging coefficients ``c`` (initialised to
  ``ada_init`` in the first iteration and ``ada_coeff`` afterwards) trained
  for ``ada_steps`` Adam steps on ``ada_loss_fn`` (e.g. prediction entropy)
  summed over ``ada_batches``.

  Memory: the pool is read one candidate at a time. A list of models is
  stacked on the device and scanned (``lax.scan``), unless its size exceeds
  ``memory_budget`` bytes; then, as for a `CandidatePool`, candidates are
  copied to the device one by one and the device holds the merge, its
  gradient, the running best and one candidate (the soft variant also holds
  its picks).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the oracle's objective.
    base_params: the pre-trained params.
    pool: the candidates: a sequence of params trees, or a `CandidatePool`.
    batches: one batch per objective (the soft variant picks one candidate
      per objective).
    variant: ``'hard'`` or ``'soft'``.
    granularity: ``'task'`` (one candidate per step) or ``'layer'``.
    lmo: ``'cosine'`` (FusionBench) or ``'linear'``.
    steps: Frank-Wolfe iterations (FusionBench: 10).
    step_size: ``gamma``'s scale (traced; FusionBench: 0.1).
    scaling_factor: the hard variant's initial task-arithmetic coefficient
      and step multiplier (traced; FusionBench: 0.3).
    init: the hard variant's start, ``'task_arithmetic'`` or ``'base'``.
    ada_loss_fn: the soft variant's coefficient objective.
    ada_batches: its batches (summed).
    ada_steps: its Adam steps (FusionBench: 500).
    ada_learning_rate: its learning rate (FusionBench: 1e-3).
    ada_init: its first iteration's initial coefficient (FusionBench: 0.3).
    ada_coeff: its later iterations' initial coefficient (FusionBench: 1e-8).
    memory_budget: bytes a stacked pool may take on the device; above it the
      pool is streamed. None: always stacked.

  Returns:
    A `FWResult`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> pool = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> loss = lambda p, target: jnp.sum((p['w'] - target) ** 2)
    >>> r = mj.methods.fit_fw_merging(loss, base, pool, [jnp.array([0., 1.])],
    ...                               lmo='linear', init='base', steps=3)
    >>> r.picks
    [1, 1, 1]

  References:
    Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe
      Optimization", ICCV 2025. https://arxiv.org/abs/2503.12649
  """
  for name, value, allowed in (('variant', variant, _VARIANTS),
                               ('granularity', granularity, _GRANULARITIES),
                               ('lmo', lmo, _LMOS), ('init', init, _INITS)):
    checks.one_of(value, name, allowed, owner='fit_fw_merging')
  steps = checks.static_int(steps, 'steps', owner='fit_fw_merging', low=1)
  step_size = checks.hparam(step_size, 'step_size', low=0.0)
  scaling_factor = checks.hparam(scaling_factor, 'scaling_factor')
  batches = list(batches)
  if not batches:
    raise ValueError('fit_fw_merging: no batches given (one per objective).')
  if variant == 'soft' and (ada_loss_fn is None or not ada_batches):
    raise ValueError("fit_fw_merging: variant='soft' needs ada_loss_fn and "
                     'ada_batches (the AdaMerging objective, e.g. prediction '
                     'entropy on unlabeled inputs).')
  pool = _Pool(pool, base_params, memory_budget)
  if variant == 'soft' and len(batches) > pool.size:
    raise ValueError(f'fit_fw_merging: the soft variant picks one candidate '
                     f'per objective without repeats, but there are '
                     f'{len(batches)} objectives and {pool.size} candidates.')
  run = _hard if variant == 'hard' else _soft
  theta, picks, scores, losses = run(
      loss_fn, base_params, pool, batches, steps=steps, step_size=step_size,
      scaling_factor=scaling_factor, granularity=granularity, lmo=lmo,
      init=init, ada=(ada_loss_fn, ada_batches, ada_steps, ada_learning_rate,
                      ada_init, ada_coeff))
  params = jax.tree.map(lambda t, b: t.astype(b.dtype), theta, base_params)
  return FWResult(params, picks, np.asarray(scores), np.asarray(losses),
                  pool.streamed)


def _picked(best, granularity):
  if granularity == 'task':
    return int(jax.tree.leaves(best.index)[0])
  return jax.tree.map(int, best.index)


def _score(best, granularity):
  leaves = [float(s) for s in jax.tree.leaves(best.score)]
  return leaves[0] if granularity == 'task' else sum(leaves)


def _hard(loss_fn, base_params, pool, batches, *, steps, step_size,
          scaling_factor, granularity, lmo, init, ada):
  del ada
  theta = (pool.task_arithmetic(base_params, scaling_factor)
           if init == 'task_arithmetic' else _f32(base_params))
  initial = theta
  none = jax.tree.map(lambda _: jnp.zeros(pool.size + 1, bool), theta)
  picks, scores, losses = [], [], []
  for k in range(steps):
    value, grad = _value_and_grad(theta, batches, loss_fn=loss_fn)
    best = pool.best(theta, grad, none, lmo=lmo, granularity=granularity)
    # The initial merge is a candidate too (index pool.size).
    best = _offer_jit(best, initial, jnp.int32(pool.size), none, grad,
                      lmo=lmo, granularity=granularity)
    gamma = 2.0 / (k + 2.0) * step_size
    theta = _toward(theta, best.params, gamma * scaling_factor)
    picks.append(_picked(best, granularity))
    scores.append(_score(best, granularity))
    losses.append(float(value))
  return theta, picks, scores, losses


def _soft(loss_fn, base_params, pool, batches, *, steps, step_size,
          scaling_factor, granularity, lmo, init, ada):
  del step_size, scaling_factor, init
  ada_loss_fn, ada_batches, ada_steps, ada_lr, ada_init, ada_coeff = ada
  ada_batches = list(ada_batches)
  ada_steps = checks.static_int(ada_steps, 'ada_steps',
                                owner='fit_fw_merging', low=1)
  ada_lr = checks.hparam(ada_lr, 'ada_learning_rate', low=0.0,
                         low_inclusive=False)
  theta = _f32(base_params)
  picks, scores, losses = [], [], []
  for k in range(steps):
    excluded = jax.tree.map(lambda _: jnp.zeros(pool.size, bool), theta)
    chosen, step_picks, step_score, step_loss = [], [], 0.0, 0.0
    for batch in batches:
      value, grad = _value_and_grad(theta, [batch], loss_fn=loss_fn)
      best = pool.best(theta, grad, excluded, lmo=lmo,
                       granularity=granularity)
      excluded = jax.tree.map(lambda ex, i: ex.at[i].set(True), excluded,
                              best.index)
      chosen.append(best.params)
      step_picks.append(_picked(best, granularity))
      step_score += _score(best, granularity)
      step_loss += float(value) / len(batches)
    c0 = jnp.full((len(chosen),), ada_init if k == 0 else ada_coeff, F32)
    c0 = jax.tree.map(lambda _: c0, theta)
    coeffs = _fit_coefficients(theta, chosen, c0, ada_batches, ada_lr,
                               loss_fn=ada_loss_fn, steps=ada_steps)
    theta = _f32(_combine(theta, chosen, coeffs))
    picks.append(step_picks)
    scores.append(step_score)
    losses.append(step_loss)
  return theta, picks, scores, losses


def _combine(theta, chosen, coeffs):
  return merge_lib.merge(base_lib.chain(
      reduce.task_vectors(), coeff_lib.coefficient_sum(coeffs),
      reduce.apply_to_base()), theta, chosen, check_finite=False)


@functools.partial(jax.jit, static_argnames=('loss_fn', 'steps'))
def _fit_coefficients(theta, chosen, c0, batches, lr, *, loss_fn, steps):
  """Layer-wise AdaMerging of ``chosen`` around ``theta``: Adam on the loss."""
  opt = optax.adam(lr)

  def loss(c):
    merged = _combine(theta, chosen, c)
    return sum(loss_fn(merged, b) for b in batches)

  def step(carry, _):
    c, s = carry
    g = jax.grad(loss)(c)
    return optim.optax_step(opt, g, s, c), None

  (c, _), _ = jax.lax.scan(step, (c0, opt.init(c0)), None, length=steps)
  return c
