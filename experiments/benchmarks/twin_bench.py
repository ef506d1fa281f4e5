r"""Twin-Merging inference: stored bytes and per-input mixing cost.

A two-layer MLP (``d -> d -> d``, ReLU) merged from K fine-tunes with
`mergejax.methods.twin` (``density`` sets the rank of each exclusive part).
Reports:

1. bytes of the exclusive parts as stored (factorised ``SVDBasis``) vs dense
   ``K x m x n``;
2. the wall time of a routed forward pass over B inputs, each with its own
   router weights, with the mix fused into the matmuls
   (`mergejax.methods.twin_dense`) vs one materialised mixed model per input
   (`mergejax.methods.twin_apply`, chunks of 32), after a warm-up call; the
   two outputs are checked to agree.

Run (from the repository root):

  python -m experiments.benchmarks.twin_bench --out /tmp/twin_bench.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj

M = mj.methods


def _models(d, k, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  base = {f'Dense_{i}': {'kernel': f32(rng.standard_normal((d, d)) / np.sqrt(d)),
                        'bias': f32(np.zeros(d))} for i in range(2)}
  fts = [jax.tree.map(lambda x: x + f32(0.02 * rng.standard_normal(x.shape)),
                      base) for _ in range(k)]
  return base, fts


def _timed(fn, *args, reps=3):
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def run(d, k, density, batch):
  base, fts = _models(d, k)
  _, st = mj.merge(M.twin(density=density), base, fts, return_state=True)
  stored = sum(x.nbytes for x in jax.tree.leaves(st.twins))
  dense = k * sum(x.nbytes for x in jax.tree.leaves(base))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, d)), jnp.float32)
  w = jax.nn.softmax(jnp.asarray(rng.standard_normal((batch, k)), jnp.float32))

  @jax.jit
  def fused(st, x, w):
    h = jax.nn.relu(M.twin_dense(x, w, st, 'Dense_0'))
    return M.twin_dense(h, w, st, 'Dense_1')

  def fwd(p, xi):
    h = jax.nn.relu(xi @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
    return h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']

  per_input = jax.jit(lambda st, x, w: M.twin_apply(fwd, st, w, x,
                                                    batch_size=32))
  a, b = fused(st, x, w), per_input(st, x, w)
  err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  return dict(d=d, k=k, density=density, batch=batch,
              rank=int(st.twins['Dense_0']['kernel'].s.shape[-1]),
              stored_bytes=stored, dense_bytes=dense,
              stored_over_dense=stored / dense,
              fused_s=_timed(fused, st, x, w),
              materialised_s=_timed(per_input, st, x, w),
              max_rel_diff=err)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=None)
  ap.add_argument('--d', type=int, default=512)
  ap.add_argument('--k', type=int, default=8)
  ap.add_argument('--batch', type=int, default=256)
  args = ap.parse_args()
  rows = [run(args.d, args.k, dens, args.batch) for dens in (0.05, 0.1, 0.25)]
  print('| density | rank | stored / dense | fused (s) | one model per input (s) | '
        'speed-up | max rel diff |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['density']} | {r['rank']} | {r['stored_over_dense']:.3f} | "
          f"{r['fused_s']:.4f} | {r['materialised_s']:.3f} | "
          f"{r['materialised_s'] / r['fused_s']:.0f}x | {r['max_rel_diff']:.1e} |")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(rows=rows, backend=jax.default_backend(),
                     devices=str(jax.devices())), f, indent=1)


if __name__ == '__main__':
  main()
