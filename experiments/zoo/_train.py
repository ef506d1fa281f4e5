"""Training the zoo: a base model and K fine-tunes (vmapped), optax + tqdm."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.tools import progress
from experiments.zoo import _data
from experiments.zoo import _models

Params = Any


class Zoo(NamedTuple):
  """A trained zoo.

  Attributes:
    base: the base model's params ``{'backbone': ..., 'head': ...}``.
    finetuned: the K fine-tunes, stacked: every leaf has a leading axis K.
    second_moments: the backbone's Adam second moments at the end of each
      fine-tune, stacked like ``finetuned['backbone']`` (None if not kept).
  """
  base: Params
  finetuned: Params
  second_moments: Params = None

  def model(self, i: int) -> Params:
    return jax.tree.map(lambda x: x[i], self.finetuned)

  @property
  def num_models(self) -> int:
    return jax.tree.leaves(self.finetuned)[0].shape[0]


def _loss(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit(model, params, opt, x, y, key, *, steps, batch_size, chunk, desc,
         show, num_models=None):
  """Minibatch training in jitted chunks of ``chunk`` steps (lax.scan).

  With ``num_models`` the params/data carry a leading model axis and all models
  train at once under ``jax.vmap`` (same step count, independent batches).
  """

  def step(carry, k):
    p, s, xx, yy = carry
    idx = jax.random.randint(k, (batch_size,), 0, xx.shape[0])
    loss, g = jax.value_and_grad(lambda q: _loss(model, q, xx[idx], yy[idx]))(p)
    # optax mixes Python floats with int32 step counts (strict dtype
    # promotion, as in the tests, rejects it).
    with jax.numpy_dtype_promotion('standard'):
      upd, s = opt.update(g, s, p)
    return (optax.apply_updates(p, upd), s, xx, yy), loss

  def run(p, s, xx, yy, keys):
    (p, s, _, _), losses = jax.lax.scan(step, (p, s, xx, yy), keys)
    return p, s, losses[-1]

  if num_models is None:
    run_chunk = jax.jit(run)
    state = opt.init(params)
  else:
    run_chunk = jax.jit(jax.vmap(run, in_axes=(0, 0, 0, 0, 1)))
    state = jax.vmap(opt.init)(params)
  x, y = jnp.asarray(x), jnp.asarray(y)
  done, loss = 0, None
  # Shown in terminals and notebooks only (see experiments.tools.progress), so
  # non-interactive logs stay clean; show=True/False forces it on/off.
  with progress.bar(steps, desc=desc, enable=show, leave=False) as bar:
    for k in jax.random.split(key, -(-steps // chunk)):
      n = min(chunk, steps - done)
      keys = jax.random.split(k, n if num_models is None else (n, num_models))
      params, state, loss = run_chunk(params, state, x, y, keys)
      done += n
      bar.update(n)
      bar.set_postfix(loss=float(jnp.mean(loss)))
  return params, float(jnp.mean(loss)), state


def _adam(lr, steps, weight_decay):
  sched = optax.cosine_decay_schedule(lr, steps)
  return optax.adamw(sched, weight_decay=weight_decay)


def train_base(model: _models.Classifier, digits: _data.Digits, key: jax.Array,
               *, steps: int, batch_size: int, lr: float, weight_decay: float,
               augment_copies: int, augment: dict | None = None,
               chunk: int = 100, show: bool | None = None) -> Params:
  """Trains the base on the pre-training split under generic augmentations.

  ``augment_copies`` augmented copies of the pre-training images are drawn once
  (keyed), so training itself is one jitted scan per chunk.
  """
  k_init, k_aug, k_fit = jax.random.split(key, 3)
  pre = digits.pretrain
  xs = [pre.x] + [_data.augment(pre.x, k, **(augment or {}))
                  for k in jax.random.split(k_aug, augment_copies)]
  x = np.concatenate(xs)
  y = np.tile(pre.y, augment_copies + 1)
  params = _models.init_params(model, k_init)
  params, _, _ = _fit(model, params, _adam(lr, steps, weight_decay), x, y,
                      k_fit,
                   steps=steps, batch_size=batch_size, chunk=chunk,
                   desc='base model', show=show)
  return params


def finetune(model: _models.Classifier, base: Params,
             tasks: Sequence[_data.Task], key: jax.Array, *, steps: int,
             batch_size: int, lr: float, head_lr: float, weight_decay: float,
             fresh_head: bool, chunk: int = 100, show: bool | None = None,
             return_second_moments: bool = False) -> Params:
  """Fine-tunes the base on every task at once (``jax.vmap`` over tasks).

  Every fine-tune starts from the base backbone; its head starts from the
  base's head, or from a fresh initialisation if ``fresh_head``. The backbone
  and the head have their own learning rates.

  Returns:
    The K fine-tuned params, stacked along a leading axis; with
    ``return_second_moments`` also the backbone's Adam second moments
    ``nu`` at the end of training, stacked the same way.
  """
  k = len(tasks)
  k_head, k_fit = jax.random.split(key)
  stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), base)
  if fresh_head:
    heads = jax.vmap(lambda kk: _models.init_params(model, kk)['head'])(
        jax.random.split(k_head, k))
    stacked = {**stacked, 'head': heads}
  opt = optax.partition(
      {'backbone': _adam(lr, steps, weight_decay),
       'head': _adam(head_lr, steps, weight_decay)},
      lambda p: {n: jax.tree.map(lambda _, n=n: n, p[n]) for n in p})
  x = np.stack([t.train.x for t in tasks])
  y = np.stack([t.train.y for t in tasks])
  params, _, state = _fit(model, stacked, opt, x, y, k_fit, steps=steps,
                          batch_size=batch_size, chunk=chunk,
                          desc=f'{k} fine-tunes', show=show, num_models=k)
  if not return_second_moments:
    return params
  # Adam's second moments of the backbone, stacked like the params: what
  # curvature-aware merges (mergejax.methods.ota) read.
  nus = [v for path, v in optax.tree_utils.tree_get_all_with_path(state, 'nu')
         if 'backbone' in jax.tree_util.keystr(path)]
  if len(nus) != 1:
    raise ValueError(f'expected one backbone Adam state, found {len(nus)}.')
  return params, nus[0]['backbone']


def load_or_train(path: str, train_fn, abstract: Params) -> tuple[Params, bool]:
  """Restores a pytree checkpointed at ``path`` with orbax, or trains and saves it.

  Orbax writes into a temporary directory and renames it to ``path`` when the
  write is complete, so ``path`` exists only for a whole checkpoint: an
  interrupted run leaves no half-written cache behind, and the next run simply
  trains again.

  Args:
    path: the checkpoint directory (e.g. ``workdir/zoo/<config hash>``).
    train_fn: ``() -> pytree``, called only when there is no checkpoint.
    abstract: the pytree's structure as ``jax.ShapeDtypeStruct`` leaves.

  Returns:
    ``(tree, cached)``: the pytree, and whether it came from the cache.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      abstract)
  with ocp.StandardCheckpointer() as ckptr:
    if os.path.isdir(path):
      return ckptr.restore(path, abstract), True
    tree = train_fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
      ckptr.save(path, tree)
      ckptr.wait_until_finished()
    except ValueError:
      # Another run finished the same checkpoint first: keep theirs.
      if not os.path.isdir(path):
        raise
  return tree, False
