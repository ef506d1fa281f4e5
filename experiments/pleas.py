"""PLeaS on digits: two MLPs trained on disjoint class splits, merged at sizes 1x–2x.

Model A learns digits 0–4, model B digits 5–9 (different initialisations,
5-way heads). Each merge keeps both heads; accuracy is task-aware (each task's
test digits through its own head), averaged over the two tasks. Methods at
equal size: PLeaS (matching + partial permutation + closed-form least
squares), permute-then-average (same widths, blocks averaged), and
no-alignment averaging (same widths, no matching). ``config.data_free`` uses
Gaussian inputs instead of task data for matching and least squares.

  python -m experiments.main --config=configs/pleas.py --workdir=/tmp/pleas
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import rebasin
from mergejax import permute
from mergejax.permute import models as M


def _acc(params, widths, x, y, head):
  logits = M.MLP(tuple(widths), num_outputs=10).apply({'params': params}, jnp.asarray(x))
  logits = logits[:, :5] if head == 0 else logits[:, 5:]
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def main(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  (xtr, ytr), (xte, yte) = rebasin.load_digits(config.seed)
  tasks = []
  for lo in (0, 5):
    tr, te = (ytr >= lo) & (ytr < lo + 5), (yte >= lo) & (yte < lo + 5)
    tasks.append(((xtr[tr], ytr[tr] - lo), (xte[te], yte[te] - lo)))
  features = [config.width] * config.depth
  models = [rebasin.train_mlp(jax.random.key(100 + i), tasks[i][0], features=features,
                              epochs=config.epochs, batch_size=config.batch_size,
                              lr=config.lr, num_outputs=5) for i in range(2)]
  if config.data_free:
    rng = np.random.default_rng(config.seed)
    data = rng.standard_normal((len(xtr), xtr.shape[1])).astype(np.float32)
  else:
    data = np.concatenate([tasks[0][0][0], tasks[1][0][0]])
  batches = rebasin.batches(data, 256)
  ends = [_acc_single(models[i], features, *tasks[i][1]) for i in range(2)]
  rows = []
  methods = {'pleas': dict(), 'permute_average': dict(least_squares=False),
             'no_alignment': dict(least_squares=False, align=False)}
  for size in config.sizes:
    row = {'target_size': size}
    for name, kw in methods.items():
      r = permute.pleas(models[0], models[1], batches, num_hidden=config.depth,
                        size=size, ridge=config.ridge, **kw)
      accs = [_acc(r.params, r.widths, *tasks[i][1], head=i) for i in range(2)]
      row[name] = float(np.mean(accs))
      row[f'{name}_size'] = r.size
      row[f'{name}_widths'] = list(r.widths)
    rows.append(row)
    print(json.dumps(row), flush=True)
  lines = [f'Digits MLP {config.depth}x{config.width}, A: digits 0-4, B: 5-9; task-aware '
           f'test accuracy (mean of both tasks); endpoints {ends[0] * 100:.1f}% / '
           f'{ends[1] * 100:.1f}%; data_free={config.data_free}\n',
           '| size (x one model) | PLeaS | permute + average | no alignment |',
           '|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['pleas_size']:.2f} | {r['pleas'] * 100:.1f}% | "
                 f"{r['permute_average'] * 100:.1f}% | {r['no_alignment'] * 100:.1f}% |")
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(workdir, 'pleas.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(workdir, 'pleas.json'), 'w') as f:
    json.dump({'config': config.to_dict(), 'endpoints': ends, 'rows': rows}, f, indent=1)
  _plot(rows, methods, os.path.join(workdir, 'pleas.png'))
  return rows


def _acc_single(params, features, x, y):
  logits = M.MLP(tuple(features), num_outputs=5).apply({'params': params}, jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def _plot(rows, methods, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 4))
  for m in methods:
    ax.plot([r[f'{m}_size'] for r in rows], [r[m] for r in rows], 'o-', label=m)
  ax.set_xlabel('merged size / one model')
  ax.set_ylabel('task-aware test accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
