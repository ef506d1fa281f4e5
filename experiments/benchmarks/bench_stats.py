"""Statistics collection throughput: Fisher diagonals and input Grams.

`mergejax.stats.fisher_diagonal` (per-example gradients, ``vmap`` over a
batch, one compiled step per batch shape) and `mergejax.stats.input_grams`
against the straightforward loop a researcher would write: a jit-compiled
per-example function called once per example from Python, accumulating in
float32 NumPy. Both sides run in this process, side by side, on the digits
zoo's model shape (an MLP of width 512 and depth 2 on 64 inputs, 10 classes)
and agree to float tolerance (checked). Writes ``bench_stats.json``:

  python experiments/benchmarks/bench_stats.py --workdir=/tmp/bench
  python -m experiments.tools.results /tmp/bench/bench_stats.json

Memory: the accumulators are one float32 copy of the parameters (Fisher) or
one ``d_in x d_in`` matrix per layer (Grams). A Fisher batch step holds the
batch's per-example gradients of one class, ``batch x params`` floats (the
exact kind loops over the classes); `peak_step_bytes` reports that bound.
"""

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


class _MLP(nn.Module):
  width: int = 512
  depth: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.classes)(x)


def _loop_fisher(logits_fn, params, x, kind, y=None):
  """The plain loop: one jitted per-example squared gradient per example."""
  def logp(p, xi):
    return jax.nn.log_softmax(logits_fn(p, xi[None])[0])

  if kind == 'exact':
    @jax.jit
    def one(p, xi):
      probs = jnp.exp(logp(p, xi))
      jac = jax.jacrev(logp)(p, xi)
      return jax.tree.map(lambda j: jnp.tensordot(probs, j * j, axes=1), jac)
  else:
    @jax.jit
    def one(p, xi, yi):
      g = jax.grad(lambda q: logp(q, xi)[yi])(p)
      return jax.tree.map(jnp.square, g)

  total = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), params)
  for i in range(x.shape[0]):
    sq = one(params, x[i]) if kind == 'exact' else one(params, x[i], y[i])
    total = jax.tree.map(lambda t, s: t + np.asarray(s), total, sq)
  return jax.tree.map(lambda t: t / x.shape[0], total)


def _loop_grams(inputs_fn, params, x):
  @jax.jit
  def one(p, xi):
    return {k: jnp.outer(v[0], v[0]) for k, v in inputs_fn(p, xi[None]).items()}

  total = None
  for i in range(x.shape[0]):
    g = {k: np.asarray(v) for k, v in one(params, x[i]).items()}
    total = g if total is None else {k: total[k] + g[k] for k in g}
  return {k: v / x.shape[0] for k, v in total.items()}


def _timed(f, reps):
  f()  # compile and warm up
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    out = f()
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - t)
  return best, out


def _close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-3,
                               atol=1e-7)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default=None, help='where to write the JSON')
  p.add_argument('--examples', type=int, default=256)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--reps', type=int, default=2)
  args = p.parse_args()
  model = _MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(args.examples, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=args.examples), jnp.int32)
  params = model.init(jax.random.key(0), x[:1])['params']
  n_params = sum(a.size for a in jax.tree.leaves(params))
  logits_fn = lambda q, xb: model.apply({'params': q}, xb)
  inputs_fn = mj.stats.linen_dense_inputs(model)
  bs = args.batch
  batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, args.examples, bs)]

  rows = []

  def add(stat, impl, seconds, step_bytes, loop_seconds=None):
    rows.append(dict(statistic=stat, implementation=impl,
                     examples_per_s=round(args.examples / seconds, 1),
                     seconds=round(seconds, 4),
                     speedup_over_loop=(round(loop_seconds / seconds, 1)
                                        if loop_seconds else 1.0),
                     peak_step_bytes=int(step_bytes)))

  for kind in ('exact', 'empirical'):
    per_class = 10 if kind == 'exact' else 1
    t_loop, ref = _timed(lambda kind=kind: _loop_fisher(
        logits_fn, params, x, kind, y), args.reps)
    t_mj, got = _timed(lambda kind=kind: mj.stats.fisher_diagonal(
        logits_fn, params, batches, kind=kind), args.reps)
    _close(got, ref)
    add(f'Fisher ({kind})', 'per-example Python loop', t_loop,
        per_class * n_params * 4)
    # One class at a time: the batch's per-example gradients of one class.
    add(f'Fisher ({kind})', f'mergejax.stats (batch {bs})', t_mj,
        bs * n_params * 4, t_loop)
  t_loop, ref = _timed(lambda: _loop_grams(inputs_fn, params, x), args.reps)
  t_mj, got = _timed(lambda: mj.stats.input_grams(inputs_fn, params,
                                                  batches), args.reps)
  _close(got, ref)
  gram_bytes = sum(g.size * 4 for g in got.values())
  add('input Grams', 'per-example Python loop', t_loop, gram_bytes)
  add('input Grams', f'mergejax.stats (batch {bs})', t_mj, gram_bytes, t_loop)
  common.print_table(rows, list(rows[0]))
  speed = {r['statistic']: r['speedup_over_loop'] for r in rows
           if r['implementation'].startswith('mergejax')}
  notes = [f'{k}: {v:g}x the per-example loop' for k, v in speed.items()]
  notes.append(
      'The batched empirical Fisher gains little over the loop here: one '
      'backward pass of this small MLP per example is already cheap, and '
      'the batched step writes and re-reads the batch\'s per-example '
      'gradients (batch x params floats) to square and sum them (that '
      'share was not timed separately). The Grams need no per-example '
      'gradients.')
  if args.workdir:
    print('wrote', common.write_json(args.workdir, 'bench_stats.json', dict(
        title='Benchmark: statistics collection (Fisher, Grams)',
        description=(
            f'{args.examples} examples of a width-512, depth-2 MLP on 64 '
            f'inputs with 10 classes ({n_params} parameters), float32. The '
            'loop is a jit-compiled per-example function called from Python '
            'with NumPy accumulation, measured in the same run; both agree '
            'to float tolerance. `peak_step_bytes` bounds what one step '
            'holds beyond the accumulators: the per-example gradients of '
            'one class for the batch (the exact kind loops over classes).'),
        command=('python experiments/benchmarks/bench_stats.py '
                 '--workdir=DIR'),
        rows=rows, notes=notes)))


if __name__ == '__main__':
  main()
