"""Diagonal Fisher information of a classifier, per example, in float32."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from mergejax._src import checks

FISHER_KINDS = ('exact', 'sampled', 'empirical', 'batch_sqrt')


def _log_probs(logits_fn, params, x):
  logits = logits_fn(params, x)
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def fisher_diagonal(logits_fn: Callable[[Any, jax.Array], jax.Array],
                    params: Any, batches: Iterable[Any], *,
                    kind: str = 'exact', key: jax.Array | None = None,
                    num_examples: int | None = None) -> Any:
  """Diagonal Fisher ``F = E_x E_y [(d log p(y|x) / d theta)^2]`` of ``params``.

  Per-example gradients come from ``jax.vmap(jax.grad(...))`` over the
  examples of a batch (one compiled step per batch shape); squares accumulate
  in float32 and are divided by the number of examples.

  Args:
    logits_fn: ``logits_fn(params, x) -> [N, C]`` logits for a batch ``x``.
    params: the model's parameters (a pytree).
    batches: an iterable of ``x`` (kinds ``exact``, ``sampled``,
      ``batch_sqrt``) or ``(x, y)`` pairs with integer labels (``empirical``;
      the labels are ignored by the other kinds).
    kind: ``'exact'``: the expectation over classes, ``sum_c p_c g_c^2``
      (C backward passes per example); ``'sampled'``: one label
      ``y ~ p(y|x)`` per example (needs ``key``); ``'empirical'``: the true
      labels; ``'batch_sqrt'``: FusionBench's shortcut, the square of the
      gradient of ``sum_n sum_c sqrt(p_c) log p_c`` over a batch (``sqrt(p)``
      held constant), divided by the examples seen -- cross-example and
      cross-class terms remain, so it equals no per-example Fisher.
    key: PRNG key for ``kind='sampled'``.
    num_examples: stop after this many examples (FusionBench: 256).

  Returns:
    A pytree like ``params`` of float32 Fisher diagonals.

  Raises:
    ValueError: for an unknown ``kind``, ``sampled`` without a key,
      ``empirical`` without labels, no examples, or a NaN/Inf result.

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging",
      NeurIPS 2022. https://arxiv.org/abs/2111.09832
  """
  if kind not in FISHER_KINDS:
    raise ValueError(f'kind must be one of {FISHER_KINDS}, got {kind!r}.')
  if kind == 'sampled' and key is None:
    raise ValueError("kind='sampled' draws labels: pass key=jax.random.key(0).")
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  seen = 0
  for b, batch in enumerate(batches):
    x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
    if kind == 'empirical' and y is None:
      raise ValueError("kind='empirical' needs (x, y) batches with labels.")
    if num_examples is not None:
      x = x[:num_examples - seen]
      y = None if y is None else y[:num_examples - seen]
    n = int(x.shape[0])
    if n == 0:  # an empty batch (e.g. a ragged last split)
      continue
    bkey = None if key is None else jax.random.fold_in(key, b)
    total = _step(logits_fn, kind)(total, params, x, y, bkey)
    seen += n
    if num_examples is not None and seen >= num_examples:
      break
  if seen == 0:
    raise ValueError('fisher_diagonal: the batches hold no examples.')
  fisher = jax.tree.map(lambda t: t / seen, total)
  checks.check_finite_tree(
      fisher, 'fisher_diagonal: the Fisher diagonal',
      'the batches or the model produce NaN/Inf log-probabilities; check the '
      'inputs and the logits_fn.')
  return fisher


@functools.lru_cache(maxsize=None)
def _step(logits_fn, kind):
  # One jitted step per (logits_fn, kind): the batch loop reuses it.

  def logp(p, xi):
    return _log_probs(logits_fn, p, xi[None])[0]  # [C]

  def per_example_sq(p, xi, yi):
    g = jax.grad(lambda q: logp(q, xi)[yi])(p)
    return jax.tree.map(jnp.square, g)

  def exact_sq(p, x):
    # sum_n sum_c p_nc g_nc^2, one class at a time: each pass holds the
    # batch's per-example gradients of one class ([N, ...] per leaf), not the
    # whole per-example Jacobian ([N, C, ...]), which made the batched step
    # memory-bound and slower than a per-example loop.
    probs = jax.lax.stop_gradient(jnp.exp(_log_probs(logits_fn, p, x)))
    zero = jax.tree.map(lambda q: jnp.zeros(jnp.shape(q), jnp.float32), p)

    def one_class(c, acc):
      y = jnp.full((x.shape[0],), c, jnp.int32)
      sq = jax.vmap(per_example_sq, in_axes=(None, 0, 0))(p, x, y)
      return jax.tree.map(
          lambda a, s: a + jnp.tensordot(probs[:, c], s.astype(jnp.float32),
                                         axes=1), acc, sq)

    return jax.lax.fori_loop(0, probs.shape[-1], one_class, zero)

  @jax.jit
  def step(total, p, x, y, k):
    if kind == 'batch_sqrt':
      def surrogate(q):
        lp = _log_probs(logits_fn, q, x)
        return jnp.sum(jax.lax.stop_gradient(jnp.sqrt(jnp.exp(lp))) * lp)
      sq = jax.tree.map(jnp.square, jax.grad(surrogate)(p))
    elif kind == 'exact':
      sq = exact_sq(p, x)
    else:
      if kind == 'sampled':
        y = jax.random.categorical(k, _log_probs(logits_fn, p, x))
      sq = jax.vmap(per_example_sq, in_axes=(None, 0, 0))(p, x, y)
      sq = jax.tree.map(lambda s: jnp.sum(s, axis=0), sq)
    return jax.tree.map(lambda t, s: t + s.astype(jnp.float32), total, sq)

  return step
