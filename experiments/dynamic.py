"""Dynamic and pool-scale merges on the default digits zoo.

Four parts, on the default experiment's zoo (a pre-trained MLP backbone and
its fine-tunes on input transforms of scikit-learn's digits, each read out by
its own head):

* **WEMoE** (`mergejax.methods.fit_wemoe`): both backbone layers routed, the
  routers trained by entropy minimisation on unlabeled inputs with
  FusionBench's settings. Reported as the fraction of the task-arithmetic to
  fine-tuned gap it closes (task arithmetic with lambda chosen on
  validation). Trained on unlabeled validation inputs, and on the unlabeled
  test inputs (FusionBench's protocol); E-WEMoE prunes the task vectors.
* **T3** (`mergejax.methods.t3_apply`): for each fine-tune, a stream that
  mixes untransformed test digits (the base model's domain) with the
  fine-tune's task, shuffled; the full classifiers (backbone and head) of the
  base and the fine-tune are interpolated per input (T3) or per batch (T3_B).
  Compared with the best static interpolation on the same stream (an oracle)
  and the one chosen on the validation stream. Timed per batch against one
  forward pass.
* **FW-Merging** (`mergejax.methods.fit_fw_merging`): the pool holds the
  relevant fine-tunes first, then fine-tunes on tasks that are not evaluated
  and noise checkpoints, alternately; accuracy on the evaluated tasks against
  the pool size, for task arithmetic and the hard and soft variants with
  FusionBench's defaults (``fw_pool.png``). A streamed run (pool over the
  memory budget) is checked against the stacked one.
* **Memory**: WEMoE's forward pass from XLA's memory analysis, FW-Merging's
  peak resident memory in a fresh process, against the number of models
  (``memory.png``).

References:
  Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of
    Experts", ICML 2024. https://arxiv.org/abs/2402.00433
  Imam et al., "T3: Test-Time Model Merging in VLMs for Zero-Shot Medical
    Imaging Analysis", 2025. https://arxiv.org/abs/2510.27265
  Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe
    Optimization", ICCV 2025. https://arxiv.org/abs/2503.12649
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mergejax as mj
from experiments import default as default_exp
from experiments import zoo
from experiments.tools import plotting
from experiments.tools import results as results_lib

M = mj.methods


def _take(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _head(head, feats):
  return nn.Dense(head['kernel'].shape[-1]).apply({'params': head}, feats)


def _ta(base, fts, lam):
  return mj.merge(M.task_arithmetic(lambda_=lam), base, fts)


def _ta_chosen(ev, base, fts, lambdas):
  """Task arithmetic with lambda chosen on validation: (backbone, lambda)."""
  stacked = jax.vmap(lambda l: _ta(base, fts, l))(jnp.asarray(lambdas))
  val = ev.accuracies(stacked, 'val').mean(1)
  i = int(np.argmax(val))
  return _take(stacked, i), float(lambdas[i])


# --- WEMoE ------------------------------------------------------------------

def _wemoe(config, s, lam_ta):
  wc, zc = config.wemoe, config.zoo
  ev, heads = s['ev'], s['heads']
  backbone = zoo.Backbone(zc.width, zc.depth)

  def task_logits(state, x):  # x [K, n, 64] -> [K, n, classes]
    feats = jax.vmap(lambda xt: M.wemoe_apply(backbone, state, xt))(x)
    return jax.vmap(_head)(heads, feats)

  def loss(state, xb):  # FusionBench sums the tasks' entropies
    return M.prediction_entropy(task_logits(state, xb)) * xb.shape[0]

  x_test, y_test = ev.split('test')

  @jax.jit
  def accuracy(state):
    return jnp.mean(jnp.argmax(task_logits(state, x_test), -1) == y_test, 1)

  def batches(split, n):
    x = ev.split(split, n)[0]
    b = wc.batch_size
    return [x[:, i:i + b] for i in range(0, x.shape[1] - b + 1, b)]

  key = jax.random.fold_in(jax.random.key(config.seed), 11)
  out, curves = {}, {}
  for label, split, n, prune in (
      ('WEMoE (unlabeled validation inputs)', 'val', wc.unlabeled, 0.0),
      ('WEMoE (unlabeled test inputs, FusionBench)', 'test', None, 0.0),
      (f'E-WEMoE, prune {wc.prune:g} (validation inputs)', 'val',
       wc.unlabeled, wc.prune)):
    t0 = time.perf_counter()
    state = M.wemoe_init(s['base'], s['fts'], key=key, lambda_=lam_ta,
                         init_lambda=wc.init_lambda, prune=prune)
    acc0 = np.asarray(accuracy(state))
    fit = M.fit_wemoe(loss, state, batches(split, n), steps=wc.steps,
                      learning_rate=wc.learning_rate)
    out[label] = dict(init=acc0, trained=np.asarray(accuracy(fit.state)),
                      seconds=time.perf_counter() - t0)
    curves[label] = fit.losses[::max(1, wc.steps // 50)].round(5).tolist()
  return out, curves


# --- T3 ---------------------------------------------------------------------

def _t3(config, s, digits):
  tc = config.t3
  model, z, ev = s['model'], s['zoo'], s['ev']
  (plain,) = zoo.make_tasks(digits, ['identity'],
                            jax.random.fold_in(jax.random.key(config.seed), 3))
  apply_fn = lambda p, x: model.apply({'params': p}, x)
  pt = z.base
  rng = np.random.default_rng(config.seed)
  b = tc.batch_size
  static = jnp.asarray(tc.static, jnp.float32)

  def stream(t, split):
    xt, yt = (np.asarray(a[t]) for a in ev.split(split))
    xp, yp = getattr(plain, split).x, getattr(plain, split).y
    x, y = np.concatenate([xp, xt]), np.concatenate([yp, yt])
    order = rng.permutation(len(y))[:len(y) // b * b]
    return (jnp.asarray(x[order]).reshape(-1, b, x.shape[-1]),
            jnp.asarray(y[order]).reshape(-1, b))

  @jax.jit
  def static_acc(ft, xs, ys):  # [S] accuracies along the interpolation
    def one(t):
      p = mj.merge(mj.transforms.lerp_reduce(t), pt, [ft])
      return jnp.mean(jnp.argmax(apply_fn(p, xs.reshape(-1, xs.shape[-1])),
                                 -1) == ys.reshape(-1))
    return jax.lax.map(one, static)

  def t3_acc(ft, xs, ys, gamma, per, weight_on, centered):
    return float(_t3_accuracy(apply_fn, pt, ft, xs, ys, gamma, per, weight_on,
                              centered))

  rows = []
  for t, name in enumerate(s['names']):
    ft = {'backbone': s['fts'][t], 'head': _take(s['heads'], t)}
    val, test = stream(t, 'val'), stream(t, 'test')
    st_val = np.asarray(static_acc(ft, *val))
    st_test = np.asarray(static_acc(ft, *test))
    r = dict(task=name, base=float(st_test[0]), finetuned=float(st_test[-1]),
             static_oracle=float(st_test.max()),
             static_oracle_t=float(tc.static[int(st_test.argmax())]),
             static_val=float(st_test[int(st_val.argmax())]))
    for per in ('sample', 'batch'):
      for side in ('pretrained', 'finetuned'):
        r[f'T3 {per}, {side}'] = t3_acc(ft, *test, tc.gamma, per, side, False)
      # The centred coefficient: gamma and side chosen on validation.
      best = max(((t3_acc(ft, *val, g, per, side, True), g, side)
                  for g in tc.gammas for side in ('pretrained', 'finetuned')))
      _, g, side = best
      r[f'T3 {per}, centred'] = t3_acc(ft, *test, g, per, side, True)
      r[f'T3 {per}, centred choice'] = f'gamma {g:g}, {side}'
    rows.append(r)
  variants = [k for k in rows[0] if k.startswith('T3') and 'choice' not in k]
  timing = _t3_timing(apply_fn, pt, {'backbone': s['fts'][0],
                                     'head': _take(s['heads'], 0)},
                      stream(0, 'test')[0][0], tc.timing_repeats)
  return rows, variants, timing


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _t3_accuracy(apply_fn, pt, ft, xs, ys, gamma, per, weight_on, centered):
  """T3's accuracy on a stream of batches ``xs [N, B, 64]``, ``ys [N, B]``
  (``gamma`` traced: one compilation per setting of the static options)."""
  logits = jax.lax.map(lambda x: M.t3_apply(
      apply_fn, pt, ft, x, gamma=gamma, per=per, weight_on=weight_on,
      centered=centered).outputs, xs)
  return jnp.mean(jnp.argmax(logits, -1) == ys)


def _t3_timing(apply_fn, pt, ft, x, repeats):
  """Seconds per batch and XLA's temporary memory: one model, T3_B, T3."""
  fns = {
      'one forward pass': jax.jit(lambda p, q, x: apply_fn(q, x)),
      'T3_B (per batch)': jax.jit(lambda p, q, x: M.t3_apply(
          apply_fn, p, q, x, per='batch').outputs),
      'T3 (per input)': jax.jit(lambda p, q, x: M.t3_apply(
          apply_fn, p, q, x, per='sample').outputs),
      'T3 (per input, chunk 8)': jax.jit(lambda p, q, x: M.t3_apply(
          apply_fn, p, q, x, per='sample', chunk=8).outputs),
  }
  out = {}
  for label, f in fns.items():
    compiled = f.lower(pt, ft, x).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(f(pt, ft, x))
    t0 = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(f(pt, ft, x))
    out[label] = dict(
        ms_per_batch=1e3 * (time.perf_counter() - t0) / repeats,
        temp_mib=(mem.temp_size_in_bytes / 2**20) if mem else None)
  one = out['one forward pass']['ms_per_batch']
  for v in out.values():
    v['x_one_forward'] = v['ms_per_batch'] / one
  return out


