"""M2N2 on digits: classifiers evolved from scratch, and the zoo merged.

From scratch (the paper's MNIST setting, on scikit-learn's 8x8 digits): an
archive of randomly initialised MLPs (64 inputs, one hidden ReLU layer of
``config.search.width`` units, 10 classes) is evolved by `mergejax.search.m2n2`
with 0/1 correctness on every training image as the scores, and by CMA-ES and
Sep-CMA-ES (`mergejax.search.evolve`, fitness the training accuracy) with the
same number of evaluations, so the same forward passes. The ablations switch
off the matchmaker, the competition (alpha 0) or the split point; one more
M2N2 run gets the paper's budget of children. Reported:
the training and test accuracy of the best archive member (by training
accuracy), the forward passes and the wall time; ``m2n2_scratch.png`` shows
the best training accuracy against forward passes.

Seeded: the archive is the default zoo's 8 fine-tuned backbones, the scores
are correctness on every task's validation examples (each task read by its
own head), no mutation; the best member's test accuracy is compared with
task arithmetic at its validation-chosen lambda.
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


def _from_scratch(config, rows, curves):
  sc = config.search
  key = jax.random.key(config.seed)
  d = zoo.load_digits(jax.random.fold_in(key, 1), pretrain_frac=0.0,
                      val_frac=0.1, test_frac=0.3)
  x, y = jnp.asarray(d.train.x), jnp.asarray(d.train.y)
  xt, yt = jnp.asarray(d.test.x), jnp.asarray(d.test.y)
  model = zoo.Classifier(width=sc.width, depth=1)
  inits = jax.vmap(lambda k: zoo.init_params(model, k))(
      jax.random.split(jax.random.fold_in(key, 2), sc.archive))

  def correct(params, x=x, y=y):
    return (jnp.argmax(model.apply({'params': params}, x), -1) == y).astype(
        jnp.float32)

  test_acc = jax.jit(lambda p: jnp.mean(correct(p, xt, yt)))
  n_train = int(len(y))
  dim = int(sum(v.size for v in jax.tree.leaves(inits)) // sc.archive)
  runs = [(name, alpha, matchmaker, split, sc.children)
          for name, alpha, matchmaker, split in sc.variants]
  if sc.long_children:
    runs.append((f'M2N2, {sc.long_children:,} children', 1.0, True, True,
                 sc.long_children))
  for i, (name, alpha, matchmaker, split, children) in enumerate(runs):
    t0 = time.perf_counter()
    r = mj.search.m2n2(correct, inits, jax.random.fold_in(key, 10 + i),
                       steps=children, alpha=alpha, matchmaker=matchmaker,
                       split_point=split, mutation_std=sc.mutation_std)
    jax.block_until_ready(r.scores)
    seconds = time.perf_counter() - t0
    best = int(np.argmax(np.asarray(r.scores).mean(axis=1)))
    member = jax.tree.map(lambda v, b=best: v[b], r.archive)
    rows.append(dict(setting='from scratch', method=name,
                     evaluations=sc.archive + children,
                     forward_passes=(sc.archive + children) * n_train,
                     train_accuracy=round(float(r.scores[best].mean()), 4),
                     test_accuracy=round(float(test_acc(member)), 4),
                     accepted=round(float(r.history['accepted'].mean()), 3),
                     seconds=round(seconds, 1)))
    every = max(1, children // 100)
    curves += [dict(method=name, forward_passes=(sc.archive + s + 1) *
                    n_train, best_train_accuracy=float(b))
               for s, b in enumerate(r.history['best']) if s % every == 0]
    print(f'  {name:<26} train {rows[-1]["train_accuracy"]:.3f} test '
          f'{rows[-1]["test_accuracy"]:.3f} ({seconds:.1f}s)', flush=True)
  x0 = jax.tree.map(lambda v: v[0], inits)
  gens = sc.children // sc.population
  for strategy in sc.strategies:
    t0 = time.perf_counter()
    r = mj.search.evolve(lambda p: jnp.mean(correct(p)), x0,
                         key=jax.random.fold_in(key, 99), generations=gens,
                         population_size=sc.population, strategy=strategy,
                         params={'std_init': sc.cma_std},
                         progress=config.progress)
    seconds = time.perf_counter() - t0
    rows.append(dict(setting='from scratch', method=strategy,
                     evaluations=r.evaluations,
                     forward_passes=r.evaluations * n_train,
                     train_accuracy=round(r.best_fitness, 4),
                     test_accuracy=round(float(test_acc(r.best)), 4),
                     seconds=round(seconds, 1)))
    curves += [dict(method=strategy, forward_passes=int(e) * n_train,
                    best_train_accuracy=float(b))
               for e, b in zip(r.history['evaluations'],
                               r.history['best_so_far'])]
    print(f'  {strategy:<26} train {rows[-1]["train_accuracy"]:.3f} test '
          f'{rows[-1]["test_accuracy"]:.3f} ({seconds:.1f}s)', flush=True)
  return dim, n_train


def _seeded(config, workdir, rows):
  sc = config.search
  s = ties_ablation.setup(config, workdir)
  model, heads, ev, base_bb, fts = (s['model'], s['heads'], s['ev'],
                                    s['base'], s['fts'])
  key = jax.random.key(config.seed)
  x_val, y_val = ev.split('val', sc.examples)

  def correct(bb):
    pred = jax.vmap(lambda h, x: jnp.argmax(zoo.logits(model, bb, h, x), -1))(
        heads, x_val)
    return (pred == y_val).astype(jnp.float32).reshape(-1)

  archive = jax.tree.map(lambda *v: jnp.stack(v), *fts)
  t0 = time.perf_counter()
  r = mj.search.m2n2(correct, archive, jax.random.fold_in(key, 7),
                     steps=sc.seeded_children)
  jax.block_until_ready(r.scores)
  seconds = time.perf_counter() - t0
  best = int(np.argmax(np.asarray(r.scores).mean(axis=1)))
  member = jax.tree.map(lambda v: v[best][None], r.archive)
  bbs, (_, lams), _ = default_exp.merge_method(
      'task_arithmetic', config.methods.task_arithmetic, base_bb, fts, key)
  ta_val = ev.accuracies(bbs, 'val').mean(axis=1)
  j = int(np.argmax(ta_val))
  ta = dict(val=float(ta_val[j]),
            test=float(ev.accuracies(bbs, 'test')[j].mean()),
            lam=float(np.asarray(lams)[j]))
  best_ft = max(float(ev.accuracies(jax.tree.map(lambda v: v[None], f),
                                    'val').mean()) for f in fts)
  rows.append(dict(setting='seeded (8 fine-tunes)', method='M2N2',
                   evaluations=len(fts) + sc.seeded_children,
                   forward_passes=(len(fts) + sc.seeded_children) *
                   int(y_val.size),
                   train_accuracy=round(float(r.scores[best].mean()), 4),
                   test_accuracy=round(float(ev.accuracies(member, 'test')
                                             .mean()), 4),
                   accepted=round(float(r.history['accepted'].mean()), 3),
                   seconds=round(seconds, 1)))
  rows.append(dict(setting='seeded (8 fine-tunes)',
                   method=f'task arithmetic (lambda {ta["lam"]:g})',
                   evaluations=int(len(np.asarray(lams))),
                   train_accuracy=round(ta['val'], 4),
                   test_accuracy=round(ta['test'], 4)))
  print(f'  seeded M2N2 val {rows[-2]["train_accuracy"]:.3f} test '
        f'{rows[-2]["test_accuracy"]:.3f}; task arithmetic test '
        f'{ta["test"]:.3f}', flush=True)
  return best_ft


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'search_m2n2')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  rows, curves = [], []
  dim, n_train = _from_scratch(config, rows, curves)
  best_ft_val = _seeded(config, workdir, rows)
  fig = os.path.join(out_dir, 'm2n2_scratch.png')
  plotting.sweep_plot(curves, 'forward_passes', 'best_train_accuracy',
                      group='method', logx=True,
                      title='Evolving digits classifiers from scratch',
                      path=fig)
  scratch = {r['method']: r for r in rows if r['setting'] == 'from scratch'}
  m2 = scratch.get('M2N2')
  notes = [f'from scratch: {dim} parameters, {n_train} training images, '
           f'{m2["evaluations"]} evaluations '
           f'({m2["forward_passes"]:,} forward passes) per method, except '
           'the longer M2N2 run']
  for name, r in scratch.items():
    notes.append(f'{name}: test {r["test_accuracy"]:.3f} (train '
                 f'{r["train_accuracy"]:.3f}) in {r["seconds"]:.1f}s')
  seeded = [r for r in rows if r['setting'] != 'from scratch']
  notes.append(f'seeded from the 8 fine-tunes: M2N2 test '
               f'{seeded[0]["test_accuracy"]:.3f} against task arithmetic '
               f'{seeded[1]["test_accuracy"]:.3f}; the best single fine-tune '
               f'scores {best_ft_val:.3f} on the same validation scores')
  result = dict(
      experiment='search_m2n2',
      title='M2N2: evolving and merging models by natural niches',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![best training accuracy against forward passes]'
                   '(m2n2_scratch.png)'),
      command='python -m experiments.main --config=configs/search_m2n2.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), rows=rows,
      curves=curves, seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
