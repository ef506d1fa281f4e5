"""Metrics-weighted averaging (MWA) of the checkpoints of one training run.

The checkpoints ``theta_1 .. theta_T`` saved along one run are averaged with
weights from a training metric and one penalty factor ``p``::

    kind='step':  w_t = step_t^p     / sum_s step_s^p     (later, more)
    kind='loss':  w_t = loss_t^(-p)  / sum_s loss_s^(-p)  (lower loss, more)
    theta = sum_t w_t theta_t

``p = 0`` is the uniform average; as ``p`` grows the weight moves to the last
(``'step'``) or the lowest-loss (``'loss'``) checkpoint. The weights are
computed in log space, ``w = softmax(+-p log metric)``, so any ``p`` is finite
and exact. Offline (`mwa`, a `MergeTransformation` over saved checkpoints) and
online (`mwa_tracker`, `mwa_optax`: a running weighted mean kept during
training in the memory of one extra copy of the parameters) give the same
model.

The paper is known here only from its abstract (weights from the training
loss or step, one penalty factor whatever the number of checkpoints, LoRA
checkpoints, up to +5 % over the uniform average); the power-law formula
above is this library's design and may differ from the authors'.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax.transforms import _lora as lora_lib


def _check_kind(kind: Any, owner: str) -> str:
  return checks.one_of(kind, 'kind', {'step': 'weights step^penalty',
                                      'loss': 'weights loss^-penalty'},
                       owner=owner)


def _check_lora(lora: Any, owner: str) -> str:
  return checks.one_of(
      lora, 'lora', {'delta': "average the adapters' products a @ b, exact",
                     'factors': 'average a and b separately'}, owner=owner)


def _metric(metric: Any, kind: str, owner: str) -> jax.Array:
  """The metric as float32 ``[T]``, checked positive and finite."""
  if isinstance(metric, (str, bytes)) or metric is None:
    raise TypeError(f'{owner}: metric must be one number per checkpoint, got '
                    f'{metric!r}.')
  m = jnp.asarray(metric, dtype=jnp.float32)
  if m.ndim != 1 or m.shape[0] == 0:
    raise ValueError(f'{owner}: metric must hold one value per checkpoint, '
                     f'shape (T,) with T >= 1, got shape {tuple(m.shape)}.')
  what = 'losses' if kind == 'loss' else 'steps'
  if checks.is_concrete(m):
    v = np.asarray(m)
    bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
    if bad.size:
      i = int(bad[0])
      fix = ('a loss weighs loss^-penalty, so it must be > 0, as cross-entropy '
             'and MSE are; a metric that can be zero or negative (a '
             'log-likelihood, a reward) is not a loss: shift it above zero '
             'first'
             if kind == 'loss' else
             'a step weighs step^penalty, so steps must be > 0: count them '
             'from 1')
      raise ValueError(f"{owner}: kind={kind!r} needs positive, finite {what}, "
                       f'but checkpoint {i} has {float(v[i])!r}: {fix}.')
  # Traced metrics (inside jit/vmap) are checked when the computation runs.
  return checks.hparam(m, f'{owner} {what} (kind={kind!r})', low=0.0,
                       low_inclusive=False)


def _penalty(penalty: Any, owner: str) -> jax.Array:
  p = checks.hparam(penalty, 'penalty', low=0.0)
  if p.ndim != 0:
    raise ValueError(f'{owner}: penalty must be a scalar (vmap over a grid '
                     f'of penalties instead), got shape {tuple(p.shape)}.')
  return p


def _log_weight(metric: jax.Array, penalty: jax.Array, kind: str) -> jax.Array:
  sign = 1.0 if kind == 'step' else -1.0
  return jnp.float32(sign) * penalty * jnp.log(metric)


def mwa_weights(metric: Any, *, kind: str, penalty: float | jax.Array = 1.0
                ) -> jax.Array:
  """MWA weights of T checkpoints: ``step^p`` or ``loss^-p``, normalised.

  ``w = softmax(p log step)`` for ``kind='step'`` and ``softmax(-p log loss)``
  for ``kind='loss'``: ``p = 0`` gives ``1 / T`` each; a large ``p`` puts all
  the weight on the largest step or the smallest loss (split evenly on ties).
  Computed in log space, so no power overflows.

  Args:
    metric: ``[T]`` training steps or training losses of the checkpoints, all
      positive (may be traced).
    kind: ``'step'`` (later checkpoints weigh more) or ``'loss'`` (lower loss
      weighs more).
    penalty: the penalty factor ``p >= 0`` (traced, so a sweep vmaps in one
      compile).

  Returns:
    ``[T]`` float32 weights that sum to 1.

  Raises:
    ValueError: for an unknown ``kind``, a metric that is not 1-D and
      non-empty, a non-positive or non-finite step or loss, or a negative or
      non-scalar penalty.

  Example:
    >>> import mergejax as mj
    >>> mj.methods.mwa_weights([1., 2., 4.], kind='loss', penalty=1.0)
    Array([0.5714..., 0.2857..., 0.1428...], dtype=float32)
    >>> mj.methods.mwa_weights([10, 20], kind='step', penalty=0.0)
    Array([0.5, 0.5], dtype=float32)

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  return _weights(metric, kind, penalty, 'mwa_weights')