# --- FW-Merging -------------------------------------------------------------

def _ce(params, batch):
  head, x, y = batch
  logits = _head(head, _BACKBONE[0].apply({'params': params}, x))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _entropy(params, batch):
  head, x = batch
  return M.prediction_entropy(_head(head, _BACKBONE[0].apply(
      {'params': params}, x)))


# The backbone module the FW objectives run (set by `main`); module-level
# functions keep the objectives hashable, so every run shares compilations.
_BACKBONE: list = []


def _pool(config, s, digits):
  """The ordered pool: relevant fine-tunes, then irrelevant and noisy ones."""
  fc, zc = config.fw, config.zoo
  extra = zoo.make_tasks(digits, list(fc.irrelevant),
                         jax.random.fold_in(jax.random.key(config.seed), 21))
  # Fine-tunes on untransformed digits with every label drawn at random: the
  # broken checkpoints a public repository also holds.
  rng = np.random.default_rng(config.seed + 1)
  shuffled = [zoo.Task(f'random labels {i}', *(
      zoo.Split(sp.x, rng.integers(0, 10, len(sp.y)).astype(sp.y.dtype))
      for sp in (digits.train, digits.val, digits.test)))
              for i in range(fc.random_labels)]
  ft = zoo.finetune(s['model'], s['zoo'].base, extra + shuffled,
                    jax.random.fold_in(jax.random.key(config.seed), 22),
                    show=False, **zc.finetune.to_dict())
  irrelevant = [_take(ft['backbone'], i) for i in range(len(extra))]
  broken = [_take(ft['backbone'], len(extra) + i)
            for i in range(len(shuffled))]
  base = s['base']
  taus = [jax.tree.map(lambda a, b: a - b, f, base) for f in s['fts']]
  norms = jax.tree.map(lambda *t: jnp.mean(jnp.stack(
      [jnp.linalg.norm(x) for x in t])), *taus)
  noisy = []
  for i in range(fc.noisy):
    k = jax.random.fold_in(jax.random.key(config.seed), 100 + i)
    leaves, tdef = jax.tree.flatten(base)
    noise = [jax.random.normal(kk, x.shape) for kk, x in
             zip(jax.random.split(k, len(leaves)), leaves)]
    noise = jax.tree.unflatten(tdef, noise)
    noisy.append(jax.tree.map(lambda b, e, n: b + n * e / jnp.linalg.norm(e),
                              base, noise, norms))
  rest = []
  for i in range(max(len(irrelevant), len(noisy), len(broken))):
    rest += [(f'irrelevant:{fc.irrelevant[i]}', irrelevant[i])] if i < len(
        irrelevant) else []
    rest += [(f'noise:{i}', noisy[i])] if i < len(noisy) else []
    rest += [(f'random labels:{i}', broken[i])] if i < len(broken) else []
  return [(f'relevant:{n}', f) for n, f in zip(s['names'], s['fts'])] + rest


