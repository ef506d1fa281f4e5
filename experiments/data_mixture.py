"""Linear merges of domain experts as a proxy for data-mixture training.

The domains are some of the zoo's tasks (input transforms of digits). For
every mixture ``r`` on a simplex grid over them, two models start from the
zoo's base model (backbone and head, one head shared by all domains):

* trained: fine-tuned, with the zoo's fine-tuning settings, on
  ``config.mixture.examples`` training images drawn from the domains in
  proportions ``r``;
* merged: the linear merge ``sum_d r_d * expert_d`` of the domain experts,
  each fine-tuned the same way on its domain alone (the grid's vertices).

Every model is read on the test split of each domain, of their mean, and of
a held-out domain none of them trains on. Reported per target: the Spearman
rank correlation across the grid between the merged and the trained models'
accuracies, and whether the mixture the merges rank best is the one training
ranks best. A high correlation means the merges can choose a mixture without
training on it, as the data-mixture-by-merging papers report for language
models.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import mergejax as mj
from experiments import default as default_exp
from experiments import zoo
from experiments.tools import plotting
from experiments.tools import results as results_lib


def simplex_grid(d: int, steps: int) -> np.ndarray:
  """Every ``[d]`` weight vector with entries in ``{0, 1/steps, ..., 1}``
  summing to 1."""
  return np.array([np.array(c, np.float64) / steps for c in
                   itertools.product(range(steps + 1), repeat=d)
                   if sum(c) == steps])


def _mixture_task(tasks, r, n, key):
  """A task whose training split mixes the domains in proportions ``r``."""
  counts = np.floor(np.asarray(r) * n).astype(int)
  counts[np.argmax(r)] += n - counts.sum()  # exactly n examples
  xs, ys = [], []
  for t, c, k in zip(tasks, counts, jax.random.split(key, len(tasks))):
    idx = np.asarray(jax.random.choice(k, len(t.train.x), (int(c),),
                                       replace=bool(c > len(t.train.x))))
    xs.append(t.train.x[idx])
    ys.append(t.train.y[idx])
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n))
  x, y = np.concatenate(xs)[perm], np.concatenate(ys)[perm]
  return tasks[0]._replace(name='mixture', train=tasks[0].train._replace(
      x=x, y=y))


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'data_mixture')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  mc = config.mixture
  _, tasks, model, z, _ = default_exp.build_zoo(config, workdir)
  by_name = {t.name: t for t in tasks}
  missing = [n for n in (*mc.domains, mc.held_out) if n not in by_name]
  if missing:
    raise ValueError(f'data_mixture: {missing} are not zoo tasks '
                     f'{sorted(by_name)}; set config.zoo.tasks or '
                     'config.mixture.domains.')
  domains = [by_name[n] for n in mc.domains]
  grid = simplex_grid(len(domains), mc.grid_steps)
  key = jax.random.key(config.seed)
  ft = dict(config.zoo.finetune)
  mixtures = [_mixture_task(domains, r, mc.examples, jax.random.fold_in(key, i))
              for i, r in enumerate(grid)]
  t0 = time.perf_counter()
  trained = zoo.finetune(model, z.base, mixtures, jax.random.fold_in(key, 7),
                         show=config.progress, **ft)
  vertices = [_mixture_task(domains, np.eye(len(domains))[d], mc.examples,
                            jax.random.fold_in(key, 1000 + d))
              for d in range(len(domains))]
  experts = zoo.finetune(model, z.base, vertices, jax.random.fold_in(key, 8),
                         show=config.progress, **ft)
  train_s = time.perf_counter() - t0
  expert_list = [jax.tree.map(lambda v, d=d: v[d], experts)
                 for d in range(len(domains))]
  merged = jax.vmap(lambda r: mj.merge(mj.methods.linear(weight=r), None,
                                       expert_list))(
                                           jnp.asarray(grid, jnp.float32))
  targets = [*mc.domains, mc.held_out]

  def accuracies(params):  # [S] models -> [S, targets]
    def one(p):
      return jnp.stack([zoo.accuracy(model, p['backbone'], p['head'],
                                     jnp.asarray(by_name[n].test.x),
                                     jnp.asarray(by_name[n].test.y))
                        for n in targets])
    return np.asarray(jax.jit(jax.vmap(one))(params))

  acc_t, acc_m = accuracies(trained), accuracies(merged)
  cols = {n: i for i, n in enumerate(targets)}
  rows, per_mixture = [], []
  for name, (t, m) in [(n, (acc_t[:, i], acc_m[:, i])) for n, i in
                       cols.items()] + [
                           ('mean of the domains', (
                               acc_t[:, :len(domains)].mean(1),
                               acc_m[:, :len(domains)].mean(1)))]:
    rho, p = stats.spearmanr(m, t)
    rows.append(dict(target=name, spearman=round(float(rho), 3),
                     p_value=float(f'{p:.2g}'),
                     best_by_merge=', '.join(f'{v:g}' for v in
                                             grid[int(np.argmax(m))]),
                     best_by_training=', '.join(f'{v:g}' for v in
                                                grid[int(np.argmax(t))]),
                     trained_accuracy_of_merge_pick=round(
                         float(t[int(np.argmax(m))]), 4),
                     best_trained_accuracy=round(float(t.max()), 4)))
  for i, r in enumerate(grid):
    per_mixture.append(dict(
        mixture=', '.join(f'{v:g}' for v in r),
        **{f'trained/{n}': round(float(acc_t[i, j]), 4)
           for n, j in cols.items()},
        **{f'merged/{n}': round(float(acc_m[i, j]), 4)
           for n, j in cols.items()}))
  mean_t = acc_t[:, :len(domains)].mean(1)
  mean_m = acc_m[:, :len(domains)].mean(1)
  fig = os.path.join(out_dir, 'mixture.png')
  plotting.fronts_plot(
      {'mixtures (mean of the domains)': np.stack([mean_m, mean_t], 1),
       f'held out ({mc.held_out})': np.stack([acc_m[:, -1], acc_t[:, -1]],
                                              1)},
      xlabel='linear merge of the experts (test accuracy)',
      ylabel='trained on the mixture (test accuracy)',
      title=f'{len(grid)} mixtures of {", ".join(mc.domains)}', path=fig)
  notes = [f'{len(grid)} mixtures of {len(domains)} domains, '
           f'{mc.examples} training images each; {len(grid) + len(domains)} '
           f'fine-tunes in {train_s:.1f}s'] + [
               f'{r["target"]}: Spearman {r["spearman"]:+.3f} (p '
               f'{r["p_value"]:g}); the merges pick ({r["best_by_merge"]}), '
               f'training picks ({r["best_by_training"]}): '
               f'{r["trained_accuracy_of_merge_pick"]:.3f} against '
               f'{r["best_trained_accuracy"]:.3f}' for r in rows]
  result = dict(
      experiment='data_mixture',
      title='Linear merges as a proxy for data-mixture training',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![merged against trained accuracy](mixture.png)'),
      command='python -m experiments.main --config=configs/data_mixture.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), rows=rows,
      mixtures=per_mixture, seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