def _weights(metric, kind, penalty, owner):
  kind = _check_kind(kind, owner)
  m = _metric(metric, kind, owner)
  p = _penalty(penalty, owner)
  return jax.nn.softmax(_log_weight(m, p, kind))


class MWAState(NamedTuple):
  """State of `mwa`: the checkpoints' weights ``[T]``, summing to 1.

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  weights: jax.Array


def mwa(metric: Any, *, kind: str, penalty: float | jax.Array = 1.0,
        lora: str = 'delta') -> base.MergeTransformation:
  """Metrics-weighted average of the checkpoints of one run.

  ``theta = sum_t w_t theta_t`` with ``w = mwa_weights(metric, kind=kind,
  penalty=penalty)``, the reducing step over the model axis (one model per
  checkpoint, in the order of ``metric``). The weights sum to 1, so
  ``sum_t w_t theta_t = b + sum_t w_t (theta_t - b)`` for any ``b``: the base
  plays no part, as in `linear`; merge with ``base=None`` or any reference
  (the first checkpoint, the pre-trained model), which only fixes the output
  dtypes.

  LoRA adapters (trees with `mergejax.transforms.LoRA` nodes, run through
  `mergejax.transforms.merge_lora`): the average of the checkpoints' updates
  is ``sum_t w_t a_t b_t``, which is *not* ``(sum_t w_t a_t)(sum_t w_t b_t)``
  (the product of averaged factors adds cross terms ``w_s w_t a_s b_t``).
  ``lora='delta'`` (default) returns the exact average as a dense
  ``(in, out)`` delta in place of each LoRA node (add it to the base kernel;
  `mergejax.methods.lora_svd` with the same weights and ``rank = min(T r,
  in, out)`` gives it back exactly as factors). ``lora='factors'`` averages
  ``a`` and ``b`` separately, which is what averaging adapter checkpoint
  files does; it keeps the adapter's shapes and also runs through
  `mergejax.merge`. Dense leaves
  (e.g. a trained head's delta) get ``sum_t w_t x_t`` in both modes.

  The power-law weights are this library's design (the paper's exact formula
  is not known here); see the module docstring.

  Args:
    metric: ``[T]`` positive training steps or losses, one per checkpoint.
    kind: ``'step'`` (``w ~ step^p``) or ``'loss'`` (``w ~ loss^-p``).
    penalty: ``p >= 0`` (traced: a penalty sweep vmaps in one compile).
      0 is the uniform average; large ``p`` the last / lowest-loss
      checkpoint.
    lora: ``'delta'`` or ``'factors'``, for LoRA nodes (see above).

  Returns:
    A `MergeTransformation` whose state is `MWAState` (the weights).

  Raises:
    ValueError: as `mwa_weights`; for an unknown ``lora``; and, when merging,
      if the number of checkpoints differs from the length of ``metric``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> ckpts = [{'w': jnp.array([0.])}, {'w': jnp.array([3.])}]
    >>> mj.merge(mj.methods.mwa([2., 1.], kind='loss', penalty=1.0), None,
    ...          ckpts)['w']
    Array([2.], dtype=float32)

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  lora = _check_lora(lora, 'mwa')
  w = _weights(metric, kind, penalty, 'mwa')
  return base.MergeTransformation(
      lambda params: MWAState(w),
      base.static_fn.of(_mwa_update, lora=lora))


def _mwa_update(updates, state, params=None, *, key=None, lora):
  del params, key
  nodes, treedef = jax.tree.flatten(updates, is_leaf=lora_lib.is_lora)
  k = (nodes[0].a if lora_lib.is_lora(nodes[0]) else nodes[0]).shape[0]
  w = state.weights
  if w.shape != (k,):
    raise ValueError(f'mwa: metric has {w.shape[0]} values but {k} '
                     'checkpoints were given: pass one step or loss per '
                     'checkpoint, in the same order.')

  def one(x):
    if not lora_lib.is_lora(x):
      return modelaxis.model_sum(x, w)
    if lora == 'factors':
      return lora_lib.LoRA(modelaxis.model_sum(x.a, w),
                           modelaxis.model_sum(x.b, w))
    return _weighted_delta(x.a, x.b, w)

  return jax.tree.unflatten(treedef, [one(x) for x in nodes]), state