def _fw(config, s, digits):
  fc = config.fw
  ev, heads, base = s['ev'], s['heads'], s['base']
  pool = _pool(config, s, digits)
  k = len(s['names'])
  xtr, ytr = (jnp.asarray(np.stack([t.train.x[:fc.examples]
                                    for t in s['tasks']])),
              jnp.asarray(np.stack([t.train.y[:fc.examples]
                                    for t in s['tasks']])))
  batches = [(_take(heads, t), xtr[t], ytr[t]) for t in range(k)]
  xu = ev.split('val', config.wemoe.unlabeled)[0]
  ada_batches = [(_take(heads, t), xu[t]) for t in range(k)]
  lambdas = list(config.merge.lambdas)
  rows, curves, losses = [], {}, {}
  for n in fc.pool_sizes:
    if n > len(pool):
      raise ValueError(f'fw.pool_sizes has {n}, but the pool holds '
                       f'{len(pool)} checkpoints.')
    models = [m for _, m in pool[:n]]
    got = {}
    t0 = time.perf_counter()
    got['task arithmetic, lambda 0.3'] = _ta(base, models, fc.scaling_factor)
    got['task arithmetic, lambda on validation'] = _ta_chosen(
        ev, base, models, lambdas)[0]
    for label, kw in (
        ('FW hard (FusionBench defaults)', dict(variant='hard')),
        ('FW hard, layer-wise', dict(variant='hard', granularity='layer')),
        ('FW soft (FusionBench defaults)', dict(
            variant='soft', ada_loss_fn=_entropy, ada_batches=ada_batches,
            ada_steps=fc.ada_steps))):
      t1 = time.perf_counter()
      r = M.fit_fw_merging(_ce, base, models, batches, steps=fc.steps,
                           step_size=fc.step_size,
                           scaling_factor=fc.scaling_factor, **kw)
      got[label] = r.params
      losses[f'{label}, pool {n}'] = r.losses.round(4).tolist()
      picks = r.picks if kw['variant'] == 'hard' else [
          p for step in r.picks for p in step]
      if kw.get('granularity') != 'layer':
        chosen = sorted({int(p) for p in picks})
        names = [pool[i][0] if i < n else 'initial merge' for i in chosen]
        curves[f'{label}, pool {n}'] = dict(picked=names, seconds=round(
            time.perf_counter() - t1, 2))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *got.values())
    acc = ev.accuracies(stacked, 'test').mean(1)
    for label, a in zip(got, acc):
      rows.append(dict(pool_size=n, method=label, test_accuracy=round(
          float(a), 4)))
    print(f'fw: pool {n} done in {time.perf_counter() - t0:.1f}s', flush=True)
  # The same merge streamed: the pool over the memory budget.
  n = fc.stream_check_size
  models = [m for _, m in pool[:n]]
  one = sum(x.nbytes for x in jax.tree.leaves(base))
  kw = dict(steps=fc.steps, step_size=fc.step_size,
            scaling_factor=fc.scaling_factor)
  t0 = time.perf_counter()
  a = M.fit_fw_merging(_ce, base, models, batches, **kw)
  t_stacked = time.perf_counter() - t0
  host = [jax.tree.map(np.asarray, m) for m in models]
  t0 = time.perf_counter()
  b = M.fit_fw_merging(_ce, base, M.CandidatePool(n, lambda i: host[i]),
                       batches, **kw)
  t_streamed = time.perf_counter() - t0
  c = M.fit_fw_merging(_ce, base, models, batches, memory_budget=4 * one,
                       **kw)
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  stream = dict(pool=n, budget_models=4, streamed=bool(b.streamed and
                                                       c.streamed),
                same_picks=a.picks == b.picks == c.picks,
                max_abs_difference=diff, seconds_stacked=round(t_stacked, 2),
                seconds_streamed=round(t_streamed, 2))
  return rows, curves, [p for p, _ in pool], stream, losses


