"""Black-box merging of a noisy model repository on the digits zoo.

The repository holds the zoo's 8 fine-tunes and ``config.search.irrelevant``
other models, in a shuffled order, of one of two kinds: ``noise`` (the base
plus a random update with the norm of a real task vector, leaf by leaf) or
``negated`` (a fine-tune's task vector negated, which undoes it). Every
search sees only the merged model's mean validation accuracy for a
coefficient vector over the repository (task-arithmetic weights), as a
black-box service would report:

* task arithmetic over the whole repository, one lambda from the default
  experiment's grid;
* CMA-ES over one coefficient per model (`mergejax.search.evolve`);
* Evo-Merging (`mergejax.search.evo_merging`) keeping ``keep`` models, for
  each ``keep`` in ``config.search.keeps``, with the same budget.

The reference is task arithmetic over the 8 fine-tunes alone (what a user
who knew which models are relevant would run). Reported on the test split,
with how many of the kept models are real fine-tunes.
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
from experiments.tools import results as results_lib


def _irrelevant(base, fts, count, key, kind):
  """Irrelevant models: the base plus random updates with the norms of real
  task vectors (``noise``), or the fine-tunes' task vectors negated
  (``negated``: each undoes a fine-tune)."""
  out = []
  for i in range(count):
    ref = fts[i % len(fts)]
    if kind == 'negated':
      out.append(jax.tree.map(lambda b, f: 2 * b - f, base, ref))
      continue
    if kind != 'noise':
      raise ValueError(f'search_blackbox: irrelevant kind {kind!r} is not '
                       "'noise' or 'negated'.")
    leaves = jax.tree.leaves(base)
    keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
    noise = jax.tree.unflatten(jax.tree.structure(base), [
        jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    out.append(jax.tree.map(
        lambda b, f, n: b + n * jnp.linalg.norm(f - b) / jnp.linalg.norm(n),
        base, ref, noise))
  return out


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'search_blackbox')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)  # the default experiment's zoo
  model, heads, ev, base_bb, fts = (s['model'], s['heads'], s['ev'],
                                    s['base'], s['fts'])
  sc = config.search
  key = jax.random.key(config.seed)
  x_val, y_val = ev.split('val', sc.examples)
  rows = []
  relevant_by_kind = {}
  for kind in sc.kinds:
    pool = fts + _irrelevant(base_bb, fts, sc.irrelevant,
                             jax.random.fold_in(key, 1), kind)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2),
                                              len(pool)))
    pool = [pool[i] for i in order]
    relevant = order < len(fts)  # position -> is a real fine-tune
    n = len(pool)

    def merged(c):
      return mj.merge(mj.methods.task_arithmetic(weight=c), base_bb, pool)

    def metric(c):  # the only access the searches get
      bb = merged(c)
      return jnp.mean(jax.vmap(
          lambda h, x, y: zoo.accuracy(model, bb, h, x, y))(heads, x_val,
                                                             y_val))

    def test_accuracy(c):
      return float(ev.accuracies(jax.tree.map(lambda v: v[None], merged(c)),
                                 'test').mean())

    lams = [float(v) for v in config.merge.lambdas]
    evaluate = mj.search.population_evaluator(metric,
                                              chunk_size=sc.chunk_size)
    grid = jnp.asarray([[lam] * n for lam in lams], jnp.float32)
    val = np.asarray(evaluate(grid))
    j = int(np.argmax(val))
    rows.append(dict(repository=kind, search=f'task arithmetic over all {n}',
                     evaluations=len(lams),
                     val_accuracy=round(float(val[j]), 4),
                     test_accuracy=round(test_accuracy(grid[j]), 4),
                     kept=n, kept_relevant=int(relevant.sum())))
    # Oracle: task arithmetic over the fine-tunes alone.
    bbs, (_, tl), _ = default_exp.merge_method(
        'task_arithmetic', config.methods.task_arithmetic, base_bb, fts, key)
    tval = ev.accuracies(bbs, 'val').mean(axis=1)
    jj = int(np.argmax(tval))
    rows.append(dict(repository=kind,
                     search=f'task arithmetic over the {len(fts)} fine-tunes '
                            '(oracle)', evaluations=len(np.asarray(tl)),
                     val_accuracy=round(float(tval[jj]), 4),
                     test_accuracy=round(float(ev.accuracies(bbs, 'test')[jj]
                                               .mean()), 4),
                     kept=len(fts), kept_relevant=len(fts)))
    t0 = time.perf_counter()
    r = mj.search.evolve(metric, jnp.full((n,), lams[j], jnp.float32),
                         key=jax.random.fold_in(key, 3),
                         generations=sc.generations,
                         population_size=sc.population,
                         params={'std_init': 0.2}, chunk_size=sc.chunk_size,
                         progress=config.progress)
    rows.append(dict(repository=kind,
                     search='CMA-ES, one coefficient per model',
                     evaluations=r.evaluations,
                     val_accuracy=round(r.best_fitness, 4),
                     test_accuracy=round(test_accuracy(r.best), 4),
                     kept=n, kept_relevant=int(relevant.sum()),
                     seconds=round(time.perf_counter() - t0, 1)))
    for keep in sc.keeps:
      t0 = time.perf_counter()
      c, r = mj.search.evo_merging(
          metric, n, jax.random.fold_in(key, 10 + keep), keep=keep,
          generations=sc.generations, population_size=sc.population,
          scale=(lams[j] * min(keep, len(fts)), 0.0),
          chunk_size=sc.chunk_size, progress=config.progress)
      on = np.asarray(c) > 0
      rows.append(dict(repository=kind, search=f'Evo-Merging, keep {keep}',
                       evaluations=r.evaluations,
                       val_accuracy=round(r.best_fitness, 4),
                       test_accuracy=round(test_accuracy(c), 4),
                       kept=int(on.sum()), kept_relevant=int((on & relevant)
                                                             .sum()),
                       seconds=round(time.perf_counter() - t0, 1)))
      print(f'  Evo-Merging keep {keep}: test {rows[-1]["test_accuracy"]:.3f}, '
            f'{rows[-1]["kept_relevant"]} of {rows[-1]["kept"]} kept are '
            'fine-tunes', flush=True)
    relevant_by_kind[kind] = relevant.tolist()
  notes = [f'repository: {len(fts)} fine-tunes and {sc.irrelevant} '
           f'irrelevant models ({len(fts) + sc.irrelevant} in all), '
           'shuffled'] + [
               f'{q["repository"]} repository, {q["search"]}: test '
               f'{q["test_accuracy"]:.3f} (val '
               f'{q["val_accuracy"]:.3f}) after {q["evaluations"]} '
               f'evaluations; {q["kept_relevant"]} of {q["kept"]} models '
               'with a nonzero coefficient are fine-tunes' for q in rows]
  result = dict(
      experiment='search_blackbox',
      title='Black-box merging of a noisy model repository',
      description=__doc__.split('\n\n', 1)[1].strip(),
      command='python -m experiments.main --config=configs/search_blackbox.py'
              ' --workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), rows=rows,
      relevant=relevant_by_kind, seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
