"""Times magnitude trim (tensor scope) on one 32000 x 2048 fp32 tensor.

Compares against one plain memory pass (sum |x|) and shows the share of the
exact tie-breaking pass. Run: python experiments/benchmarks/bench_trim.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from mergejax._src import select


def _time(f, *args, reps=3):
  jax.block_until_ready(f(*args))  # compile + warm up
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return min(ts)


def main():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32000, 2048)), jnp.float32)
  k = int(0.2 * x.size)
  rows = {
      'plain memory pass (sum |x|)': (jax.jit(lambda x: jnp.sum(jnp.abs(x))), x),
      'kth_largest_magnitude (2 hist passes)': (
          jax.jit(lambda x: select.kth_largest_magnitude(x, k)), x),
      'topk_mask exact=False': (jax.jit(lambda x: select.topk_mask(x, k, exact=False)), x),
      'topk_mask exact=True (no ties)': (jax.jit(lambda x: select.topk_mask(x, k)), x),
      'topk_mask exact=True (forced tie pass, rounded x)': (
          jax.jit(lambda x: select.topk_mask(jnp.round(x), k)), x),
  }
  tx = mj.trim(0.2)
  rows['mj.trim(0.2) update, K=1'] = (jax.jit(lambda u: tx.update({'w': u}, tx.init(None))[0]), x)
  base = _time(*rows['plain memory pass (sum |x|)'])
  print(f'{"step":52s} {"time":>8s} {"x memory pass":>14s}')
  for name, (f, a) in rows.items():
    t = _time(f, a)
    print(f'{name:52s} {t:8.3f}s {t / base:13.1f}x')


if __name__ == '__main__':
  main()
