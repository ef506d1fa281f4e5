"""Calibration-size ablation of the data-informed merges on the digits zoo.

Each method in ``config.calibration_methods`` runs as in the default
experiment (its entry in ``config.methods``) with ``n`` calibration examples
per task for every ``n`` in ``config.sizes``: Fisher merging and RegMean(++)
take their statistics from the first ``n`` training inputs of each task,
AdaMerging and Expert Merging fit on the first ``n`` unlabeled validation
inputs. Batches are ``min(batch_size, n)`` examples. A split smaller than
``n`` is used whole (the validation splits hold 180 inputs per task, the
training splits 359); the rows record the number actually used, per task
and over all tasks together. Reported: mean test accuracy over the tasks
(each task read by its own head), and the figure ``calibration.png`` of
accuracy against the total number of calibration examples (``n`` times the
number of tasks), with task arithmetic (no data) as the reference line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from experiments import default as default_exp
from experiments import ties_ablation
from experiments.tools import plotting
from experiments.tools import results as results_lib


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'calibration')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)  # the default experiment's zoo
  tasks, names, model, heads, ev = (s['tasks'], s['names'], s['model'],
                                    s['heads'], s['ev'])
  base_bb, fts, sub = s['base'], s['fts'], config.merge.params
  key = jax.random.key(config.seed)
  # Task arithmetic at its validation-chosen lambda: the no-data reference.
  bbs, (_, lams), _ = default_exp.merge_method(
      'task_arithmetic', config.methods.task_arithmetic, base_bb, fts, key)
  val = ev.accuracies(bbs, 'val').mean(axis=1)
  ta = float(ev.accuracies(bbs, 'test')[int(np.argmax(val))].mean())
  rows = []
  for name in config.calibration_methods:
    for n in config.sizes:
      entry = config.methods[name].to_dict()
      split = 'val' if entry['data']['stats'] in ('unlabeled', 'expert') else (
          'train')
      used = min(int(n), min(len(getattr(t, split).x) for t in tasks))
      entry['data'].update(examples=used,
                           batch_size=min(entry['data']['batch_size'], used))
      entry = type(config.methods[name])(entry)
      t0 = time.perf_counter()
      data = default_exp.data_statistics(entry, model, sub, base_bb, fts,
                                         heads, tasks)
      out, _, _ = default_exp.merge_method(name, entry, base_bb, fts, key,
                                           data=data)
      acc = float(ev.accuracies(out, 'test')[0].mean())
      rows.append(dict(method=name, examples=int(n), examples_used=used,
                       examples_total=used * len(tasks), split=split,
                       avg_accuracy=round(acc, 4),
                       seconds=round(time.perf_counter() - t0, 2)))
      print(f'  {name:<18} n={n:<5} (used {used:<4}) acc {acc:.3f}',
            flush=True)
  fig_path = os.path.join(out_dir, 'calibration.png')
  plotting.sweep_plot(
      rows + [dict(method='task_arithmetic (no data)',
                   examples_total=n * len(tasks), avg_accuracy=ta)
              for n in config.sizes],
      'examples_total', 'avg_accuracy', group='method', logx=True,
      title=f'Accuracy against calibration examples ({len(tasks)} tasks)',
      path=fig_path)
  best = {m: max((r for r in rows if r['method'] == m),
                 key=lambda r: r['avg_accuracy']) for m in
          config.calibration_methods}
  notes = [f'task arithmetic (no data): {ta:.3f}'] + [
      f'{m}: {rows_m[0]["avg_accuracy"]:.3f} at {rows_m[0]["examples_total"]} '
      f'examples in total ({rows_m[0]["examples_used"]} per task), '
      f'{rows_m[-1]["avg_accuracy"]:.3f} at {rows_m[-1]["examples_total"]} '
      f'({rows_m[-1]["examples_used"]}); best {best[m]["avg_accuracy"]:.3f} '
      f'at {best[m]["examples_total"]} ({best[m]["examples_used"]})'
      for m in config.calibration_methods
      for rows_m in [[r for r in rows if r['method'] == m]]]
  result = dict(
      experiment='calibration',
      title='Calibration data: data-informed merges against the number of '
            'calibration examples',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![accuracy against calibration examples]'
                   '(calibration.png)'),
      command='python -m experiments.main --config=configs/calibration.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), tasks=names,
      task_arithmetic=ta, rows=rows,
      seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
