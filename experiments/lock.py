"""MergeLock on the digits zoo: a locked fine-tune, merged with its siblings.

Fine-tune ``config.locked`` is locked with `permute.merge_lock` (random
permutations and positive scales of both hidden layers' units; the backbone
and its own head together, so it computes the same function). The K
backbones are then merged by task arithmetic and TIES, with lambda chosen on
the validation split from the default experiment's grid, in four settings:

* ``plain``: the K fine-tunes as trained;
* ``locked``: the locked fine-tune in place of the original;
* ``rebasin``: the locked one after weight matching to the base
  (permutations only: Git Re-Basin cannot undo the scales);
* ``unlocked``: the locked one after `permute.unlock` against the base
  (scale-invariant matching and per-unit scales).

Reported: the locked model's largest logit difference from the original,
test accuracy of the locked task, of the other tasks and of all of them, and
`permute.lock_report` for an original and a locked fine-tune.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from experiments import default as default_exp
from experiments import zoo
from experiments.tools import results as results_lib
from mergejax import permute

SCALED = ('P_0', 'P_1')


def classifier_spec() -> permute.PermutationSpec:
  """The zoo classifier's hidden groups: the backbone's two ReLU layers."""
  return permute.PermutationSpec({
      'backbone/Dense_0/kernel': (None, 'P_0'), 'backbone/Dense_0/bias': ('P_0',),
      'backbone/Dense_1/kernel': ('P_0', 'P_1'), 'backbone/Dense_1/bias': ('P_1',),
      'head/kernel': ('P_1', None), 'head/bias': (None,)})


def _merge_rows(method, make_tx, lambdas, base, models, ev, heads, locked):
  """Validation-chosen lambda; test accuracy of the locked task and the mean."""
  backbones = [m['backbone'] for m in models]
  val, test = [], []
  for lam in lambdas:
    bb = mj.merge(make_tx(lam), base['backbone'], backbones)
    stacked = jax.tree.map(lambda x: x[None], bb)
    val.append(ev.accuracies(stacked, 'val', heads)[0])
    test.append(ev.accuracies(stacked, 'test', heads)[0])
  best = int(np.argmax([v.mean() for v in val]))
  others = np.delete(test[best], locked)
  return dict(method=method, lambda_=float(lambdas[best]),
              locked_task=float(test[best][locked]),
              other_tasks=float(others.mean()), mean=float(test[best].mean()))


def main(config, workdir: str) -> dict[str, Any]:
  out_dir = os.path.join(workdir, 'lock')
  os.makedirs(out_dir, exist_ok=True)
  _, tasks, model, z, _ = default_exp.build_zoo(config, workdir)
  names = [t.name for t in tasks]
  k = len(names)
  spec = classifier_spec()
  fts = [z.model(i) for i in range(k)]
  j = int(config.locked)
  lock = permute.merge_lock(jax.random.key(config.lock_seed), fts[j], spec,
                            scaled=SCALED, scale_range=config.scale_range)
  x_test = jnp.asarray(tasks[j].test.x)
  logits = lambda p: model.apply({'params': p}, x_test)
  fn_diff = float(jnp.max(jnp.abs(logits(lock.params) - logits(fts[j]))))
  rebasin_perms = permute.weight_matching(spec, z.base, lock.params)
  variants = {
      'plain': fts[j],
      'locked': lock.params,
      'rebasin': permute.apply_permutation(spec, rebasin_perms, lock.params),
      'unlocked': permute.unlock(lock.params, z.base, spec, scaled=SCALED),
  }
  lambdas = tuple(config.merge.lambdas)
  merges = {
      'task_arithmetic': lambda lam: mj.methods.task_arithmetic(lambda_=lam),
      'ties': lambda lam: mj.methods.ties(density=config.merge.density,
                                          lambda_=lam),
  }
  rows = []
  for setting, model_j in variants.items():
    models = list(fts)
    models[j] = model_j
    heads = jax.tree.map(lambda *h: jnp.stack(h), *[m['head'] for m in models])
    ev = zoo.TaskEvaluator(model, tasks, heads)
    own = float(ev.accuracies(jax.tree.map(lambda x: x[None], model_j['backbone']),
                              'test')[0][j])
    for method, make_tx in merges.items():
      row = _merge_rows(method, make_tx, lambdas, z.base, models, ev, heads, j)
      rows.append(dict(setting=setting, own_accuracy=own, **row))
  reports = {
      name: permute.lock_report(p, z.base, spec, scaled=SCALED)._asdict()
      for name, p in (('finetuned', fts[j]), ('locked', lock.params))}
  by = {(r['setting'], r['method']): r for r in rows}
  notes = [f'The locked {names[j]} model computes the same function: largest '
           f'test logit difference {fn_diff:.1e} from the original.']
  for method in merges:
    plain, locked, rebasin, unlocked = (by[(s, method)] for s in variants)
    notes.append(
        f'{method}, mean test accuracy over the tasks: {plain["mean"]:.3f} with '
        f'the original fine-tune, {locked["mean"]:.3f} with the locked one '
        f'(locked task {plain["locked_task"]:.3f} -> {locked["locked_task"]:.3f}, '
        f'the other tasks {plain["other_tasks"]:.3f} -> '
        f'{locked["other_tasks"]:.3f}); {rebasin["mean"]:.3f} after weight '
        f'matching, {unlocked["mean"]:.3f} after unlock.')
  notes.append(
      'MergeLock reports that low-cost restoration fails. Here the lock is '
      'units permuted and scaled (the zoo has no attention), and with the public '
      'base model as the reference `unlock` undoes it: it matches units by the '
      'direction of their incoming weights, which scaling does not change.')
  for name, r in reports.items():
    notes.append(f'lock_report on the {name} model: distance to the base '
                 f'{r["distance"]:.3f}, after unlock {r["unlocked_distance"]:.3f}, '
                 f'transformed={r["transformed"]}.')
  result = dict(
      experiment='lock', title='MergeLock on the digits zoo',
      description=__doc__.split('\n\n', 1)[1].strip(),
      command='python -m experiments.main --config=configs/lock.py '
              '--workdir=/tmp/exp_work',
      notes=notes, provenance=results_lib.provenance(),
      tasks=names, locked=names[j], scale_range=float(config.scale_range),
      max_logit_difference=fn_diff, rows=rows, reports=reports,
      config=json.loads(config.to_json_best_effort()))
  results_lib.write_result(out_dir, result)
  return result
