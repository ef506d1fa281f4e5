r"""A hyperparameter sweep of one merge method on the digits zoo.

Runs a per-method config (``configs/methods/<method>.py``, which sets
``config.experiment = 'sweep'``) through the launcher:

  python -m experiments.main --config=configs/methods/ties.py --workdir=workdir
  python -m experiments.main --config=configs/methods/ties.py:zoo=smoke \
      --workdir=/tmp/w --config.sweep.product='merge.density=(0.1, 0.3)'

The zoo is the default experiment's (same cache: a work directory shared with
``configs/default.py`` trains it once). The sweep (``config.sweep.product`` /
``config.sweep.zip``, ``'name=(v1, v2); name=(...)'``) is split by
`sweep_lib.run_sweep`: points that differ only in float merge hyperparameters
run as one vmapped, jit-compiled merge; other differences (ints, strings,
booleans, zoo settings) run as separate jobs. Every point is evaluated on the
validation and test splits of every task (merged backbone + each task's
fine-tuned head). Writes ``sweep.json`` / ``sweep.csv`` / ``sweep.md`` (one row
per point), ``results.json`` (config, best point by validation accuracy,
fine-tuned baselines) and ``sweep.png``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments.tools import plotting
from experiments import zoo
from experiments.tools import sweep as sweep_lib

from experiments import default as default_exp


def _take(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def prepare(protocol: str, base, fts: list):
  """``(base, models)`` that a method sees under ``protocol``."""
  if protocol == 'models':
    return base, fts
  if protocol == 'no_base':
    return None, fts
  if protocol == 'sum_endpoint':
    return base, [jax.tree.map(lambda x0, *xs: x0 + sum(x - x0 for x in xs),
                               base, *fts)]
  raise ValueError(f'protocol {protocol!r} is not one of models, no_base, '
                   'sum_endpoint, fold.')


def merge_points(cfg, numeric: dict[str, jax.Array], base, fts: list,
                 key: jax.Array):
  """Merged backbones ``[S, ...]`` for the S points of one structural group."""
  if cfg.protocol == 'fold':
    # Iterated pairwise merges: a Python loop over models (and points).
    n = next(iter(numeric.values())).shape[0] if numeric else 1
    out = []
    for s in range(n):
      hp = {k: v[s] for k, v in numeric.items()}
      m = fts[0]
      for i, ft in enumerate(fts[1:], start=2):
        tx = sweep_lib.build_method(cfg.merge, weight=(float(i - 1), 1.0),
                                    **hp)
        m = mj.merge(tx, base, [m, ft], key=jax.random.fold_in(key, i))
      out.append(m)
    return _stack(out)
  b, models = prepare(cfg.protocol, base, fts)
  if numeric:
    return sweep_lib.merge_sweep(cfg.merge, numeric, b, models, key)
  return _stack([mj.merge(sweep_lib.build_method(cfg.merge), b, models,
                                 key)])


def main(config, workdir: str) -> dict[str, Any]:
  """Runs the sweep; returns (and writes) the results dictionary."""
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  _, tasks, model, z, zoo_info = default_exp.build_zoo(config, workdir)
  names = [t.name for t in tasks]
  sub = config.params
  ev = zoo.TaskEvaluator(model, tasks, z.finetuned['head'])
  base_bb = z.base[sub]
  fts = [_take(z.finetuned[sub], i) for i in range(len(names))]
  ft_acc = np.diag(ev.accuracies(z.finetuned[sub], 'test'))
  base_acc = ev.accuracies(jax.tree.map(lambda x: x[None], base_bb), 'test')[0]

  points = sweep_lib.parse_sweep(config.sweep.product, config.sweep.zip)
  key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def job(cfg, numeric):
    bbs = merge_points(cfg, numeric, base_bb, fts, key)
    val = ev.accuracies(bbs, 'val')
    test = ev.accuracies(bbs, 'test')
    norm = zoo.normalized(test, ft_acc[None])
    return [dict(val_acc=float(val[s].mean()), test_acc=float(test[s].mean()),
                 test_norm=float(norm[s].mean()),
                 **{f'acc/{n}': float(test[s, j]) for j, n in enumerate(names)})
            for s in range(test.shape[0])]

  t0 = time.perf_counter()
  static = [n.strip() for n in config.sweep.get('static', '').split(',')
            if n.strip()]
  res = sweep_lib.run_sweep(config, points, job, workdir=workdir, static=static,
                     progress=None if config.progress else False)
  seconds = time.perf_counter() - t0
  best = max(range(len(res.rows)), key=lambda i: res.rows[i]['val_acc'])
  swept = list(dict.fromkeys(k for p in points for k in p))
  table = sweep_lib.format_table(
      res.rows, swept + ['val_acc', 'test_acc', 'test_norm', 'group'])
  print(f'\n{config.merge.method} ({config.get("variant", "")}): '
        f'{len(res.rows)} points in {res.groups} compiled job(s), '
        f'{seconds:.1f}s\n{table}')
  print(f'\nbest by validation: {res.rows[best]}\nbase test acc '
        f'{base_acc.mean():.3f} | fine-tuned {ft_acc.mean():.3f}')

  numeric = [k for k in swept if all(
      isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
      for r in res.rows)]
  if numeric:
    x = numeric[-1]
    others = [k for k in swept if k != x]
    rows = [dict(r, series=', '.join(f'{k.removeprefix("merge.")}={r[k]}'
                                     for k in others) or config.merge.method)
            for r in res.rows]
    plotting.sweep_plot(rows, x, 'test_norm', group='series',
                        title=f'{config.merge.method}: sweep on the digits zoo',
                        path=os.path.join(workdir, 'sweep.png'))
  results = dict(
      experiment='sweep', method=config.merge.method,
      config=json.loads(json.dumps(config.to_dict(), default=str)),
      rows=res.rows, groups=res.groups, best=res.rows[best], tasks=names,
      base_test_acc=float(base_acc.mean()),
      finetuned_test_acc=float(ft_acc.mean()),
      seconds=dict(total=time.perf_counter() - t_start, sweep=seconds))
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  print(f'wrote sweep.json, sweep.csv, sweep.md, results.json, sweep.png to '
        f'{workdir}')
  return results
