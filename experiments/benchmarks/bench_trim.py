"""Times magnitude trim (tensor scope) on one 32000 x 2048 fp32 tensor.

Compares against one plain memory pass (sum |x|) and shows the share of the
exact tie-breaking pass. Writes ``bench_trim.json`` into ``--workdir``:

  python experiments/benchmarks/bench_trim.py --workdir=/tmp/bench
  python -m experiments.tools.results /tmp/bench/bench_trim.json
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from mergejax import transforms as select

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _time(f, *args, reps=3):
  jax.block_until_ready(f(*args))  # compile + warm up
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return min(ts)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default=None, help='where to write the JSON')
  args = p.parse_args()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32000, 2048)), jnp.float32)
  k = int(0.2 * x.size)
  rows = {
      'plain memory pass, sum(abs(x))': (jax.jit(lambda x: jnp.sum(jnp.abs(x))), x),
      'kth_largest_magnitude (2 hist passes)': (
          jax.jit(lambda x: select.kth_largest_magnitude(x, k)), x),
      'topk_mask exact=False': (jax.jit(lambda x: select.topk_mask(x, k, exact=False)), x),
      'topk_mask exact=True (no ties)': (jax.jit(lambda x: select.topk_mask(x, k)), x),
      'topk_mask exact=True (forced tie pass, rounded x)': (
          jax.jit(lambda x: select.topk_mask(jnp.round(x), k)), x),
  }
  tx = mj.transforms.trim(0.2)
  rows['mj.transforms.trim(0.2) update, K=1'] = (jax.jit(lambda u: tx.update({'w': u}, tx.init(None))[0]), x)
  table = []
  for name, (f, a) in rows.items():  # the memory pass first: the unit
    t = _time(f, a)
    base = table[0]['seconds'] if table else t
    table.append(dict(step=name, seconds=t, memory_passes=t / base,
                      gb_per_s=x.nbytes / t / 1e9))
  common.print_table(table, ['step', 'seconds', 'memory_passes', 'gb_per_s'])
  if args.workdir:
    print('wrote', common.write_json(args.workdir, 'bench_trim.json', dict(
        title='Benchmark: exact magnitude top-k (trim)',
        description=('One 32000 x 2048 float32 tensor, density 0.2. '
                     '`memory_passes` is the time over one plain memory pass '
                     '(`sum(abs(x))`) measured in the same run; `gb_per_s` is the '
                     'tensor size over the time.'),
        command='python experiments/benchmarks/bench_trim.py --workdir=DIR',
        rows=table)))


if __name__ == '__main__':
  main()
