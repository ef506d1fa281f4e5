"""Zero-order layer-wise search (MedSAMix-style) on the digits zoo.

The methods in ``config.search.methods`` merge the zoo once each at unit
scale; `mergejax.search.layerwise_space` turns their updates into a space
where every block (each Dense layer's kernel and bias, or each layer) takes
one method's update at its own weight. CMA-ES (`mergejax.search.evolve`)
searches the per-block method logits and weights, starting from equal
logits (no method preferred) and ``x0_weight`` everywhere:

* single objective: mean validation accuracy over the tasks;
* multi-objective: the mean validation accuracy of the first half of the
  tasks against the second half, one search per preference ``p`` (fitness
  ``p * first + (1 - p) * second``); the Pareto front of what the searches
  found is compared, by hypervolume, with the front of every method alone at
  every weight of ``config.search.weights`` (uniform across blocks).

The reference for the single objective is each method alone at its best
uniform weight on the same validation split (the same grid); everything is
reported on the test split.
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


def _unit_merges(config, methods, base_bb, fts, key):
  out = {}
  for name in methods:
    entry = config.methods[name]
    (pname,) = tuple(entry.sweep.to_dict())
    bbs, _, _ = default_exp.merge_method(name, entry, base_bb, fts, key,
                                         population={pname: [1.0]})
    out[name] = jax.tree.map(lambda v: v[0], bbs)
  return out


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'search_layerwise')
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  s = ties_ablation.setup(config, workdir)  # the default experiment's zoo
  names, model, heads, ev = s['names'], s['model'], s['heads'], s['ev']
  base_bb, fts, k = s['base'], s['fts'], len(s['names'])
  sc = config.search
  key = jax.random.key(config.seed)
  x_val, y_val = ev.split('val', sc.examples)
  merged = _unit_merges(config, sc.methods, base_bb, fts, key)
  leaf_index = {p: i for i, p in enumerate(mj.leaf_paths(base_bb))}
  block_of = (leaf_index.get if sc.blocks == 'leaf' else None)
  space = mj.search.layerwise_space(base_bb, merged, block_of=block_of)
  half = k // 2

  def task_accuracies(c):
    bb = mj.search.layerwise_merge(space, c)
    return jax.vmap(lambda h, x, y: zoo.accuracy(model, bb, h, x, y))(
        heads, x_val, y_val)

  def groups(c):
    a = task_accuracies(c)
    return jnp.stack([jnp.mean(a[:half]), jnp.mean(a[half:])])

  def test_accuracy(c):
    bb = jax.tree.map(lambda v: v[None], mj.search.layerwise_merge(space, c))
    return ev.accuracies(bb, 'test')[0]

  # Each method alone, uniform weight, chosen on validation.
  evaluate = mj.search.population_evaluator(groups, chunk_size=sc.chunk_size)
  rows, uniform = [], []
  for m, name in enumerate(space.methods):
    cands = [mj.search.layerwise_candidate(space, w, method=m)
             for w in sc.weights]
    pop = jax.tree.map(lambda *v: jnp.stack(v), *cands)
    g = np.asarray(evaluate(pop))
    uniform.append(g)
    best = int(np.argmax(g.mean(axis=1)))
    rows.append(dict(search=f'{name} alone (uniform weight)',
                     evaluations=len(sc.weights),
                     weight=float(sc.weights[best]),
                     val_accuracy=round(float(g[best].mean()), 4),
                     test_accuracy=round(float(test_accuracy(
                         cands[best]).mean()), 4)))
  # Equal logits: no method is preferred at the start (the search's noise
  # decides each block's first choice).
  x0 = mj.search.layerwise_candidate(space, sc.x0_weight,
                                     method=[0.0] * len(space.methods))
  t0 = time.perf_counter()
  r = mj.search.evolve(lambda c: jnp.mean(task_accuracies(c)), x0,
                       key=jax.random.fold_in(key, 1),
                       generations=sc.generations,
                       population_size=sc.population,
                       params={'std_init': sc.std}, chunk_size=sc.chunk_size,
                       progress=config.progress)
  choice = [space.methods[int(i)] for i in np.argmax(r.best['logits'], -1)]
  rows.append(dict(search='layer-wise CMA-ES (mean accuracy)',
                   evaluations=r.evaluations,
                   val_accuracy=round(r.best_fitness, 4),
                   test_accuracy=round(float(test_accuracy(r.best).mean()), 4),
                   blocks=', '.join(
                       f'{c}@{float(w):.2f}' for c, w in zip(
                           choice, r.best['weight'])),
                   seconds=round(time.perf_counter() - t0, 1)))
  print(f'  layer-wise CMA-ES: val {r.best_fitness:.3f}, test '
        f'{rows[-1]["test_accuracy"]:.3f} ({rows[-1]["blocks"]})', flush=True)

  found = []
  for i, p in enumerate(sc.preferences):
    w = jnp.array([p, 1.0 - p], jnp.float32)
    rp = mj.search.evolve(lambda c, w=w: jnp.dot(groups(c), w), x0,
                          key=jax.random.fold_in(key, 100 + i),
                          generations=sc.generations,
                          population_size=sc.population,
                          params={'std_init': sc.std},
                          chunk_size=sc.chunk_size, progress=config.progress)
    found.append(np.asarray(groups(rp.best)))
  found = np.stack(found)
  every_uniform = np.concatenate(uniform)
  ref = np.minimum(every_uniform.min(axis=0), found.min(axis=0)) - 1e-3
  hv_search = mj.search.hypervolume(found, ref)
  hv_uniform = mj.search.hypervolume(every_uniform, ref)
  fig = os.path.join(out_dir, 'layerwise_front.png')
  pts = {f'{n} alone ({len(sc.weights)} weights)': g[:, :2]
         for n, g in zip(space.methods, uniform)}
  front_u = every_uniform[np.asarray(mj.search.pareto_mask(every_uniform))]
  pts['front of the methods alone'] = front_u
  pts[f'layer-wise searches ({len(sc.preferences)} preferences)'] = found
  plotting.fronts_plot(
      pts, xlabel=f'mean accuracy, tasks 1-{half}',
      ylabel=f'mean accuracy, tasks {half + 1}-{k}',
      lines=['front of the methods alone',
             f'layer-wise searches ({len(sc.preferences)} preferences)'],
      title='Two task groups: validation accuracy', path=fig)
  best_alone = max((q for q in rows if 'alone' in q['search']),
                   key=lambda q: q['val_accuracy'])
  search = rows[-1]
  notes = [
      f'{space.num_blocks} blocks x ({len(space.methods)} method logits + 1 '
      f'weight) = {space.num_blocks * (len(space.methods) + 1)} numbers '
      'searched',
      f'single objective: layer-wise search test {search["test_accuracy"]:.3f} '
      f'(val {search["val_accuracy"]:.3f}, {search["evaluations"]} '
      f'evaluations) against the best method alone, {best_alone["search"]}, '
      f'test {best_alone["test_accuracy"]:.3f} (val '
      f'{best_alone["val_accuracy"]:.3f})',
      f'multi-objective: hypervolume of the {len(sc.preferences)} searched '
      f'merges {hv_search:.4f} against {hv_uniform:.4f} for every method '
      f'alone at every weight ({len(every_uniform)} merges); ratio '
      f'{hv_search / max(hv_uniform, 1e-12):.3f}']
  result = dict(
      experiment='search_layerwise',
      title='Zero-order layer-wise search of merge configurations',
      description=(__doc__.split('\n\n', 1)[1].strip() +
                   '\n\n![two task groups](layerwise_front.png)'),
      command='python -m experiments.main --config=configs/search_layerwise.py'
              ' --workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(), tasks=names,
      rows=rows, front=dict(searched=found.tolist(),
                            uniform_front=front_u.tolist(),
                            reference=ref.tolist(),
                            hypervolume_searched=hv_search,
                            hypervolume_uniform=hv_uniform),
      seconds=time.perf_counter() - t_start,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
