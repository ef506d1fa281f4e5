"""Git Re-Basin on scikit-learn digits: loss barriers of independently trained MLPs.

For each pair of MLPs trained from different initialisations, the barrier
``max_lam L(lam) - (L(0) + L(1))/2`` of the linear interpolation (train loss
and test error) for: naive interpolation, weight matching, activation matching
(correlation), weight matching + REPAIR, and the learned matchers (on by
default, ``config.ste`` / ``config.sinkhorn``): Git Re-Basin's STE v2 and
Sinkhorn re-basin, trained on the midpoint training loss (Sinkhorn: by
default; ``config.sinkhorn_loss`` picks another). Writes
``rebasin.json``, ``rebasin.md`` and ``rebasin.png`` into the workdir.

  python -m experiments.main --config=configs/rebasin.py --workdir=/tmp/rebasin
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

from mergejax import permute
from mergejax.permute import models as M


def load_digits(seed=0):
  d = datasets.load_digits()
  x = (d.data / 16.0).astype(np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 1e-3)
  y = d.target.astype(np.int32)
  idx = np.random.default_rng(seed).permutation(len(x))
  n_test = len(x) // 4
  te, tr = idx[:n_test], idx[n_test:]
  return (x[tr], y[tr]), (x[te], y[te])


def train_mlp(key, data, *, features, epochs, batch_size, lr, num_outputs=10):
  """Trains `models.MLP` with Adam on (x, y); returns params."""
  x, y = data
  module = M.MLP(tuple(features), num_outputs=num_outputs)
  init_key, key = jax.random.split(key)
  params = module.init(init_key, jnp.asarray(x[:1]))['params']
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = module.apply({'params': p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    g = jax.grad(loss)(params)
    # optax mixes Python floats with int32 step counts (strict dtype
    # promotion, as in the tests, rejects it).
    with jax.numpy_dtype_promotion('standard'):
      upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  n = len(x)
  for e in range(epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
    for i in range(0, n - batch_size + 1, batch_size):
      b = perm[i:i + batch_size]
      params, state = step(params, state, x[b], y[b])
  return params


def metrics_fn(module, data):
  x, y = jnp.asarray(data[0]), jnp.asarray(data[1])

  def fn(p):
    logits = module.apply({'params': p}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    err = 1.0 - jnp.mean(jnp.argmax(logits, -1) == y)
    return {'loss': loss, 'error': err}

  return fn


def mlp_hidden(depth):
  """features_fn for activation matching: post-ReLU activations per group."""

  def fn(params, x):
    out = {}
    h = x
    for i in range(depth):
      d = params[f'Dense_{i}']
      h = jax.nn.relu(h @ d['kernel'] + d['bias'][None])
      out[f'P_{i}'] = h
    return out

  return fn


def mlp_preact(depth):
  """preact_fn for REPAIR: pre-activations of the hidden Dense layers."""

  def fn(params, x):
    out = {}
    h = x
    for i in range(depth):
      d = params[f'Dense_{i}']
      z = h @ d['kernel'] + d['bias'][None]
      out[f'Dense_{i}'] = z
      h = jax.nn.relu(z)
    return out

  return fn


def batches(x, size=256):
  return [jnp.asarray(x[i:i + size]) for i in range(0, len(x), size)]


def equal_batches(data, size):
  """``(x, y)`` as full ``size`` batches, stacked ``[n, size, ...]`` (ragged tail dropped)."""
  x, y = data
  n = len(x) // size
  return (jnp.asarray(x[:n * size]).reshape((n, size) + x.shape[1:]),
          jnp.asarray(y[:n * size]).reshape((n, size) + y.shape[1:]))


def ce_loss_fn(module):
  def fn(p, batch):
    logits = module.apply({'params': p}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
  return fn


def learned_matchings(config, spec, loss_fn, a, b, train, pair):
  """``{name: (perms, seconds)}`` for the enabled learned matchers.

  ``loss_fn`` is built once for all pairs: it is a static argument of the
  jitted Sinkhorn loop, so the same function object compiles once.
  """
  out = {}
  stacked = equal_batches(train, config.learned_batch_size)
  if config.ste:
    t0 = time.time()
    perms = permute.ste_matching(
        spec, a, b, loss_fn, [jax.tree.map(lambda x: x[i], stacked)
                              for i in range(stacked[0].shape[0])],
        steps=config.ste_steps, learning_rate=config.ste_lr,
        key=jax.random.key(pair))
    out['ste'] = (perms, time.time() - t0)
  if config.sinkhorn:
    t0 = time.time()
    data = config.sinkhorn_loss in ('midpoint', 'random')  # else data-free
    perms = permute.sinkhorn_matching(
        spec, a, b, key=jax.random.key(pair), loss=config.sinkhorn_loss,
        loss_fn=loss_fn if data else None, batches=stacked if data else None,
        steps=config.sinkhorn_steps,
        learning_rate=config.sinkhorn_lr, tau=config.sinkhorn_tau,
        straight_through=config.sinkhorn_straight_through)
    jax.block_until_ready(perms)
    out['sinkhorn'] = (perms, time.time() - t0)
  return out


def main(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  train, test = load_digits(config.seed)
  features = [config.width] * config.depth
  module = M.MLP(tuple(features))
  spec = permute.mlp_spec(config.depth)
  train_m, test_m = metrics_fn(module, train), metrics_fn(module, test)
  loss_fn = ce_loss_fn(module)
  results = []
  curves = {}
  for pair in range(config.pairs):
    t0 = time.time()
    a, b = [train_mlp(jax.random.key(1000 * config.seed + 2 * pair + i), train,
                      features=features, epochs=config.epochs,
                      batch_size=config.batch_size, lr=config.lr)
            for i in range(2)]
    t_train = time.time() - t0
    t0 = time.time()
    wm = permute.weight_matching(spec, a, b, key=jax.random.key(pair),
                                 return_costs=True)
    t_wm = time.time() - t0
    t0 = time.time()
    am = permute.activation_matching(mlp_hidden(config.depth), a, b,
                                     batches(train[0]))
    t_am = time.time() - t0
    b_wm = permute.apply_permutation(spec, wm.permutations, b)
    b_am = permute.apply_permutation(spec, am, b)
    row = {'pair': pair, 'train_s': t_train, 'wm_s': t_wm, 'am_s': t_am,
           'wm_sweeps': int(wm.sweeps)}
    aligned = [('naive', b), ('weight_matching', b_wm),
               ('activation_matching', b_am)]
    for name, (perms, secs) in learned_matchings(config, spec, loss_fn, a, b,
                                                 train, pair).items():
      aligned.append((name, permute.apply_permutation(spec, perms, b)))
      row[f'{name}_s'] = secs
      row[f'{name}_same_as_wm'] = bool(all(
          np.array_equal(perms[g], wm.permutations[g]) for g in perms))
    for name, bb in aligned:
      for split, fn in (('train', train_m), ('test', test_m)):
        r = permute.interpolation_barrier(fn, a, bb, num=config.num_lambdas)
        row[f'{name}/{split}_loss_barrier'] = float(r.barrier['loss'])
        row[f'{name}/{split}_error_barrier'] = float(r.barrier['error'])
        curves[(pair, name, split)] = {k: np.asarray(v).tolist()
                                       for k, v in r.curve.items()}
    # REPAIR at every lambda (targets depend on lambda), then the barrier.
    lams = np.linspace(0, 1, config.num_lambdas)
    tb = batches(train[0])
    for split, fn in (('train', train_m), ('test', test_m)):
      vals = {'loss': [], 'error': []}
      for lam in lams:
        mid = permute.lerp_params(a, b_wm, lam)
        if 0 < lam < 1:
          mid = permute.repair(mlp_preact(config.depth), mid, [a, b_wm], tb,
                               layers=[f'Dense_{i}' for i in range(config.depth)],
                               weights=[1 - lam, lam])
        m = fn(mid)
        for k in vals:
          vals[k].append(float(m[k]))
      for k, v in vals.items():
        v = np.asarray(v)
        row[f'wm_repair/{split}_{k}_barrier'] = float(v.max() - 0.5 * (v[0] + v[-1]))
      curves[(pair, 'wm_repair', split)] = vals
    for split, fn in (('train', train_m), ('test', test_m)):
      for end, p in (('a', a), ('b', b)):
        row[f'endpoint_{end}/{split}_error'] = float(fn(p)['error'])
    results.append(row)
    print(json.dumps(row), flush=True)

  methods = ['naive', 'weight_matching', 'activation_matching', 'wm_repair']
  methods += [m for m in ('ste', 'sinkhorn') if config[m]]
  lines = [f'Digits MLP {config.depth}x{config.width}, {config.pairs} pairs '
           f'(mean over pairs); barrier = max_lam L(lam) - (L(0)+L(1))/2\n',
           '| method | train loss barrier | test loss barrier | test error barrier |',
           '|---|---|---|---|']
  summary = {}
  for m in methods:
    vals = [np.mean([r[f'{m}/{k}'] for r in results]) for k in
            ('train_loss_barrier', 'test_loss_barrier', 'test_error_barrier')]
    summary[m] = vals
    lines.append(f'| {m} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2] * 100:.1f}% |')
  ends = np.mean([[r['endpoint_a/test_error'], r['endpoint_b/test_error']]
                  for r in results])
  lines.append(f'\nEndpoint test error (mean): {ends * 100:.1f}%; weight matching '
               f'{np.mean([r["wm_s"] for r in results]):.2f} s, '
               f'{np.mean([r["wm_sweeps"] for r in results]):.1f} sweeps.')
  for m in ('ste', 'sinkhorn'):
    if config[m]:
      what = ('the midpoint train loss' if m == 'ste' else
              {'midpoint': 'the midpoint train loss',
               'random': 'the train loss at lam ~ U(0, 1)',
               'l2': 'the L2 weight distance (data-free)',
               'cosine': 'the cosine weight distance (data-free)'
               }[config.sinkhorn_loss] +
              (', straight-through' if config.sinkhorn_straight_through else ''))
      lines.append(f'{m}: {config[m + "_steps"]} steps on {what}, '
                   f'{np.mean([r[m + "_s"] for r in results]):.1f} s per '
                   'pair (incl. compilation).')
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(workdir, 'rebasin.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(workdir, 'rebasin.json'), 'w') as f:
    json.dump({'config': config.to_dict(), 'pairs': results,
               'summary': summary}, f, indent=1)
  _plot(curves, methods, config, os.path.join(workdir, 'rebasin.png'))
  return summary


def _plot(curves, methods, config, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lams = np.linspace(0, 1, config.num_lambdas)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, (split, key) in zip(axes, (('train', 'loss'), ('test', 'error'))):
    for m in methods:
      ax.plot(lams, curves[(0, m, split)][key], label=m)
    ax.set_xlabel('lambda')
    ax.set_ylabel(f'{split} {key}')
    ax.legend()
  fig.suptitle(f'Digits MLP {config.depth}x{config.width}: interpolation A -> B')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
