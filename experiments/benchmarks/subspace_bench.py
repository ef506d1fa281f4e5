r"""Measurements for the subspace / continual merges.

1. OPCM peak memory vs the number of merged models: the incremental interface
   (`mergejax.transforms.opcm_update`, one model at a time, each model generated on the
   fly and dropped) against the all-at-once transformation through
   `mergejax.merge` (all models stacked). Each point runs in a fresh process
   and reports its peak RSS (``ru_maxrss``).
2. Reversible merging: relative reconstruction error
   ``sum_i ||tau_i_hat - tau_i||^2 / sum_i ||tau_i||^2`` vs the budget, for
   task vectors with a shared component plus task-specific noise.
3. OPCM order robustness: cosine similarity between the merged task vectors
   obtained from different task orders.

Run (from the repository root):

  python -m experiments.benchmarks.subspace_bench --out /tmp/subspace_bench.json
"""

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

import numpy as np

N_MATS = 8
DIM = 256


def _model(key, scale):
  import jax  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(key, N_MATS)
  return {f'layer_{i}': {'kernel': scale * jax.random.normal(k, (DIM, DIM))}
          for i, k in enumerate(keys)}


def opcm_child(mode: str, n: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  base = _model(jax.random.PRNGKey(0), 1.0)
  t0 = time.time()
  if mode == 'incremental':
    st = mj.transforms.opcm_init(base, 0.5)
    for i in range(n):
      ft = jax.tree.map(lambda b, d: b + d, base,
                        _model(jax.random.PRNGKey(i + 1), 0.01))
      st = mj.transforms.opcm_update(st, base, ft, check_finite=False)
      del ft
    out = mj.transforms.opcm_params(st, base)
  else:
    fts = [jax.tree.map(lambda b, d: b + d, base,
                        _model(jax.random.PRNGKey(i + 1), 0.01))
           for i in range(n)]
    out = mj.merge(mj.methods.opcm(0.5), base, fts, check_finite=False)
  jax.block_until_ready(out)
  return dict(mode=mode, n_models=n, seconds=time.time() - t0,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              model_mb=N_MATS * DIM * DIM * 4 / 2**20)


def opcm_memory(ns):
  rows = []
  for mode in ('incremental', 'stacked'):
    for n in ns:
      res = subprocess.run(
          [sys.executable, '-m', 'experiments.benchmarks.subspace_bench',
           '--child', mode, str(n)], capture_output=True, text=True, check=True)
      rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  return rows


def reversible_errors(k=8, seed=0):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = {'a': (64, 48), 'b': (48,), 'c': (48, 32)}
  base = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in shapes.items()}
  shared = {n: rng.standard_normal(s) for n, s in shapes.items()}
  models = [{n: base[n] + jnp.asarray(0.01 * (shared[n] + 0.5 * rng.standard_normal(s)),
                                      jnp.float32) for n, s in shapes.items()}
            for _ in range(k)]
  total = sum(float(jnp.sum((m[n] - base[n]) ** 2)) for m in models for n in shapes)
  rows = []
  for scope, centred in [('leaf', False), ('global', False), ('leaf', True)]:
    for b in range(1, k + 1):
      _, st = mj.merge(mj.methods.reversible(b, scope=scope, centred=centred),
                       base, models, return_state=True)
      rec = jax.vmap(lambda i: mj.methods.reconstruct(st, base, i))(jnp.arange(k))
      err = sum(float(jnp.sum((rec[n] - jnp.stack([m[n] for m in models])) ** 2))
                for n in shapes)
      rows.append(dict(scope=scope, centred=centred, budget=b,
                       rel_sq_error=err / total))
  return rows


def opcm_orders(k=4, seed=0, n_orders=8):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  base = {f'l{i}': jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
          for i in range(4)}
  models = [jax.tree.map(lambda x: x + 0.01 * jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(k)]
  flat = lambda m: np.concatenate([np.asarray(m[n] - base[n]).ravel() for n in base])
  orders = list(itertools.permutations(range(k)))
  orders = [orders[i] for i in rng.choice(len(orders), n_orders, replace=False)]
  outs = {}
  for name, tx in [('opcm', mj.methods.opcm(0.5)),
                   ('task_arithmetic', mj.methods.task_arithmetic(lambda_=1.0))]:
    outs[name] = [flat(mj.merge(tx, base, [models[i] for i in o])) for o in orders]
  cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
         for a, b in itertools.combinations(outs['opcm'], 2)]
  tv_cos = [float(o @ flat(m) / np.linalg.norm(o) / np.linalg.norm(flat(m)))
            for o in outs['opcm'] for m in models]
  return dict(n_orders=n_orders, k=k, pairwise_cos_min=min(cos),
              pairwise_cos_mean=float(np.mean(cos)),
              cos_to_each_task_vector_mean=float(np.mean(tv_cos)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--child', nargs=2)
  p.add_argument('--out', default='/tmp/subspace_bench.json')
  p.add_argument('--ns', default='2,8,16')
  args = p.parse_args()
  if args.child:
    print(json.dumps(opcm_child(args.child[0], int(args.child[1]))))
    return
  res = dict(opcm_memory=opcm_memory([int(x) for x in args.ns.split(',')]))
  res['reversible'] = reversible_errors()
  for r in res['reversible']:
    print(r)
  res['opcm_orders'] = opcm_orders()
  print(res['opcm_orders'])
  with open(args.out, 'w') as f:
    json.dump(res, f, indent=1)
  print('wrote', args.out)


if __name__ == '__main__':
  main()
