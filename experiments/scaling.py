"""Scaling with the number of merged models.

Launch with ``python -m experiments.main --config=configs/scaling.py
--workdir=/tmp/exp_work`` (see ``configs/scaling.py``). Writes
``results.json`` and ``results.png`` into ``<workdir>/scaling``; the zoo is the
default experiment's, cached in ``<workdir>/zoo``.

For every K and method, the first K fine-tunes are merged with
`experiments.default.merge_method` (the method's scale swept in one vmapped
call), evaluated on the first K tasks with their fine-tuned heads, the scale
chosen on validation, and the test accuracy normalized by each task's
fine-tuned accuracy. Each K is a new model-axis length, so one compilation per
(method, K).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any

import jax
import numpy as np

from experiments import zoo
from experiments.tools import plotting

from experiments import default as default_exp
from experiments import ties_ablation


def _plot(path: str, ks, curves: dict, ref: list[float]):
  plt = plotting._plt()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  cols = plotting.colors(list(curves))
  for name, ys in curves.items():
    pts = [(k, y) for k, y in zip(ks, ys) if y is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', ms=4,
            label=name, color=cols[name])
  ax.plot(ks, ref, color='gray', ls='--', label='base backbone + task heads')
  ax.axhline(1.0, color='black', lw=0.8, label='fine-tuned')
  ax.set_xlabel('number of merged models K')
  ax.set_ylabel('avg normalized accuracy on the K tasks (test)')
  ax.set_title('Merging the first K digits fine-tunes')
  ax.set_xticks(list(ks))
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(config, workdir: str) -> dict[str, Any]:
  """Runs the scaling experiment; returns (and writes) the results."""
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)
  outdir = os.path.join(workdir, 'scaling')
  os.makedirs(outdir, exist_ok=True)
  names, ft_acc = s['names'], s['ft_acc']
  ks = [int(k) for k in config.ks]
  bad = [k for k in ks if not 2 <= k <= len(names)]
  if bad:
    raise ValueError(f'config.ks has {bad}: each K must be in [2, '
                     f'{len(names)}] (the zoo has {len(names)} fine-tunes).')
  methods = [m.strip() for m in config.methods_to_run.split(',') if m.strip()]
  for m in methods:
    if m not in config.methods:
      raise ValueError(f'methods_to_run names {m!r}, which has no entry in '
                       f'config.methods; valid: {sorted(config.methods)}.')
    if config.methods[m].protocol != 'models':
      raise ValueError(f'{m}: the scaling experiment runs methods of the '
                       f"'models' protocol, not {config.methods[m].protocol!r}.")
  merge_key = jax.random.fold_in(jax.random.key(config.seed), 5)

  out = {m: {} for m in methods}
  reference = {}
  for k in ks:
    heads_k = jax.tree.map(lambda h, k=k: h[:k], s['heads'])
    ev = zoo.TaskEvaluator(s['model'], s['tasks'][:k], heads_k)
    ft_k = ft_acc[:k]
    one_base = jax.tree.map(lambda x: x[None], s['base'])
    reference[k] = float(zoo.normalized(ev.accuracies(one_base, 'test')[0],
                                        ft_k).mean())
    for m in methods:
      t0 = time.perf_counter()
      key = jax.random.fold_in(merge_key, zlib.crc32(m.encode()))
      bbs, sweep, _ = default_exp.merge_method(m, config.methods[m], s['base'],
                                               s['fts'][:k], key)
      val = ev.accuracies(bbs, 'val').mean(axis=1)
      test = ev.accuracies(bbs, 'test')
      best = int(np.argmax(val))
      rec = dict(avg_accuracy=float(test[best].mean()),
                 avg_normalized=float(zoo.normalized(test[best], ft_k).mean()),
                 accuracy=dict(zip(names[:k], map(float, test[best]))),
                 seconds=time.perf_counter() - t0)
      if sweep is not None:
        rec['selected'] = {sweep[0]: sweep[1][best]}
      out[m][k] = rec
      sel = ', '.join(f'{a}={v:g}' for a, v in rec.get('selected', {}).items())
      print(f'  K={k} {m:<16} norm {rec["avg_normalized"]:.3f}  {sel}  '
            f'({rec["seconds"]:.1f}s)', flush=True)

  head = f'{"method":<18}' + ''.join(f'{"K=" + str(k):>8}' for k in ks)
  lines = [head, '-' * len(head)]
  for m in methods:
    lines.append(f'{m:<18}' + ''.join(f'{out[m][k]["avg_normalized"]:>8.3f}'
                                      for k in ks))
  lines.append(f'{"base bb + heads":<18}' + ''.join(f'{reference[k]:>8.3f}'
                                                    for k in ks))
  table = '\n'.join(lines)
  lam_lines = [f'{m:<18}' + ''.join(
      f'{next(iter(out[m][k].get("selected", {"-": float("nan")}).values())):>8g}'
      for k in ks) for m in methods]
  total = time.perf_counter() - t_start
  results = dict(
      experiment='scaling', workdir=os.path.abspath(workdir),
      config=default_exp._jsonable(config.to_dict()),  # pylint: disable=protected-access
      tasks=names, ks=ks, methods=methods,
      finetuned_accuracy=dict(zip(names, map(float, ft_acc))),
      zoo=dict(hash=s['zoo_hash'], **s['zoo_info']),
      results={m: {str(k): r for k, r in out[m].items()} for m in methods},
      base_backbone_task_heads={str(k): v for k, v in reference.items()},
      table=table, seconds=dict(total=total, zoo=s['zoo_info']['seconds']),
      jax=dict(version=jax.__version__, backend=jax.default_backend()))
  print('\nAvg normalized test accuracy on the first K tasks (scale chosen on '
        'validation)\n' + table)
  print('\nSelected scale (lambda_ / alpha)\n' + '\n'.join(lam_lines),
        flush=True)
  with open(os.path.join(outdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  _plot(os.path.join(outdir, 'results.png'), ks,
        {m: [out[m][k]['avg_normalized'] for k in ks] for m in methods},
        [reference[k] for k in ks])
  print(f'wrote {outdir}/results.json and results.png in {total:.1f}s total')
  return results