def _weighted_delta(a, b, w):
  """``sum_t w_t a_t @ b_t`` as one ``(in, T r) @ (T r, out)`` product."""
  k, n_in, r = a.shape
  aw = a * w.astype(a.dtype)[:, None, None]
  a_cat = jnp.transpose(aw, (1, 0, 2)).reshape(n_in, k * r)
  return a_cat @ b.reshape(k * r, b.shape[-1])


def _summand(lora: str) -> Callable[[Any], Any]:
  """What the running mean averages: the params, or their LoRA deltas."""
  def f(params):
    def one(x):
      if lora_lib.is_lora(x):
        if lora == 'delta':
          return x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)
        return lora_lib.LoRA(x.a.astype(jnp.float32), x.b.astype(jnp.float32))
      return jnp.asarray(x).astype(jnp.float32)
    return jax.tree.map(one, params, is_leaf=lora_lib.is_lora)
  return f


class MWATrackerState(NamedTuple):
  """The running merge of `mwa_tracker`.

  Attributes:
    count: checkpoints recorded so far (int32).
    log_total: ``log sum_t w_t`` of the unnormalised weights (``-inf`` before
      the first checkpoint).
    merged: ``sum_t w_t theta_t / sum_t w_t`` over the recorded checkpoints
      (float32; dense deltas in place of LoRA nodes for ``lora='delta'``).
    penalty: the penalty factor (traced).

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  count: jax.Array
  log_total: jax.Array
  merged: Any
  penalty: jax.Array


class MWATracker(NamedTuple):
  """Pure ``init(params)`` and ``update(state, params, metric=None)``.

  Both return a new `MWATrackerState`; the merged model is
  ``state.merged``.

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  init: Callable[..., MWATrackerState]
  update: Callable[..., MWATrackerState]


def mwa_tracker(penalty: float | jax.Array = 1.0, *, kind: str,
                lora: str = 'delta') -> MWATracker:
  """The MWA merge kept during training, in one extra copy of the params.

  ``update(state, params, metric)`` records one checkpoint: with its log
  weight ``l = +-p log metric`` it keeps the weighted mean ``m`` and the log
  weight total ``L`` as

      L' = logaddexp(L, l),   m' = m + exp(l - L') (theta - m)

  which is exactly ``sum_t w_t theta_t / sum_t w_t`` after every update, for
  any ``p`` (the raw sums ``sum_t w_t theta_t`` would overflow float32 for
  large ``p``). After T updates ``state.merged`` equals the offline
  ``mwa(metrics, kind=kind, penalty=penalty)`` of the same T checkpoints, up
  to rounding. Call it at each checkpoint (every N steps), with the params
  after the step.

  ``metric``: for ``kind='loss'`` the checkpoint's training loss (required;
  e.g. the mean minibatch loss since the last checkpoint, as trainers log
  it). For ``kind='step'`` the step; None uses the number of checkpoints
  recorded, ``count + 1``, which gives the same weights as the true steps
  whenever checkpoints are evenly spaced from step ``N`` (``(N t)^p`` and
  ``t^p`` normalise alike). Metrics are checked positive as in
  `mwa_weights` (traced ones when the computation runs).

  LoRA adapters: ``lora='delta'`` averages the products ``a @ b`` (exact,
  dense ``(in, out)`` memory per LoRA leaf); ``lora='factors'`` averages the
  factors (adapter-sized memory; not the average of the updates, see `mwa`).

  Args:
    penalty: ``p >= 0``, stored in the state (traced: ``jax.vmap`` the
      factory and ``init`` over a grid of penalties to track them all).
    kind: ``'step'`` or ``'loss'``.
    lora: ``'delta'`` or ``'factors'``, for LoRA nodes.

  Returns:
    An `MWATracker` whose state is `MWATrackerState`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tr = mj.methods.mwa_tracker(1.0, kind='loss')
    >>> s = tr.init({'w': jnp.zeros(1)})
    >>> s = tr.update(s, {'w': jnp.array([0.])}, 2.0)
    >>> s = tr.update(s, {'w': jnp.array([3.])}, 1.0)
    >>> s.merged['w']
    Array([2.], dtype=float32)

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  kind = _check_kind(kind, 'mwa_tracker')
  lora = _check_lora(lora, 'mwa_tracker')
  p = _penalty(penalty, 'mwa_tracker')
  summand = _summand(lora)

  def init(params):
    return MWATrackerState(
        count=jnp.zeros((), jnp.int32),
        log_total=jnp.full((), -jnp.inf, jnp.float32),
        merged=jax.tree.map(jnp.zeros_like, summand(params)), penalty=p)

  def update(state, params, metric=None):
    if metric is None:
      if kind == 'loss':
        raise ValueError("mwa_tracker: kind='loss' needs the checkpoint's "
                         'training loss: update(state, params, loss).')
      metric = (state.count + 1).astype(jnp.float32)
    m = _metric(jnp.reshape(jnp.asarray(metric, jnp.float32), (1,)), kind,
                'mwa_tracker')[0]
    lw = _log_weight(m, state.penalty, kind)
    total = jnp.logaddexp(state.log_total, lw)
    c = jnp.exp(lw - total)  # 1 at the first checkpoint
    merged = jax.tree.map(lambda acc, x: acc + c * (x - acc), state.merged,
                          summand(params))
    return MWATrackerState(state.count + 1, total, merged, state.penalty)

  return MWATracker(init, update)


class MWAOptaxState(NamedTuple):
  """State of `mwa_optax`: the optimizer steps taken and the running merge.

  Attributes:
    step: optimizer steps taken (int32).
    tracker: the `MWATrackerState`; the merged model is ``tracker.merged``.

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  step: jax.Array
  tracker: MWATrackerState


