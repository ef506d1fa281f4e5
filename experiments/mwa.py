"""MWA on digits: averaging the checkpoints of one fine-tuning run.

A small MLP (``config.width`` units, ``config.depth`` layers) is pre-trained
on generic augmentations of scikit-learn's 8x8 digits (`experiments.zoo`),
then fine-tuned on one task (``config.task``, an input transform of the
digits) with Adam at a constant learning rate, saving a checkpoint every
``finetune.every`` steps together with its training loss (the mean minibatch
loss since the previous checkpoint, as a trainer logs it). Two kinds of run,
``finetune.runs`` seeds each, all seeds trained at once under ``jax.vmap``:

* full fine-tuning of every weight;
* LoRA: rank-``finetune.lora_rank`` adapters on the backbone kernels
  (biases frozen) and a trained head (a dense delta). Merged two ways:
  ``lora='delta'`` averages the adapters' products ``a b`` (the average of
  the updates), ``lora='factors'`` averages ``a`` and ``b`` separately (what
  averaging adapter checkpoint files gives).

Compared on test: the last checkpoint, the best checkpoint by validation
accuracy, the uniform average of all checkpoints and MWA
(`mergejax.methods.mwa`) with step weights ``step^p`` and loss weights
``loss^-p``, the penalty ``p`` chosen per run on the validation split
(accuracy, ties broken by validation loss); test accuracy is never used to
choose. The MWA weighting formula is this library's design (the paper's exact
formula is not known here). The running tracker (`mergejax.methods.
mwa_tracker`, vmapped over the penalty grid) is kept during training and
checked against the offline merges. ``mwa.png`` shows test (solid) and
validation (dashed) accuracy against the penalty, averaged over the runs.

References:
  Choi and Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
    Averaging", 2025. https://arxiv.org/abs/2504.18580
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

M = mj.methods
KINDS = ('step', 'loss')


def _setup(config):
  k_data, k_task, k_base = jax.random.split(jax.random.key(config.seed), 3)
  digits = zoo.load_digits(k_data, **config.data.to_dict())
  (task,) = zoo.make_tasks(digits, [config.task], k_task)
  model = zoo.Classifier(width=config.width, depth=config.depth)
  base = zoo.train_base(model, digits, k_base,
                        show=None if config.progress else False,
                        **config.base.to_dict())
  return model, task, base


def lora_init(base, rank: int, key):
  """LoRA adapter of the backbone kernels (``a`` random, ``b`` zero) and a
  zero head delta: the adapted model starts at the base."""
  bb = base['backbone']
  ad = {'backbone': {}, 'head': jax.tree.map(jnp.zeros_like, base['head'])}
  for name, k in zip(sorted(bb), jax.random.split(key, len(bb))):
    n_in, n_out = bb[name]['kernel'].shape
    a = jax.random.normal(k, (n_in, rank), jnp.float32) / np.sqrt(n_in)
    ad['backbone'][name] = {'kernel': mj.transforms.LoRA(
        a, jnp.zeros((rank, n_out), jnp.float32))}
  return ad


def with_adapter(base, ad):
  """The classifier's params: base kernels plus the adapter's deltas.

  ``ad`` may hold `LoRA` nodes or, after a ``lora='delta'`` merge, dense
  deltas in their place (`mergejax.transforms.lora_delta` leaves those).
  """
  d = mj.transforms.lora_delta(ad)
  bb = {n: {'kernel': p['kernel'] + d['backbone'][n]['kernel'],
            'bias': p['bias']} for n, p in base['backbone'].items()}
  return {'backbone': bb, 'head': jax.tree.map(jnp.add, base['head'],
                                               d['head'])}


def _metrics(model, params, x, y):
  logits = model.apply({'params': params}, x)
  acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
  return acc, optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(model, params, xv, yv, xt, yt):
  """``(val acc [S], val loss [S], test acc [S])`` of S stacked params."""
  val_acc, val_loss = jax.vmap(lambda p: _metrics(model, p, xv, yv))(params)
  test_acc, _ = jax.vmap(lambda p: _metrics(model, p, xt, yt))(params)
  return val_acc, val_loss, test_acc


@jax.jit
def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=2)
def _trackers(q0, penalties, lora):
  """Tracker states ``[R, P]`` per kind: every run, every penalty."""
  out = {}
  for kind in KINDS:
    init = lambda q, p, kind=kind: M.mwa_tracker(p, kind=kind,
                                                 lora=lora).init(q)
    out[kind] = jax.vmap(lambda q: jax.vmap(lambda p: init(q, p))(penalties))(
        q0)
  return out


def _train(model, task, to_params, q0, key, fc, lr, penalties, lora):
  """R runs at once; returns (checkpoints [T] of [R, ...], losses [R, T],
  steps [T], tracker states)."""
  opt = optax.adam(lr)
  x, y = jnp.asarray(task.train.x), jnp.asarray(task.train.y)

  def step(carry, k):
    q, s = carry
    idx = jax.random.randint(k, (fc.batch_size,), 0, x.shape[0])
    loss, g = jax.value_and_grad(lambda q: _metrics(
        model, to_params(q), x[idx], y[idx])[1])(q)
    # optax mixes Python floats with int32 counts (strict promotion rejects).
    with jax.numpy_dtype_promotion('standard'):
      upd, s = opt.update(g, s, q)
    return (optax.apply_updates(q, upd), s), loss

  def chunk(q, s, keys):
    (q, s), losses = jax.lax.scan(step, (q, s), keys)
    return q, s, jnp.mean(losses)

  run = jax.jit(jax.vmap(chunk))
  ps = jnp.asarray(penalties, jnp.float32)
  trackers = _trackers(q0, ps, lora)
  tracker_update = {
      kind: jax.jit(jax.vmap(jax.vmap(
          M.mwa_tracker(kind=kind, lora=lora).update, in_axes=(0, None, None)),
          in_axes=(0, 0, 0))) for kind in KINDS}
  q, s = q0, jax.jit(jax.vmap(opt.init))(q0)
  n_ckpt = fc.steps // fc.every
  ckpts, losses, steps = [], [], []
  for t, k in enumerate(jax.random.split(key, n_ckpt)):
    keys = jax.random.split(k, (fc.runs, fc.every))
    q, s, loss = run(q, s, keys)
    step_no = jnp.full((fc.runs,), (t + 1) * fc.every, jnp.float32)
    trackers = {'step': tracker_update['step'](trackers['step'], q, step_no),
                'loss': tracker_update['loss'](trackers['loss'], q, loss)}
    ckpts.append(q)
    losses.append(loss)
    steps.append((t + 1) * fc.every)
  return ckpts, np.stack(jax.device_get(losses), axis=1), np.asarray(
      steps, np.float32), trackers


@functools.partial(jax.jit, static_argnames=('kind', 'lora'))
def _merge_grid(ckpts_r, metric, penalties, *, kind, lora):
  """MWA at every penalty in one compiled, vmapped merge: ``[P, ...]``."""
  def one(p):
    tx = M.mwa(metric, kind=kind, penalty=p, lora=lora or 'delta')
    if lora:
      return mj.transforms.merge_lora(tx, ckpts_r)
    return mj.merge(tx, None, ckpts_r)
  return jax.vmap(one)(penalties)


# Small helpers jitted: op by op, every leaf would compile its own programs.
@jax.jit
def _max_diff(a, b):
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


@jax.jit
def _index(tree, i):
  return jax.tree.map(lambda v: v[i], tree)


@jax.jit
def _drop_first(tree):
  return jax.tree.map(lambda v: v[1:], tree)


@functools.partial(jax.jit, static_argnums=1)
def _broadcast(tree, n):
  return jax.tree.map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), tree)


def _run_setting(name, ev, ckpts, losses, steps, trackers, penalties, lora,
                 curves):
  """Rows of one setting; ``ev(trees) -> (val acc, val loss, test acc)``.

  The uniform average is MWA at penalty 0 (equal to
  `mergejax.methods.average`, as the tests check).
  """
  runs, n_ckpt = losses.shape
  n_p = len(penalties)
  ps = jnp.asarray([0.0] + list(penalties), jnp.float32)
  per = {m: dict(val=[], test=[], chosen=[]) for m in (
      'last checkpoint', 'best checkpoint (val)', 'uniform average',
      'MWA step', 'MWA loss')}
  grid_acc = {(k, s): [] for k in KINDS for s in ('val', 'test')}
  tracker_err = 0.0
  for r in range(runs):
    ckpts_r = _index(ckpts, r)
    grids = {}
    for kind in KINDS:
      metric = jnp.asarray(steps if kind == 'step' else losses[r])
      grids[kind] = _merge_grid(ckpts_r, metric, ps, kind=kind, lora=lora)
      tracked = _index(trackers[kind].merged, r)
      tracker_err = max(tracker_err, float(_max_diff(
          _drop_first(grids[kind]), tracked)))
    # One evaluation of [T checkpoints | step grid | loss grid].
    v_acc, v_loss, t_acc = map(np.asarray, ev(_stack(ckpts_r), grids['step'],
                                              grids['loss']))
    def pick(lo, hi):
      return lo + int(np.lexsort((v_loss[lo:hi], -v_acc[lo:hi]))[0])
    chosen = {'last checkpoint': n_ckpt - 1,
              'best checkpoint (val)': pick(0, n_ckpt),
              'uniform average': n_ckpt,
              'MWA step': pick(n_ckpt + 1, n_ckpt + 1 + n_p),
              'MWA loss': pick(n_ckpt + 2 + n_p, n_ckpt + 2 + 2 * n_p)}
    for m, i in chosen.items():
      per[m]['val'].append(float(v_acc[i]))
      per[m]['test'].append(float(t_acc[i]))
      if 'checkpoint' in m:
        per[m]['chosen'].append(float(steps[i]))
      elif m == 'uniform average':
        per[m]['chosen'].append(0.0)
      else:
        lo = n_ckpt + 1 if m == 'MWA step' else n_ckpt + 2 + n_p
        per[m]['chosen'].append(float(penalties[i - lo]))
    for j, kind in enumerate(KINDS):
      lo = n_ckpt + 1 + j * (n_p + 1)
      grid_acc[(kind, 'val')].append(v_acc[lo:lo + n_p])
      grid_acc[(kind, 'test')].append(t_acc[lo:lo + n_p])
  for kind in KINDS:
    for split in ('val', 'test'):
      mean = np.mean(grid_acc[(kind, split)], axis=0)
      curves += [dict(setting=name, kind=kind, split=split, penalty=float(p),
                      accuracy=float(a)) for p, a in zip(penalties, mean)]
  rows = []
  last = np.asarray(per['last checkpoint']['test'])
  uni = np.asarray(per['uniform average']['test'])
  for m, d in per.items():
    test = np.asarray(d['test'])
    rows.append(dict(
        setting=name, method=m, test_accuracy=round(float(test.mean()), 4),
        test_std=round(float(test.std()), 4),
        val_accuracy=round(float(np.mean(d['val'])), 4),
        chosen=('steps ' if 'checkpoint' in m else 'p ') + ', '.join(
            f'{v:g}' for v in d['chosen']),
        beats_last=f'{int(np.sum(test > last))}/{runs}',
        beats_uniform=f'{int(np.sum(test > uni))}/{runs}'))
  return rows, tracker_err


def _plot(path, curves, rows):
  plt = plotting._plt()  # pylint: disable=protected-access
  settings = list(dict.fromkeys(c['setting'] for c in curves))
  fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6),
                           squeeze=False)
  cols = dict(step='#4477AA', loss='#EE6677')
  for ax, setting in zip(axes[0], settings):
    for kind in KINDS:
      for split, ls in (('test', '-'), ('val', '--')):
        pts = [(c['penalty'], c['accuracy']) for c in curves
               if c['setting'] == setting and c['kind'] == kind
               and c['split'] == split]
        ax.plot([p for p, _ in pts], [a for _, a in pts], ls, marker='o',
                ms=3, color=cols[kind],
                label=f'MWA {kind} ({split})')
    ref = {r['method']: r['test_accuracy'] for r in rows
           if r['setting'] == setting}
    if 'last checkpoint' in ref:
      ax.axhline(ref['last checkpoint'], color='black', ls=':',
                 label='last checkpoint (test)')
    ax.set_xscale('symlog', linthresh=0.25)  # keeps penalty 0 on the axis
    ax.set_xlim(left=0.0)
    ax.set_xlabel('penalty p')
    ax.set_ylabel('accuracy (mean over runs)')
    ax.set_title(setting)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(config, workdir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  out_dir = os.path.join(workdir, 'mwa')
  os.makedirs(out_dir, exist_ok=True)
  fc = config.finetune
  penalties = [float(p) for p in config.penalties]
  model, task, base = _setup(config)
  data = {s: (jnp.asarray(getattr(task, s).x), jnp.asarray(getattr(task, s).y))
          for s in ('val', 'test')}
  key = jax.random.fold_in(jax.random.key(config.seed), 100)
  base_acc = float(_metrics(model, base, *data['test'])[0])

  def evaluator(to_params):
    full = jax.jit(jax.vmap(to_params))  # one compile per tree structure

    def ev(*stacks):
      params = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                            *[full(s) for s in stacks])
      return _evaluate(model, params, *data['val'], *data['test'])
    return ev

  rows, curves, checks, timing = [], [], {}, {}
  # Full fine-tuning: every run starts at the base.
  t0 = time.perf_counter()
  q0 = _broadcast(base, fc.runs)
  full = _train(model, task, lambda q: q, q0, jax.random.fold_in(key, 1), fc,
                fc.lr, penalties, 'delta')
  timing['train_full'] = time.perf_counter() - t0
  ev = evaluator(lambda q: q)
  r, err = _run_setting('full fine-tuning', ev, *full, penalties, None, curves)
  rows += r
  checks['tracker_vs_offline_full'] = err
  # LoRA: adapters from their own random a per run.
  t0 = time.perf_counter()
  to_params = functools.partial(with_adapter, base)
  ad0 = jax.jit(jax.vmap(lambda k: lora_init(base, fc.lora_rank, k)))(
      jax.random.split(jax.random.fold_in(key, 2), fc.runs))
  lora_run = _train(model, task, to_params, ad0, jax.random.fold_in(key, 3),
                    fc, fc.lora_lr, penalties, 'delta')
  ckpts, losses, steps, trackers = lora_run
  # The factor-average tracker, replayed on the same checkpoints.
  fac = _trackers(ad0, jnp.asarray(penalties, jnp.float32), 'factors')
  fac_update = {kind: jax.jit(jax.vmap(jax.vmap(
      M.mwa_tracker(kind=kind, lora='factors').update,
      in_axes=(0, None, None)))) for kind in KINDS}
  for t, q in enumerate(ckpts):
    for kind in KINDS:
      upd = fac_update[kind]
      metric = (jnp.full((fc.runs,), steps[t]) if kind == 'step'
                else jnp.asarray(losses[:, t]))
      fac[kind] = upd(fac[kind], q, metric)
  timing['train_lora'] = time.perf_counter() - t0
  ev = evaluator(to_params)
  r, err = _run_setting(f'LoRA r={fc.lora_rank}, delta average', ev, ckpts,
                        losses, steps, trackers, penalties, 'delta', curves)
  rows += r
  checks['tracker_vs_offline_lora_delta'] = err
  r, err = _run_setting(f'LoRA r={fc.lora_rank}, factor average', ev, ckpts,
                        losses, steps, fac, penalties, 'factors', curves)
  rows += r
  checks['tracker_vs_offline_lora_factors'] = err

  fig = os.path.join(out_dir, 'mwa.png')
  _plot(fig, curves, rows)
  notes = [f'task {config.task!r}: base model test accuracy {base_acc:.3f}; '
           f'{fc.runs} runs of {fc.steps} steps, a checkpoint every '
           f'{fc.every} steps ({fc.steps // fc.every} checkpoints); test '
           f'{len(task.test.y)} and validation {len(task.val.y)} images']
  by = {(r['setting'], r['method']): r for r in rows}
  for setting in dict.fromkeys(r['setting'] for r in rows):
    last = by[(setting, 'last checkpoint')]
    uni = by[(setting, 'uniform average')]
    for kind in KINDS:
      m = by[(setting, f'MWA {kind}')]
      notes.append(
          f'{setting}, MWA {kind}: test {m["test_accuracy"]:.3f}, '
          f'{100 * (m["test_accuracy"] - last["test_accuracy"]):+.1f} points '
          f'vs the last checkpoint (better in {m["beats_last"]} runs), '
          f'{100 * (m["test_accuracy"] - uni["test_accuracy"]):+.1f} points '
          f'vs the uniform average (better in {m["beats_uniform"]} runs); '
          f'chosen {m["chosen"]}')
  notes.append('running tracker vs offline mwa, max |difference| over all '
               'runs and penalties: ' + ', '.join(
                   f'{k.removeprefix("tracker_vs_offline_")} {v:.1e}'
                   for k, v in checks.items()))
  result = dict(
      experiment='mwa',
      title='MWA: metrics-weighted averaging of one run\'s checkpoints',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![accuracy against the MWA penalty](mwa.png)'),
      command='python -m experiments.main --config=configs/mwa.py '
              '--workdir=/tmp/mwa_run',
      notes=notes, provenance=results_lib.provenance(), rows=rows,
      curves=curves, base_test_accuracy=base_acc,
      train_loss=dict(steps=steps.tolist(),
                      full=full[1].mean(axis=0).round(4).tolist(),
                      lora=losses.mean(axis=0).round(4).tolist()),
      checks=checks,
      seconds=dict(total=time.perf_counter() - t_start,
                   **{k: round(v, 2) for k, v in timing.items()}),
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  results_lib.write_page(result, os.path.join(out_dir, 'results.md'))
  return result