# --- Memory -----------------------------------------------------------------

_FW_MEMORY = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
import mergejax as mj
n, width, mode, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
shapes = {'l0': {'kernel': (64, width), 'bias': (width,)},
          'l1': {'kernel': (width, width), 'bias': (width,)}}
def model(i):
  rng = np.random.default_rng(i)
  return {l: {k: rng.standard_normal(s, dtype=np.float32) * (0.02 if i else 1.)
              for k, s in d.items()} for l, d in shapes.items()}
base = model(0)
def loss(p, x):
  h = jax.nn.relu(x @ p['l0']['kernel'] + p['l0']['bias'][None])
  return jnp.mean((h @ p['l1']['kernel'] + p['l1']['bias'][None]) ** 2)
x = jnp.ones((8, 64))
def delta(i):
  return jax.tree.map(lambda b, d: b + d, base, model(i + 1))
def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss is not:
  # it carries the parent's peak over fork and exec).
  for line in open('/proc/self/status'):
    if line.startswith(key + ':'):
      return int(line.split()[1])
def pool_of(size):
  if mode == 'stacked':
    return [jax.tree.map(jnp.asarray, delta(i)) for i in range(size)]
  return mj.methods.CandidatePool(size, delta)
# A one-model run first: the compilations' memory is not the pool's.
jax.block_until_ready(mj.methods.fit_fw_merging(loss, base, pool_of(1), [x], steps=steps).params)
before = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
  f.write('5')  # resets VmHWM to the current resident size
