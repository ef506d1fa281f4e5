"""PLeaS on digits: two MLPs or CNNs trained on disjoint class splits, merged at 1x–2x.

Model A learns digits 0–4, model B digits 5–9 (different initialisations,
5-way heads). Each merge keeps both heads; accuracy is task-aware (each task's
test digits through its own head), averaged over the two tasks. Methods at
equal size: PLeaS (matching + partial permutation + closed-form least
squares), permute-then-average (same widths, blocks averaged), and
no-alignment averaging (same widths, no matching). ``config.data_free`` uses
Gaussian inputs instead of task data for matching and least squares.
``config.arch='cnn'`` trains `models.CNN` on the digits as 8x8x1 images
(with BatchNorm, the endpoints' running statistics are exact averages over
their training data; PLeaS recomputes the merged model's on the merge data).

The test set has ~225 digits per task, so one digit moves the mean accuracy
by ~0.22 points, and the digits on which methods disagree are the endpoints'
low-margin ones. The experiment therefore trains ``config.num_pairs``
independent model pairs and reports, per size, the mean accuracy, the number
of pairs in which PLeaS is at least as accurate as both baselines, and the
fidelity that PLeaS optimises: the task-aware mean squared error between the
merged logits and the endpoint's logits on the test digits, and the
task-aware test negative log-likelihood (a proper score, not limited to the
few low-margin digits that decide accuracy).

  python -m experiments.main --config=configs/pleas.py --workdir=/tmp/pleas
  python -m experiments.main --config=configs/pleas.py:cnn --workdir=/tmp/pleas_cnn
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import rebasin
from mergejax import permute
from mergejax.permute import models as M


def _endpoint_module(config):
  if config.arch == 'resnet':
    return M.ResNet(tuple(config.resnet_stages), tuple(config.resnet_widths),
                    num_outputs=5, norm=config.cnn_norm)
  if config.arch == 'cnn':
    return M.CNN(tuple(config.cnn_features), tuple(config.cnn_dense), num_outputs=5,
                 norm=config.cnn_norm)
  return M.MLP(tuple([config.width] * config.depth), num_outputs=5)


def _variables(v):
  return v if isinstance(v, dict) and 'params' in v else {'params': v}


def _logits(module, variables, x, head=None):
  out = module.apply(_variables(variables), jnp.asarray(x))
  if head is None:
    return np.asarray(out)
  return np.asarray(out[:, :5] if head == 0 else out[:, 5:])


def train_cnn(key, data, *, module, epochs, batch_size, lr):
  """Trains `models.CNN` or `models.ResNet` with Adam on (x, y).

  Returns params, or ``{'params', 'batch_stats'}`` for BatchNorm, with the
  running statistics recomputed exactly on the training inputs.
  """
  x, y = data
  init_key, key = jax.random.split(key)
  variables = module.init(init_key, jnp.asarray(x[:2]))
  params, stats = variables['params'], variables.get('batch_stats')
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, stats, state, xb, yb):
    def loss(p):
      v = {'params': p} if stats is None else {'params': p, 'batch_stats': stats}
      if stats is None:
        logits, new = module.apply(v, xb, train=True), None
      else:
        logits, upd = module.apply(v, xb, train=True, mutable=['batch_stats'])
        new = upd['batch_stats']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
      return ce, new
    (_, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    # optax mixes Python floats with int32 step counts (strict dtype
    # promotion, as in the tests, rejects it).
    with jax.numpy_dtype_promotion('standard'):
      upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), new, state

  n = len(x)
  for e in range(epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
    for i in range(0, n - batch_size + 1, batch_size):
      b = perm[i:i + batch_size]
      params, stats, state = step(params, stats, state, x[b], y[b])
  if stats is None:
    return params
  train = lambda v, xb: module.apply(v, xb, train=True, mutable=['batch_stats'])
  return permute.reset_batch_stats(train, {'params': params, 'batch_stats': stats},
                                   rebasin.batches(x, 256))


def main(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  (xtr, ytr), (xte, yte) = rebasin.load_digits(config.seed)
  if config.arch in ('cnn', 'resnet'):  # 8x8 grey-level images
    xtr, xte = xtr.reshape(-1, 8, 8, 1), xte.reshape(-1, 8, 8, 1)
  elif config.arch != 'mlp':
    raise ValueError(f"config.arch must be 'mlp', 'cnn' or 'resnet', got "
                     f'{config.arch!r}.')
  module = _endpoint_module(config)
  tasks = []
  for lo in (0, 5):
    tr, te = (ytr >= lo) & (ytr < lo + 5), (yte >= lo) & (yte < lo + 5)
    tasks.append(((xtr[tr], ytr[tr] - lo), (xte[te], yte[te] - lo)))
  features = [config.width] * config.depth
  if config.data_free:
    rng = np.random.default_rng(config.seed)
    data = rng.standard_normal(xtr.shape).astype(np.float32)
  else:
    data = np.concatenate([tasks[0][0][0], tasks[1][0][0]])
  batches = rebasin.batches(data, 256)
  pleas_kw = dict(inputs=config.ls_inputs, fit=config.fit)
  # Every method gets the same BatchNorm statistics policy.
  bn_kw = dict(bn_stats=config.bn_stats) if config.arch != 'mlp' else {}
  if config.task_tagged and not config.data_free:  # each task's rows, tagged
    parts = [rebasin.batches(tasks[i][0][0], 256) for i in range(2)]
    batches = parts[0] + parts[1]
    pleas_kw['batch_tasks'] = [0] * len(parts[0]) + [1] * len(parts[1])
  methods = {'pleas': pleas_kw,
             'permute_average': dict(least_squares=False),
             'no_alignment': dict(least_squares=False, align=False)}
  pairs, ends = [], []
  for p in range(config.num_pairs):  # pair 0: keys 100, 101
    if config.arch != 'mlp':
      models = [train_cnn(jax.random.key(100 + 2 * p + i), tasks[i][0], module=module,
                          epochs=config.epochs, batch_size=config.batch_size,
                          lr=config.lr) for i in range(2)]
    else:
      models = [rebasin.train_mlp(jax.random.key(100 + 2 * p + i), tasks[i][0],
                                  features=features, epochs=config.epochs,
                                  batch_size=config.batch_size, lr=config.lr,
                                  num_outputs=5) for i in range(2)]
    pairs.append(models)
    ends.append([_acc_single(module, models[i], *tasks[i][1]) for i in range(2)])
  arch_kw = dict(num_hidden=config.depth) if config.arch == 'mlp' else {}
  rows = []
  for size in config.sizes:
    row = {'target_size': size}
    per = {m: [] for m in methods}
    for models in pairs:
      ref = [_logits(module, models[i], tasks[i][1][0]) for i in range(2)]
      for name, kw in methods.items():
        r = permute.pleas(models[0], models[1], batches, size=size, ridge=config.ridge,
                          measure=config.measure, criterion=config.criterion,
                          **arch_kw, **bn_kw, **kw)
        out = [_logits(r.module(10), r.variables, tasks[i][1][0], head=i)
               for i in range(2)]
        acc = np.mean([np.mean(o.argmax(-1) == tasks[i][1][1])
                       for i, o in enumerate(out)])
        mse = np.mean([np.mean((o - f) ** 2) for o, f in zip(out, ref)])
        nll = np.mean([np.mean(_nll(o, tasks[i][1][1])) for i, o in enumerate(out)])
        per[name].append((float(acc), float(mse), r.size, list(r.widths), float(nll)))
    for name, vals in per.items():
      accs = [v[0] for v in vals]
      row[name] = float(np.mean(accs))
      row[f'{name}_sem'] = float(np.std(accs) / np.sqrt(len(accs)))
      row[f'{name}_accs'] = accs
      row[f'{name}_mse'] = float(np.mean([v[1] for v in vals]))
      row[f'{name}_nll'] = float(np.mean([v[4] for v in vals]))
      row[f'{name}_size'] = float(np.mean([v[2] for v in vals]))
      row[f'{name}_widths'] = [v[3] for v in vals]
    row['pleas_best_pairs'] = int(sum(
        per['pleas'][k][0] >= max(per['permute_average'][k][0], per['no_alignment'][k][0])
        for k in range(len(pairs))))
    rows.append(row)
    print(json.dumps(row), flush=True)
  ends = np.asarray(ends)
  n = len(pairs)
  arch = {'mlp': f'MLP {config.depth}x{config.width}',
          'cnn': f'CNN convs {tuple(config.cnn_features)} + dense '
                 f'{tuple(config.cnn_dense)}, norm={config.cnn_norm}, 8x8x1',
          'resnet': f'ResNet stages {tuple(config.resnet_stages)} widths '
                    f'{tuple(config.resnet_widths)}, norm={config.cnn_norm}, 8x8x1'
          }[config.arch]
  lines = [f'Digits {arch}, A: digits 0-4, B: 5-9; task-aware '
           f'test accuracy (mean of both tasks), mean over {n} model pairs; endpoints '
           f'{ends[:, 0].mean() * 100:.1f}% / {ends[:, 1].mean() * 100:.1f}%; '
           f'data_free={config.data_free}; least squares on {config.ls_inputs} inputs'
           f"{'; task-tagged rows' if 'batch_tasks' in pleas_kw else ''}"
           f"{'; gradient fit' if config.fit == 'gradient' else ''}"
           f"{'; size in FLOPs' if config.measure == 'flops' else ''}"
           f"{'; units chosen by correlation' if config.criterion == 'correlation' else ''}"
           f"{f'; BN statistics: {config.bn_stats}' if config.arch != 'mlp' else ''}\n",
           f'| size (x one model, {config.measure}) | PLeaS | permute + average | '
           'no alignment | '
           f'PLeaS best (of {n} pairs) | logit MSE to endpoints: PLeaS / perm + avg / '
           'none | test NLL: PLeaS / perm + avg / none |', '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['pleas_size']:.2f} | {r['pleas'] * 100:.1f}% | "
        f"{r['permute_average'] * 100:.1f}% | {r['no_alignment'] * 100:.1f}% | "
        f"{r['pleas_best_pairs']}/{n} | {r['pleas_mse']:.3f} / "
        f"{r['permute_average_mse']:.3f} / {r['no_alignment_mse']:.3f} | "
        f"{r['pleas_nll']:.3f} / {r['permute_average_nll']:.3f} / "
        f"{r['no_alignment_nll']:.3f} |")
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(workdir, 'pleas.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(workdir, 'pleas.json'), 'w') as f:
    json.dump({'config': config.to_dict(), 'endpoints': ends.tolist(), 'rows': rows},
              f, indent=1)
  _plot(rows, methods, os.path.join(workdir, 'pleas.png'))
  return rows


def _nll(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def _acc_single(module, variables, x, y):
  logits = module.apply(_variables(variables), jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def _plot(rows, methods, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 4))
  for m in methods:
    ax.errorbar([r[f'{m}_size'] for r in rows], [r[m] for r in rows],
                yerr=[r[f'{m}_sem'] for r in rows], fmt='o-', capsize=3, label=m)
  ax.set_xlabel('merged size / one model')
  ax.set_ylabel('task-aware test accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