def mwa_optax(penalty: float | jax.Array = 1.0, *, kind: str, every: int = 1,
              lora: str = 'delta'):
  """`mwa_tracker` as an optax transformation, to put last in a chain.

  ``optax.chain(opt, mwa_optax(p, kind=..., every=N))`` passes the updates
  through unchanged and, every ``N``-th step, records the new params
  ``params + updates`` as a checkpoint with step ``N t`` (``kind='step'``) or
  the loss given as optax's ``value`` extra argument (``kind='loss'``,
  ``opt.update(grads, state, params, value=loss)``: the minibatch loss of
  that step). The merged model is the last state's ``tracker.merged``, e.g.
  ``optax.tree_utils.tree_get(opt_state, 'tracker').merged``.

  Args:
    penalty: ``p >= 0`` (traced).
    kind: ``'step'`` or ``'loss'``.
    every: record every ``every``-th step (static int >= 1).
    lora: ``'delta'`` or ``'factors'``, for LoRA nodes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with `MWAOptaxState`.

  Example:
    >>> import jax.numpy as jnp, optax, mergejax as mj
    >>> opt = optax.chain(optax.sgd(1.0), mj.methods.mwa_optax(0., kind='step'))
    >>> params = {'w': jnp.zeros(1)}
    >>> state = opt.init(params)
    >>> for g in (-2., -2.):
    ...   upd, state = opt.update({'w': jnp.array([g])}, state, params)
    ...   params = optax.apply_updates(params, upd)
    >>> optax.tree_utils.tree_get(state, 'tracker').merged['w']  # mean of 2, 4
    Array([3.], dtype=float32)

  References:
    Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
      Averaging", 2025. https://arxiv.org/abs/2504.18580
  """
  import optax  # pylint: disable=g-import-not-at-top
  every = checks.static_int(every, 'every', owner='mwa_optax', low=1)
  tracker = mwa_tracker(penalty, kind=kind, lora=lora)

  def init(params):
    return MWAOptaxState(jnp.zeros((), jnp.int32), tracker.init(params))

  def update(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('mwa_optax: needs params (opt.update(grads, state, '
                       'params)) to record params + updates.')
    if kind == 'loss' and value is None:
      raise ValueError("mwa_optax: kind='loss' needs the loss as optax's "
                       'value extra argument: opt.update(grads, state, '
                       'params, value=loss).')
    step = state.step + 1
    # Leaf by leaf, so LoRA nodes stay factor pairs (a + da, b + db).
    new_params = jax.tree.map(
        lambda p, u: p.astype(jnp.float32) + u.astype(jnp.float32), params,
        updates)
    metric = step.astype(jnp.float32) if kind == 'step' else value
    tr = jax.lax.cond(step % every == 0,
                      lambda s: tracker.update(s, new_params, metric),
                      lambda s: s, state.tracker)
    return updates, MWAOptaxState(step, tr)

  return optax.GradientTransformationExtraArgs(init, update)
