"""Decentralized SGD on non-iid digits shards, and one global merge at the end.

``config.workers`` workers split scikit-learn's 8x8 digits training images
by a Dirichlet label skew (concentration ``config.alpha``: with 0.1 about
three classes make up most of a shard, see the notes) and each trains one
MLP (``config.width`` units, ``config.depth`` layers) from a shared random
initialisation with SGD and momentum, ``config.batch_size`` images per
worker and step. All workers run in one jitted ``lax.scan``, vmapped over
the worker axis; after a step a worker may average its parameters with
others, ``theta <- W theta``, by the schedule's mixing matrix:

* ``ring``: each worker with its two neighbours, weights 1/3 each;
* ``pairs``: a fresh random perfect matching each round, weights 1/2;
* ``complete``: all workers (``W = 1/N``), i.e. server-style averaging;
* ``none``: local training only.

Every schedule and topology is data (a ``[steps, N, N]`` stack of mixing
matrices, the identity on silent steps), so one compiled program runs them
all. Reported on the test split: the mean (and worst) accuracy of the
individual workers, the accuracy of the single global merge of all workers
at the end (`mergejax.methods.average`), and the consensus distance
``sum_i ||theta_i - theta_bar||^2 / (N ||theta_bar||^2)``. Baselines:
server-style full averaging every step, and centralized SGD on the pooled
data with the same total batch. ``decentralized.png`` shows the accuracy of
the workers (mean) and of their merge along training.

References:
  Zhu et al., "On the Surprising Effectiveness of a Single Global Merging in
    Decentralized Learning", ICLR 2026. https://arxiv.org/abs/2507.06542
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mergejax as mj
from experiments import zoo
from experiments.tools import plotting
from experiments.tools import results as results_lib


def dirichlet_shards(y: np.ndarray, workers: int, alpha: float,
                     rng: np.random.Generator, *, min_size: int = 1,
                     tries: int = 1000) -> list[np.ndarray]:
  """Splits indices of ``y`` among workers with Dirichlet(alpha) label skew.

  Each class's images are divided among the workers in proportions drawn
  from ``Dirichlet(alpha 1_N)``; the draw is repeated until every shard has
  ``min_size`` images.

  Raises:
    ValueError: if no draw in ``tries`` gives every shard ``min_size``.
  """
  classes = np.unique(y)
  for _ in range(tries):
    shards = [[] for _ in range(workers)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(y == c))
      cuts = (np.cumsum(rng.dirichlet(alpha * np.ones(workers)))[:-1]
              * len(idx)).astype(int)
      for w, part in enumerate(np.split(idx, cuts)):
        shards[w].extend(part.tolist())
    if min(len(s) for s in shards) >= min_size:
      return [np.sort(np.asarray(s, np.int64)) for s in shards]
  raise ValueError(f'dirichlet_shards: no partition of {len(y)} images among '
                   f'{workers} workers gave every shard {min_size} images in '
                   f'{tries} draws; lower min_size or raise alpha.')


def mixing_matrices(topology: str, phases, steps: int, workers: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """``([steps, N, N] mixing matrices, gossip rounds)`` of one schedule.

  Step ``t`` (1-based) gossips when ``t`` is a multiple of the ``every`` of
  the phase it falls in; other steps get the identity.
  """
  eye = np.eye(workers, dtype=np.float32)
  if topology == 'ring':
    ring = np.zeros((workers, workers), np.float32)
    for i in range(workers):
      for j in (i - 1, i, i + 1):
        ring[i, j % workers] += 1.0 / 3.0
  elif topology not in ('none', 'pairs', 'complete'):
    raise ValueError(f"Unknown topology {topology!r}: use 'none', 'ring', "
                     "'pairs' or 'complete'.")
  mats = np.broadcast_to(eye, (steps, workers, workers)).copy()
  rounds = 0
  if topology == 'none':
    return mats, 0
  start = 0
  for end_frac, every in phases:
    end = int(round(end_frac * steps))
    for t in range(start + 1, end + 1):
      if t % every:
        continue
      rounds += 1
      if topology == 'ring':
        mats[t - 1] = ring
      elif topology == 'complete':
        mats[t - 1] = 1.0 / workers
      else:  # a random perfect matching (one worker idles if N is odd)
        perm = rng.permutation(workers)
        w = eye.copy()
        for a, b in zip(perm[0::2], perm[1::2]):
          w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        mats[t - 1] = w
    start = end
  return mats, rounds


def _loss(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=('model', 'batch_size'))
def _train_chunk(model, params, mom, xs, ys, counts, mats, keys, *, lr,
                 momentum, batch_size):
  """``len(keys)`` steps of decentralized SGD of all workers at once.

  ``params``/``mom``: ``[N, ...]``; ``xs``/``ys``: padded shards ``[N, n_max,
  ...]`` with ``counts [N]`` real images; ``mats [S, N, N]``; ``keys [S]``.
  """
  n = counts.shape[0]

  def grads(p, x, y, c, k):
    # Uniform over the worker's own images (the padding is never drawn).
    idx = jnp.floor(jax.random.uniform(k, (batch_size,)) *
                    c.astype(jnp.float32)).astype(jnp.int32)
    return jax.grad(lambda q: _loss(model, q, x[idx], y[idx]))(p)

  def step(carry, inp):
    p, m = carry
    w, k = inp
    g = jax.vmap(grads)(p, xs, ys, counts, jax.random.split(k, n))
    m = jax.tree.map(lambda a, b: momentum * a + b, m, g)
    p = jax.tree.map(lambda a, b: a - lr * b, p, m)
    # Gossip: theta_i <- sum_j W_ij theta_j (W = I on silent steps).
    p = jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), p)
    return (p, m), None

  (params, mom), _ = jax.lax.scan(step, (params, mom), (mats, keys))
  return params, mom


@functools.partial(jax.jit, static_argnames=('model',))
def _evaluate(model, params, x, y):
  """Worker accuracies ``[N]``, the mean model's accuracy and the consensus
  distance (relative)."""
  accs = jax.vmap(lambda p: _accuracy(model, p, x, y))(params)
  mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), params)
  dist = sum(jnp.sum(jnp.square(a - b[None])) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(mean)))
  norm = sum(jnp.sum(jnp.square(b)) for b in jax.tree.leaves(mean))
  return accs, _accuracy(model, mean, x, y), dist / (accs.shape[0] * norm)


def _pad_shards(x, y, shards):
  n_max = max(len(s) for s in shards)
  xs = np.zeros((len(shards), n_max) + x.shape[1:], np.float32)
  ys = np.zeros((len(shards), n_max), np.int32)
  for i, s in enumerate(shards):
    xs[i, :len(s)], ys[i, :len(s)] = x[s], y[s]
  counts = np.asarray([len(s) for s in shards], np.int32)
  return jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(counts)


def _run(config, model, init, data, mats, key, curve_label, curves):
  """Trains all workers on one schedule; returns the final worker params."""
  xs, ys, counts = data['shards']
  n = int(counts.shape[0])
  params = jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), init)
  mom = jax.tree.map(jnp.zeros_like, params)
  mats = jnp.asarray(mats)
  for start in range(0, config.steps, config.eval_every):
    stop = min(start + config.eval_every, config.steps)
    keys = jax.random.split(jax.random.fold_in(key, start), stop - start)
    params, mom = _train_chunk(model, params, mom, xs, ys, counts,
                               mats[start:stop], keys, lr=config.lr,
                               momentum=config.momentum,
                               batch_size=config.batch_size)
    accs, merged, dist = _evaluate(model, params, *data['test'])
    curves.append(dict(schedule=curve_label, step=stop,
                       worker_mean=float(jnp.mean(accs)),
                       global_merge=float(merged),
                       consensus_distance=float(dist)))
  return params


def _plot(path, curves):
  plt = plotting._plt()  # pylint: disable=protected-access
  labels = list(dict.fromkeys(c['schedule'] for c in curves))
  cols = plotting.colors(labels)
  fig, ax = plt.subplots(figsize=(11.0, 4.5))
  for label in labels:
    pts = [c for c in curves if c['schedule'] == label]
    steps = [c['step'] for c in pts]
    ax.plot(steps, [c['global_merge'] for c in pts], '-', color=cols[label],
            label=f'{label}: global merge')
    if 'centralized' not in label:
      ax.plot(steps, [c['worker_mean'] for c in pts], ':', color=cols[label],
              label=f'{label}: workers (mean)')
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy')
  ax.set_title('Decentralized SGD: individual workers vs one global merge')
  ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


CENTRAL = 'centralized SGD (pooled data)'


def _repeat(config, seed: int, curves: list) -> tuple[dict, dict]:
  """One repeat: ``({schedule: metrics}, shard statistics)``."""
  key = jax.random.key(seed)
  k_data, k_init, k_train = jax.random.split(key, 3)
  rng = np.random.default_rng(seed)
  digits = zoo.load_digits(k_data, **config.data.to_dict())
  x, y = digits.train.x, digits.train.y
  shards = dirichlet_shards(y, config.workers, config.alpha, rng,
                            min_size=config.min_shard)
  model = zoo.Classifier(width=config.width, depth=config.depth)
  init = zoo.init_params(model, k_init)
  test = (jnp.asarray(digits.test.x), jnp.asarray(digits.test.y))
  data = dict(shards=_pad_shards(x, y, shards), test=test)
  n = config.workers
  out = {}
  # Every schedule sees the same minibatch draws (k_train), so differences
  # come from communication alone.
  for label, topology, phases in config.schedules:
    mats, rounds = mixing_matrices(topology, phases, config.steps, n, rng)
    workers = _run(config, model, init, data, mats, k_train, label, curves)
    accs, mean_acc, dist = _evaluate(model, workers, *test)
    # The single global merge, through the library: a uniform average.
    merged = mj.merge(mj.methods.average(), None, [
        jax.tree.map(lambda v, i=i: v[i], workers) for i in range(n)])
    merge_acc = float(_accuracy(model, merged, *test))
    # The curves' merge (a mean inside jit) is the same model.
    if abs(merge_acc - float(mean_acc)) > 1e-6:
      raise AssertionError(f'{label}: mergejax average {merge_acc} != mean '
                           f'{float(mean_acc)}')
    accs = np.asarray(accs)
    out[label] = dict(gossip_rounds=rounds, workers_mean=float(accs.mean()),
                      workers_min=float(accs.min()),
                      global_merge=merge_acc, consensus_distance=float(dist))
  # Centralized SGD on the pooled data, the total batch of all workers.
  pooled = _pad_shards(x, y, [np.arange(len(y))])
  central_cfg = config.copy_and_resolve_references()
  with central_cfg.unlocked():
    central_cfg.batch_size = config.batch_size * n
  central = _run(central_cfg, model, init, dict(shards=pooled, test=test),
                 np.ones((config.steps, 1, 1), np.float32), k_train, CENTRAL,
                 curves)
  c_acc = float(_accuracy(model, jax.tree.map(lambda v: v[0], central),
                          *test))
  out[CENTRAL] = dict(gossip_rounds=0, workers_mean=c_acc, workers_min=c_acc,
                      global_merge=c_acc, consensus_distance=0.0)
  sizes = [len(sh) for sh in shards]
  # How skewed: classes making up at least 5 % of a shard.
  classes = [int(np.sum(np.bincount(y[sh], minlength=10) >= 0.05 * len(sh)))
             for sh in shards]
  return out, dict(sizes=sizes, classes=classes, test=int(len(digits.test.y)))


def main(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  out_dir = os.path.join(workdir, 'decentralized')
  os.makedirs(out_dir, exist_ok=True)
  curves, reps, shard_info = [], [], []
  for r in range(config.repeats):
    # Curves of the first repeat only (the plot).
    res, info = _repeat(config, config.seed + r, curves if r == 0 else [])
    reps.append(res)
    shard_info.append(info)
  rows = []
  for label in reps[0]:
    vals = {k: np.asarray([rep[label][k] for rep in reps])
            for k in reps[0][label]}
    rows.append(dict(
        schedule=label, gossip_rounds=int(vals['gossip_rounds'][0]),
        workers_mean=round(float(vals['workers_mean'].mean()), 4),
        workers_min=round(float(vals['workers_min'].mean()), 4),
        global_merge=round(float(vals['global_merge'].mean()), 4),
        global_merge_std=round(float(vals['global_merge'].std()), 4),
        merge_gain=round(float((vals['global_merge'] -
                                vals['workers_mean']).mean()), 4),
        consensus_distance=float(f'{vals["consensus_distance"].mean():.3g}')))
  by = {r['schedule']: r for r in rows}
  server = next((r for r in rows if r['schedule'].startswith('server')),
                None)
  ref = (server or by[CENTRAL])['global_merge']
  fig = os.path.join(out_dir, 'decentralized.png')
  _plot(fig, curves)
  sizes = [s for info in shard_info for s in info['sizes']]
  classes = [c for info in shard_info for c in info['classes']]
  notes = [f'{config.workers} workers, Dirichlet alpha {config.alpha}: shard '
           f'sizes {min(sizes)}-{max(sizes)} images, {np.mean(classes):.1f} '
           'classes per worker on average (classes with >= 5 % of a shard); '
           f'{config.steps} steps of batch {config.batch_size} per worker; '
           f'test {shard_info[0]["test"]} images; means over '
           f'{config.repeats} repeats']
  for r in rows:
    if r['schedule'] == CENTRAL or r is server:
      continue
    notes.append(
        f'{r["schedule"]} ({r["gossip_rounds"]} gossip rounds): workers '
        f'{r["workers_mean"]:.3f} on average (worst {r["workers_min"]:.3f}), '
        f'their global merge {r["global_merge"]:.3f} '
        f'({100 * r["merge_gain"]:+.1f} points over the workers, '
        f'{100 * (r["global_merge"] - ref):+.1f} vs server averaging)')
  notes.append(f'server averaging every step: {ref:.3f}; centralized SGD on '
               f'the pooled data: {by[CENTRAL]["global_merge"]:.3f}')
  result = dict(
      experiment='decentralized',
      title='Decentralized SGD and a single global merge',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![test accuracy along training, first repeat]'
                   '(decentralized.png)'),
      command='python -m experiments.main --config=configs/decentralized.py '
              '--workdir=/tmp/dec_run',
      notes=notes, provenance=results_lib.provenance(), rows=rows,
      curves=curves, repeats=reps, shards=shard_info,
      seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  results_lib.write_page(result, os.path.join(out_dir, 'results.md'))
  return result