r = mj.methods.fit_fw_merging(loss, base, pool_of(n), [x], steps=steps)
jax.block_until_ready(r.params)
print(status('VmHWM'), before, r.streamed)
'''


def _memory(config):
  mc = config.memory
  width = mc.width
  backbone = zoo.Backbone(width, 2)
  base = backbone.init(jax.random.key(0), jnp.zeros((1, 64)))['params']
  one = sum(x.nbytes for x in jax.tree.leaves(base))
  x = jnp.ones((mc.wemoe_inputs, 64))
  rows = []
  for k in mc.models:
    fts = [jax.tree.map(lambda p, i=i: p + 0.01 * (i + 1), base)
           for i in range(k)]
    for prune in (0.0, 0.9):
      state = M.wemoe_init(base, fts, key=jax.random.key(1), prune=prune)
      f = jax.jit(lambda st, xx: M.wemoe_apply(backbone, st, xx))
      mem = f.lower(state, x).compile().memory_analysis()
      held = sum(v.nbytes for v in jax.tree.leaves(state))
      rows.append(dict(method=f'WEMoE forward, prune {prune:g}', models=k,
                       state_mib=round(held / 2**20, 2),
                       temp_mib=round(mem.temp_size_in_bytes / 2**20, 2),
                       peak_mib=round((held + mem.temp_size_in_bytes
                                       + mem.output_size_in_bytes) / 2**20, 2)))
    for mode in ('stacked', 'streamed'):
      out = subprocess.run(
          [sys.executable, '-c', _FW_MEMORY, str(k), str(width), mode,
           str(mc.fw_steps)], capture_output=True, text=True, check=True,
          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
      peak, before, streamed = out.stdout.split()[-3:]
      rows.append(dict(method=f'FW-Merging hard, {mode}', models=k,
                       state_mib=None, temp_mib=None,
                       peak_mib=round((int(peak) - int(before)) / 2**10, 2),
                       streamed=streamed == 'True'))
  return rows, one / 2**20


# --- Report -----------------------------------------------------------------

def _line_plot(path, rows, x, y, *, xlabel, ylabel, log2_x=False):
  """One line per ``method`` of ``rows``: ``y`` against ``x``."""
  plt = plotting._plt()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  for method in dict.fromkeys(r['method'] for r in rows):
    pts = [(r[x], r[y]) for r in rows if r['method'] == method]
    ax.plot(*zip(*pts), marker='o', ms=3, label=method,
            color=plotting.color(method))
  if log2_x:
    ax.set_xscale('log', base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plots(out_dir, fw_rows, mem_rows, one_mib):
  _line_plot(os.path.join(out_dir, 'fw_pool.png'), fw_rows, 'pool_size',
             'test_accuracy', xlabel='pool size (relevant first, then '
             'irrelevant, noise and random-label checkpoints)',
             ylabel='mean test accuracy, evaluated tasks')
  _line_plot(os.path.join(out_dir, 'memory.png'), mem_rows, 'models',
             'peak_mib', xlabel='number of models',
             ylabel=f'peak MiB (one model: {one_mib:.1f} MiB)', log2_x=True)


def main(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  out_dir = os.path.join(workdir, 'dynamic')
  os.makedirs(out_dir, exist_ok=True)
  digits, tasks, model, z, zoo_info = default_exp.build_zoo(config, workdir)
  names = [t.name for t in tasks]
  heads = z.finetuned['head']
  ev = zoo.TaskEvaluator(model, tasks, heads)
  sub = config.merge.params
  s = dict(model=model, zoo=z, ev=ev, heads=heads, names=names, tasks=tasks,
           base=z.base[sub],
           fts=[_take(z.finetuned[sub], i) for i in range(len(names))])
  _BACKBONE[:] = [zoo.Backbone(config.zoo.width, config.zoo.depth)]
  ft_acc = np.diag(ev.accuracies(z.finetuned[sub], 'test'))
  ta_bb, lam = _ta_chosen(ev, s['base'], s['fts'], list(config.merge.lambdas))
  ta_acc = ev.accuracies(jax.tree.map(lambda x: x[None], ta_bb), 'test')[0]
  seconds = {}

  t0 = time.perf_counter()
  wemoe, wemoe_curves = _wemoe(config, s, lam)
  seconds['wemoe'] = time.perf_counter() - t0
  gap = float(ft_acc.mean() - ta_acc.mean())
  wemoe_rows = [dict(method='task arithmetic (lambda on validation)',
                     test_accuracy=round(float(ta_acc.mean()), 4),
                     gap_closed=0.0, detail=f'lambda {lam:g}'),
                dict(method='fine-tuned models',
                     test_accuracy=round(float(ft_acc.mean()), 4),
                     gap_closed=1.0, detail='one per task')]
  for label, d in wemoe.items():
    for when in ('init', 'trained'):
      a = float(d[when].mean())
      wemoe_rows.append(dict(
          method=f'{label}, {"at initialisation" if when == "init" else "trained"}',
          test_accuracy=round(a, 4),
          gap_closed=round((a - float(ta_acc.mean())) / gap, 3),
          detail=f'{d["seconds"]:.0f}s' if when == 'trained' else ''))

  t0 = time.perf_counter()
  t3_rows, t3_variants, t3_timing = _t3(config, s, digits)
  seconds['t3'] = time.perf_counter() - t0
  mean = lambda key: float(np.mean([r[key] for r in t3_rows]))
  t3_summary = [dict(method=m, mean_accuracy=round(mean(k), 4)) for m, k in (
      ('base model', 'base'), ('fine-tuned model', 'finetuned'),
      ('best static interpolation on the test stream (oracle)',
       'static_oracle'),
      ('static interpolation chosen on validation', 'static_val'))]
  t3_summary += [dict(method=v, mean_accuracy=round(mean(v), 4))
                 for v in t3_variants]

  t0 = time.perf_counter()
  fw_rows, fw_picks, pool_names, stream, fw_losses = _fw(config, s, digits)
  seconds['fw'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  mem_rows, one_mib = _memory(config)
  seconds['memory'] = time.perf_counter() - t0
  _plots(out_dir, fw_rows, mem_rows, one_mib)

  notes = _notes(wemoe_rows, t3_summary, t3_timing, fw_rows, stream, config,
                 fw_losses, mem_rows)
  result = dict(
      experiment='dynamic',
      title='Dynamic and pool-scale merges: WEMoE, T3, FW-Merging',
      description=(__doc__.split('\n\n', 1)[1].rsplit('\n\nReferences', 1)[0]
                   .strip() + '\n\n![accuracy against pool size](fw_pool.png)'
                   '\n\n![peak memory against the number of models]'
                   '(memory.png)'),
      command='python -m experiments.main --config=configs/dynamic.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(),
      tables={'WEMoE': wemoe_rows, 'T3 (mean over the fine-tunes)': t3_summary,
              'T3 per fine-tune': t3_rows,
              'T3 cost per batch': [dict(variant=k, **{kk: (round(vv, 3) if vv is not
                                                   None else None)
                                              for kk, vv in v.items()})
                           for k, v in t3_timing.items()],
              'FW-Merging against pool size': fw_rows,
              'Peak memory against the number of models': mem_rows},
      rows=wemoe_rows, fw_picks=fw_picks, pool=pool_names,
      fw_stream_check=stream, fw_losses=fw_losses,
      wemoe_losses=wemoe_curves,
      zoo=dict(zoo_info, hash=default_exp.zoo_hash(config)),
      seconds=dict(total=round(time.perf_counter() - t_start, 1),
                   **{k: round(v, 1) for k, v in seconds.items()}),
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  results_lib.write_page(result, os.path.join(out_dir, 'results.md'))
  return result


def _notes(wemoe_rows, t3_summary, t3_timing, fw_rows, stream, config,
           fw_losses, mem_rows):
  notes = []
  by = {r['method']: r for r in wemoe_rows}
  for label, r in by.items():
    if label.endswith('trained'):
      notes.append(f'{label}: test {r["test_accuracy"]:.3f}, '
                   f'{100 * r["gap_closed"]:.0f}% of the task-arithmetic to '
                   'fine-tuned gap closed')
  t3 = {r['method']: r['mean_accuracy'] for r in t3_summary}
  oracle = t3['best static interpolation on the test stream (oracle)']
  best_t3 = max((v, k) for k, v in t3.items() if k.startswith('T3'))
  notes.append(
      f'T3: the best variant ({best_t3[1]}) reaches {best_t3[0]:.3f} against '
      f'{oracle:.3f} for the best static interpolation on the same stream '
      f'(an oracle) and {t3["static interpolation chosen on validation"]:.3f} '
      'for the one chosen on validation; T3 with the paper\'s gamma '
      f'{config.t3.gamma:g}: {t3["T3 sample, pretrained"]:.3f} (per input), '
      f'{t3["T3 batch, pretrained"]:.3f} (per batch)')
  notes.append('T3 cost per batch of {} inputs: '.format(
      config.t3.batch_size) + '; '.join(
          f'{k} {v["ms_per_batch"]:.2f} ms ({v["x_one_forward"]:.1f}x one '
          'forward pass)' for k, v in t3_timing.items()))
  sizes = sorted({r['pool_size'] for r in fw_rows})
  acc = {(r['method'], r['pool_size']): r['test_accuracy'] for r in fw_rows}
  for m in dict.fromkeys(r['method'] for r in fw_rows):
    notes.append(f'{m}: ' + ', '.join(f'pool {n} {acc[(m, n)]:.3f}'
                                      for n in sizes))
  n0 = min(sizes)
  soft = fw_losses.get(f'FW soft (FusionBench defaults), pool {n0}')
  if soft:
    notes.append(
        f'FW soft, pool {n0}: the labeled cross-entropy at the start of each '
        'iteration ' + ', '.join(f'{v:.3f}' for v in soft) + ' (the '
        'coefficients are trained on prediction entropy, unclamped)')
  ks = sorted({r['models'] for r in mem_rows})
  peak = {(r['method'], r['models']): r['peak_mib'] for r in mem_rows}
  for m in dict.fromkeys(r['method'] for r in mem_rows):
    notes.append(f'peak memory, {m}: ' + ', '.join(
        f'{k} models {peak[(m, k)]:.0f} MiB' for k in ks))
  notes.append(
      f'FW streamed (pool of {stream["pool"]}, a budget of '
      f'{stream["budget_models"]} models): streamed {stream["streamed"]}, '
      f'same picks {stream["same_picks"]}, max |difference| to the stacked '
      f'run {stream["max_abs_difference"]:.1e}; {stream["seconds_stacked"]}s '
      f'stacked, {stream["seconds_streamed"]}s streamed')
  return notes
