"""Evolutionary search of merge coefficients on the digits zoo.

Each run in ``config.search.runs`` searches task-arithmetic coefficients of
the 8 task vectors, task-wise (one coefficient per task, 8 numbers) or
layer-wise (one per task and parameter leaf, `mergejax.methods.adamerging`'s
parametrisation, 32 numbers), with `mergejax.search.evolve`: an evosax
strategy proposes a population per generation, the whole population is
merged and scored in one compiled, vmapped call. The fitness is the mean
validation accuracy over the tasks (each task read by its own head); the
best candidate found is then evaluated on the test split. Every search starts
from the coefficient ``config.search.x0`` for every task, not from a tuned
value. The reference points: a random search with the same number of
evaluations (Gaussian candidates around the same start with the same
spread), task arithmetic with its single lambda chosen on the same
validation split from the default experiment's grid, and layer-wise
AdaMerging (entropy on unlabeled validation inputs, the default
experiment's settings). Reported per run: validation and test accuracy of
the best candidate, evaluations, wall time; the figure ``search.png`` shows
the best validation accuracy found against the number of evaluations.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import mergejax as mj
from experiments import default as default_exp
from experiments import ties_ablation
from experiments import zoo
from experiments.tools import plotting
from experiments.tools import results as results_lib


def _x0(coefficients, k, backbone, value):
  if coefficients == 'task-wise':
    return jnp.full((k,), value, jnp.float32)
  if coefficients == 'layer-wise':
    return jax.tree.map(lambda _: jnp.full((k,), value, jnp.float32), backbone)
  raise ValueError(f'search run: coefficients must be task-wise or '
                   f'layer-wise, got {coefficients!r}.')


def _transformation(c):
  # A [K] array is one coefficient per task; a backbone-shaped tree of [K]
  # leaves is one per task and leaf.
  if isinstance(c, jax.Array) and c.ndim == 1:
    return mj.methods.task_arithmetic(weight=c)
  return mj.methods.adamerging(c)


def _random_search(fitness, x0, run, key, chunk_size):
  """The same budget as an evolution run, spent on Gaussian candidates."""
  evaluate = mj.search.population_evaluator(fitness, chunk_size=chunk_size)
  flat0, unravel = ravel_pytree(x0)
  best, best_f, evals, t0 = None, -np.inf, 0, time.perf_counter()
  history = dict(evaluations=[], best_so_far=[], seconds=[])
  for g in range(run.generations):
    pop = flat0[None] + run.std * jax.random.normal(
        jax.random.fold_in(key, g), (run.population, flat0.size))
    fit = np.asarray(evaluate(jax.vmap(unravel)(pop)))
    evals += run.population
    if fit.max() > best_f:
      best, best_f = unravel(pop[int(fit.argmax())]), float(fit.max())
    history['evaluations'].append(evals)
    history['best_so_far'].append(best_f)
    history['seconds'].append(time.perf_counter() - t0)
  return best, best_f, evals, history


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'search_evolution')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)  # the default experiment's zoo
  names, model, heads, ev = s['names'], s['model'], s['heads'], s['ev']
  base_bb, fts, k = s['base'], s['fts'], len(s['names'])
  sc = config.search
  key = jax.random.key(config.seed)
  x_val, y_val = ev.split('val', sc.examples)

  def fitness(c):
    bb = mj.merge(_transformation(c), base_bb, fts)
    return jnp.mean(jax.vmap(lambda h, x, y: zoo.accuracy(model, bb, h, x, y))(
        heads, x_val, y_val))

  def test_accuracy(c):
    bb = mj.merge(_transformation(c), base_bb, fts)
    return float(ev.accuracies(jax.tree.map(lambda v: v[None], bb),
                               'test').mean())

  # Task arithmetic, one lambda from the default experiment's grid chosen on
  # the validation split the searches read.
  bbs, (_, lams), _ = default_exp.merge_method(
      'task_arithmetic', config.methods.task_arithmetic, base_bb, fts, key)
  ta_val = ev.accuracies(bbs, 'val').mean(axis=1)
  i = int(np.argmax(ta_val))
  ta = dict(lam=float(np.asarray(lams)[i]), val=float(ta_val[i]),
            test=float(ev.accuracies(bbs, 'test')[i].mean()))
  print(f'  task arithmetic: lambda {ta["lam"]:g}, val {ta["val"]:.3f}, '
        f'test {ta["test"]:.3f}', flush=True)
  # Layer-wise AdaMerging as in the default experiment (entropy, unlabeled).
  entry = config.methods.adamerging
  data = default_exp.data_statistics(entry, model, config.merge.params,
                                     base_bb, fts, heads, s['tasks'])
  out, _, _ = default_exp.merge_method('adamerging', entry, base_bb, fts, key,
                                       data=data)
  ada = dict(val=float(ev.accuracies(out, 'val')[0].mean()),
             test=float(ev.accuracies(out, 'test')[0].mean()))

  rows, curves, best_coefficients = [], [], {}
  for i, (name, run) in enumerate(sorted(sc.runs.items())):
    x0 = _x0(run.coefficients, k, base_bb, sc.x0)
    run_key = jax.random.fold_in(key, i)
    t0 = time.perf_counter()
    if run.strategy == 'random':
      best, best_f, evals, history = _random_search(fitness, x0, run, run_key,
                                                    sc.chunk_size)
    else:
      population_based = run.strategy in ('SimpleGA',)
      kwargs = {'std_schedule': optax.exponential_decay(
          run.std, 1, sc.ga_decay)} if population_based else None
      r = mj.search.evolve(
          fitness, x0, key=run_key, generations=run.generations,
          population_size=run.population, strategy=run.strategy,
          strategy_kwargs=kwargs,
          params=None if population_based else {'std_init': run.std},
          init_std=run.std if population_based else None,
          chunk_size=sc.chunk_size, progress=config.progress)
      best, best_f, evals, history = (r.best, r.best_fitness, r.evaluations,
                                      r.history)
    seconds = time.perf_counter() - t0
    test = test_accuracy(best)
    flat = np.asarray(ravel_pytree(best)[0])
    rows.append(dict(run=name, strategy=run.strategy,
                     coefficients=run.coefficients,
                     dimension=int(flat.size), population=run.population,
                     generations=run.generations, evaluations=int(evals),
                     val_accuracy=round(float(best_f), 4),
                     test_accuracy=round(test, 4),
                     coefficient_mean=round(float(flat.mean()), 3),
                     coefficient_range=f'{flat.min():.2f}...{flat.max():.2f}',
                     seconds=round(seconds, 1)))
    best_coefficients[name] = jax.tree.map(lambda v: np.asarray(v).tolist(),
                                           best)
    curves += [dict(run=name, evaluations=int(e), best_val_accuracy=float(b))
               for e, b in zip(history['evaluations'],
                               history['best_so_far'])]
    print(f'  {name:<22} val {best_f:.3f} test {test:.3f} '
          f'({evals} evaluations, {seconds:.1f}s)', flush=True)

  budget = max(r['evaluations'] for r in rows)
  fig_path = os.path.join(out_dir, 'search.png')
  plotting.sweep_plot(
      curves + [dict(run='task arithmetic (val-chosen lambda)', evaluations=e,
                     best_val_accuracy=ta['val'])
                for e in (len(np.asarray(lams)), budget)],
      'evaluations', 'best_val_accuracy', group='run', logx=True,
      title='Best validation accuracy found against evaluations',
      path=fig_path)
  notes = [
      f'task arithmetic, lambda chosen on validation ({ta["lam"]:g} from '
      f'{len(np.asarray(lams))} values): val {ta["val"]:.3f}, test '
      f'{ta["test"]:.3f}',
      f'layer-wise AdaMerging (entropy, default settings): val '
      f'{ada["val"]:.3f}, test {ada["test"]:.3f}']
  for r in rows:
    rand = next((q for q in rows if q['strategy'] == 'random' and
                 q['coefficients'] == r['coefficients']), None)
    vs = '' if rand is None or rand is r else (
        f'; random search with the same budget: test '
        f'{rand["test_accuracy"]:.3f}')
    notes.append(f'{r["run"]}: test {r["test_accuracy"]:.3f} (val '
                 f'{r["val_accuracy"]:.3f}) after {r["evaluations"]} '
                 f'evaluations, {r["test_accuracy"] - ta["test"]:+.3f} against '
                 f'task arithmetic{vs}')
  result = dict(
      experiment='search_evolution',
      title='Evolutionary search of merge coefficients',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![best validation accuracy against evaluations]'
                   '(search.png)'),
      command='python -m experiments.main --config=configs/search_evolution.py'
              ' --workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), tasks=names,
      task_arithmetic=ta, adamerging=ada, rows=rows, curves=curves,
      best_coefficients=best_coefficients,
      seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
