"""MAP: amortised Pareto fronts of merge coefficients on the digits zoo.

For each set of tasks in ``config.search.task_sets`` (2 and 3 of the 8), the
merge is task arithmetic of those tasks' vectors with one coefficient per
task in ``[low, high]``, and the objectives are the tasks' validation
accuracies (each task read by its own head). Three ways to the Pareto front
of these objectives:

* a brute-force grid of coefficients, every point evaluated (the reference);
* MAP (`mergejax.search.map_search`): per-task quadratic surrogates fitted by
  least squares to a small random design, the front read off the surrogates
  (`mergejax.search.surrogate_front`);
* MAP with adaptive sampling: points added where bootstrap surrogates
  disagree most.

The fronts are compared by hypervolume above the grid's worst metrics:
MAP's predicted front, and the same front's coefficients measured (a
check, not part of MAP's cost; up to ``check_points`` of them), against the
grid's. The predicted front can promise more than any merge attains (the
quadratics extrapolate at the box's edges, even past accuracy 1), so the
measured hypervolume is the comparison to read. Over all 8 tasks, nested MAP
(pairwise 2-D MAP problems in a tree,
uniform preference) returns one coefficient per task, compared on the test
split with task arithmetic at its validation-chosen lambda. Figures
``front_<tasks>.png`` show the 2-task fronts (and for 3 tasks, the first two
objectives of the 3-D fronts).
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
from experiments import default as default_exp
from experiments import ties_ablation
from experiments import zoo
from experiments.tools import plotting
from experiments.tools import results as results_lib


def _grid(d, steps, low, high):
  axes = [np.linspace(low, high, steps)] * d
  return jnp.asarray(np.stack(np.meshgrid(*axes, indexing='ij'), -1)
                     .reshape(-1, d), jnp.float32)


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'search_map')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)  # the default experiment's zoo
  names, model, heads, ev = s['names'], s['model'], s['heads'], s['ev']
  base_bb, fts = s['base'], s['fts']
  sc = config.search
  key = jax.random.key(config.seed)
  x_val, y_val = ev.split('val', sc.examples)

  def metrics_fn(tasks):
    idx = np.asarray(tasks)
    models = [fts[t] for t in tasks]
    sub_heads = jax.tree.map(lambda h: h[idx], heads)

    def metrics(c):
      bb = mj.merge(mj.methods.task_arithmetic(weight=c), base_bb, models)
      return jax.vmap(lambda h, x, y: zoo.accuracy(model, bb, h, x, y))(
          sub_heads, x_val[idx], y_val[idx])
    return metrics

  rows, fronts = [], {}
  for i, (tasks, steps) in enumerate(zip(sc.task_sets, sc.grid_steps)):
    tasks, d = tuple(int(t) for t in tasks), len(tasks)
    label = '+'.join(names[t] for t in tasks)
    metrics = metrics_fn(tasks)
    evaluate = mj.search.population_evaluator(metrics,
                                              chunk_size=sc.chunk_size)
    t0 = time.perf_counter()
    grid_c = _grid(d, steps, sc.low, sc.high)
    grid_m = np.asarray(evaluate(grid_c))
    grid_s = time.perf_counter() - t0
    grid_front = grid_m[np.asarray(mj.search.pareto_mask(grid_m))]
    ref = grid_m.min(axis=0) - 1e-3
    hv_grid = mj.search.hypervolume(grid_front, ref)
    rows.append(dict(tasks=label, method='grid', evaluations=int(len(grid_c)),
                     front_points=int(len(grid_front)),
                     hypervolume=round(hv_grid, 6), hypervolume_ratio=1.0,
                     measured_hypervolume_ratio=1.0,
                     seconds=round(grid_s, 2)))
    pts = {'grid (every point)': grid_m[:, :2],
           f'grid front ({len(grid_c)} evaluations)': grid_front[:, :2]}
    for variant, rounds in (('MAP', 0), ('MAP, adaptive', sc.rounds)):
      k = jax.random.fold_in(jax.random.fold_in(key, i), rounds)
      t0 = time.perf_counter()
      r = mj.search.map_search(metrics, d, k, initial=sc.initial,
                               rounds=rounds, per_round=sc.per_round,
                               low=sc.low, high=sc.high,
                               chunk_size=sc.chunk_size)
      c, predicted = mj.search.surrogate_front(
          r.surrogate, jax.random.fold_in(k, 7), samples=sc.front_samples,
          low=sc.low, high=sc.high)
      seconds = time.perf_counter() - t0
      # Measure an evenly spaced subset of the predicted front.
      pick = np.unique(np.linspace(0, len(c) - 1, min(sc.check_points,
                                                      len(c))).astype(int))
      measured = np.asarray(evaluate(c[pick]))
      hv_pred = mj.search.hypervolume(np.asarray(predicted), ref)
      hv_meas = mj.search.hypervolume(measured, ref)
      # How well the surrogate predicts: error at the measured front points.
      err = float(np.mean(np.abs(measured - np.asarray(predicted)[pick])))
      rows.append(dict(tasks=label, method=variant,
                       evaluations=int(r.evaluations),
                       front_points=int(len(c)),
                       hypervolume=round(hv_pred, 6),
                       hypervolume_ratio=round(hv_pred / hv_grid, 3),
                       measured_hypervolume_ratio=round(hv_meas / hv_grid, 3),
                       surrogate_error=round(err, 4),
                       seconds=round(seconds, 2)))
      pts[f'{variant} front, predicted ({r.evaluations} evaluations)'] = (
          np.asarray(predicted)[:, :2])
      pts[f'{variant} front, measured'] = measured[:, :2]
      print(f'  {label} {variant:<14} {r.evaluations:>4} evaluations: '
            f'hypervolume {hv_pred / hv_grid:.3f} of the grid\'s predicted, '
            f'{hv_meas / hv_grid:.3f} measured', flush=True)
    fig = os.path.join(out_dir, f'front_{d}_tasks.png')
    lines = [p for p in pts if 'front' in p]
    plotting.fronts_plot(
        pts, xlabel=f'{names[tasks[0]]} accuracy',
        ylabel=f'{names[tasks[1]]} accuracy', lines=lines,
        title=f'Pareto fronts, {label}' + (' (first two objectives)'
                                            if d > 2 else ''), path=fig)
    fronts[label] = dict(grid=grid_front.tolist(), reference=ref.tolist(),
                         figure=os.path.basename(fig))

  notes = []
  for label in fronts:
    g = next(r for r in rows if r['tasks'] == label and r['method'] == 'grid')
    for r in rows:
      if r['tasks'] == label and r['method'] != 'grid':
        notes.append(
            f'{label}, {r["method"]}: {r["evaluations"]} evaluations '
            f'({r["evaluations"] / g["evaluations"]:.1%} of the grid\'s '
            f'{g["evaluations"]}); predicted front hypervolume '
            f'{r["hypervolume_ratio"]:.3f} of the grid front\'s, measured '
            f'{r["measured_hypervolume_ratio"]:.3f}; mean surrogate error '
            f'{r["surrogate_error"]:.3f} at the front')

  nested = None
  if sc.nested:
    bbs, (_, lams), _ = default_exp.merge_method(
        'task_arithmetic', config.methods.task_arithmetic, base_bb, fts, key)
    ta_val = ev.accuracies(bbs, 'val').mean(axis=1)
    j = int(np.argmax(ta_val))
    ta_test = float(ev.accuracies(bbs, 'test')[j].mean())
    t0 = time.perf_counter()
    c, info = mj.search.nested_map(metrics_fn(tuple(range(len(names)))),
                                   len(names), jax.random.fold_in(key, 99),
                                   chunk_size=sc.chunk_size)
    seconds = time.perf_counter() - t0
    bb = mj.merge(mj.methods.task_arithmetic(weight=c), base_bb, fts)
    bb = jax.tree.map(lambda v: v[None], bb)
    nested = dict(coefficients=[round(float(v), 3) for v in c],
                  evaluations=int(info['evaluations']),
                  val=float(ev.accuracies(bb, 'val').mean()),
                  test=float(ev.accuracies(bb, 'test').mean()),
                  seconds=round(seconds, 2), task_arithmetic_test=ta_test,
                  task_arithmetic_lambda=float(np.asarray(lams)[j]),
                  task_arithmetic_evaluations=int(len(np.asarray(lams))))
    notes.append(
        f'nested MAP over all {len(names)} tasks (uniform preference): test '
        f'{nested["test"]:.3f} after {nested["evaluations"]} evaluations, '
        f'against task arithmetic {ta_test:.3f} (lambda '
        f'{nested["task_arithmetic_lambda"]:g} chosen on validation from '
        f'{nested["task_arithmetic_evaluations"]} values); coefficients '
        f'{nested["coefficients"]}')
    if nested['test'] < ta_test:
      notes.append(
          'nested MAP ends below task arithmetic here: each node maximises '
          'the mean accuracy of its own tasks, so pairs settle on large '
          'coefficients that interfere once the pairs are combined, and the '
          'upper nodes can only rescale whole subtrees.')
    print('  ' + notes[-1], flush=True)
  result = dict(
      experiment='search_map',
      title='MAP: amortised Pareto fronts of merge coefficients',
      description=(__doc__.split('\n\n', 1)[1].strip() + '\n\n' + '\n\n'.join(
          f'![Pareto fronts, {label}]({f["figure"]})'
          for label, f in fronts.items())),
      command='python -m experiments.main --config=configs/search_map.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), tasks=names,
      rows=rows, fronts=fronts, nested=nested,
      seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
