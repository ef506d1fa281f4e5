r"""Benchmark: weight matching, mergejax vs a per-group SciPy port of Git Re-Basin.

Two independently initialised models (MLPs with 3 hidden layers of width
512 … 4096 on 784 inputs, and a CIFAR-style ResNet) are matched by the same
algorithm (coordinate descent over groups in a random order, one exact SciPy
LAP per group, stop after a sweep without progress), with the same group order:

* ``gitrebasin``: a straightforward port of Git Re-Basin's
  ``weight_matching``: every group step re-permutes the other axes of every
  leaf with ``jnp.take`` and recomputes the full cost matrix; every group is
  re-solved in every sweep.
* ``mergejax``: ``mergejax.permute.weight_matching`` (host path): cost terms
  are cached and updated by low-rank corrections over the units that moved,
  a group whose inputs did not change since its last solve is skipped, and
  BLAS runs single-threaded between the LAPs. Timed with the default
  ``solver='auto'`` (the ``lap`` package's C++ LAPJV on row-reduced costs;
  ``lap`` and ``threadpoolctl`` are dependencies) and with
  ``solver='scipy'`` (the port's own LAP).

Wall time and process CPU time (all threads) are both reported: on a shared
machine the wall time mostly measures the neighbours. With ``--reps=R`` each
implementation runs R times, interleaved, and the median is reported (with
R >= 3 that excludes the port's first call, which compiles its jnp ops; the
first calls are listed separately). All
runs report the final objective ``sum <A, perm(B)>``; the table shows the
time ratio at (numerically) equal objective and whether the permutations are
identical. Writes ``weight_matching.json`` into the workdir (rendered by
``python -m experiments.tools.results``).

  python experiments/benchmarks/weight_matching.py --workdir=/tmp/wm_bench \
      --reps=3
  python experiments/benchmarks/weight_matching.py --workdir=/tmp/wm_bench \
      --widths=4096 --no_resnet --reps=1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from mergejax import permute
import mergejax as mj
from mergejax.permute import _matching as matching
from mergejax.permute import _solvers as solvers_lib
from mergejax.permute import models as M


def gitrebasin_weight_matching(spec, params_a, params_b, seed, max_iter=100):
  """Git Re-Basin's algorithm as written there (per-group, full recompute)."""
  a = mj.flatten_to_dict(params_a)
  b = mj.flatten_to_dict(params_b)
  axes = spec.resolve(params_a)
  groups = sorted(spec.groups)
  sizes = spec.group_sizes(params_a)
  perm = {g: jnp.arange(sizes[g]) for g in groups}
  perm_to_axes = {g: [(p, i) for p, ax in axes.items() for i, h in enumerate(ax)
                      if h == g] for g in groups}

  def get_permuted_param(k, except_axis):
    w = b[k]
    for axis, g in enumerate(axes[k]):
      if axis == except_axis or g is None:
        continue
      w = jnp.take(w, perm[g], axis=axis)
    return w

  rng = np.random.default_rng(seed)
  for _ in range(max_iter):
    progress = False
    for gi in rng.permutation(len(groups)):
      p = groups[gi]
      n = sizes[p]
      cost = jnp.zeros((n, n))
      for wk, axis in perm_to_axes[p]:
        w_a = jnp.moveaxis(a[wk], axis, 0).reshape((n, -1))
        w_b = jnp.moveaxis(get_permuted_param(wk, axis), axis, 0).reshape((n, -1))
        cost = cost + w_a @ w_b.T
      _, ci = linear_sum_assignment(np.asarray(cost), maximize=True)
      old = jnp.vdot(cost, jnp.eye(n)[perm[p]])
      new = jnp.vdot(cost, jnp.eye(n)[ci])
      progress = progress or bool(new > old + 1e-12)
      perm[p] = jnp.asarray(ci)
    if not progress:
      break
  return perm


def _mlp(width, key):
  m = M.MLP((width,) * 3)
  return m.init(key, jnp.ones((1, 784)))['params'], permute.mlp_spec(3)


def _resnet(key):
  m = M.ResNet(stage_sizes=(3, 3, 3), widths=(64, 128, 256))
  return m.init(key, jnp.ones((1, 32, 32, 3)))['params'], permute.resnet_spec((3, 3, 3))


def _timed(fn):
  t, c = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t, time.process_time() - c


def run_case(name, make, reps=1, solvers=('scipy', 'lapjv')):
  """Times the port and mergejax (each host LAP solver), interleaved."""
  a, spec = make(jax.random.key(1))
  b, _ = make(jax.random.key(2))
  jax.block_until_ready((a, b))
  key = jax.random.key(0)
  seed = matching._seed(key)  # pylint: disable=protected-access
  row = {'case': name, 'params': int(sum(x.size for x in jax.tree.leaves(a))),
         'reps': reps}
  runs = {s: [] for s in ('port',) + tuple(solvers)}
  results = {}
  for _ in range(reps):
    for s in solvers:
      # Timed like the port: permutations only (no cost matrices, objective).
      _, wall, cpu = _timed(lambda s=s: permute.weight_matching(
          spec, a, b, key=key, solver=s))
      runs[s].append((wall, cpu))
    ref, wall, cpu = _timed(lambda: gitrebasin_weight_matching(spec, a, b, seed))
    runs['port'].append((wall, cpu))
  for s in solvers:  # untimed: the same run again, with its diagnostics
    results[s] = permute.weight_matching(spec, a, b, key=key, solver=s,
                                         return_costs=True)
  med = lambda xs: float(np.median(xs))
  row['gitrebasin_s'] = med([w for w, _ in runs['port']])
  row['gitrebasin_cpu_s'] = med([c for _, c in runs['port']])
  row['gitrebasin_objective'] = float(permute.objective(spec, a, b, ref))
  row['identity_objective'] = float(permute.objective(spec, a, b))
  for s in solvers:
    res = results[s]
    row[f'{s}_s'] = med([w for w, _ in runs[s]])
    row[f'{s}_cpu_s'] = med([c for _, c in runs[s]])
    row[f'{s}_sweeps'] = int(res.sweeps)
    row[f'{s}_objective'] = float(permute.objective(spec, a, b, res.permutations))
    row[f'{s}_speedup'] = row['gitrebasin_s'] / row[f'{s}_s']
    row[f'{s}_speedup_cpu'] = row['gitrebasin_cpu_s'] / row[f'{s}_cpu_s']
    row[f'{s}_objective_rel_diff'] = abs(
        row[f'{s}_objective'] - row['gitrebasin_objective']) / abs(
            row['gitrebasin_objective'])
    row[f'{s}_same_permutations'] = all(
        np.array_equal(res.permutations[g], ref[g]) for g in ref)
  row['all_runs'] = {s: v for s, v in runs.items()}  # [(wall, cpu)] per rep
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--widths', default='512,1024,2048')
  ap.add_argument('--no_resnet', action='store_true')
  ap.add_argument('--reps', type=int, default=1)
  ap.add_argument('--solvers', default='auto,scipy')
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  solvers = tuple(args.solvers.split(','))
  if 'lapjv' in solvers and not solvers_lib.have_lapjv():
    raise SystemExit("solver 'lapjv' needs the `lap` package (a dependency "
                     'of mergejax; pip install lap)')
  cases = [(f'MLP 3x{w}', (lambda k, w=int(w): _mlp(w, k)))
           for w in args.widths.split(',') if w]
  if not args.no_resnet:
    cases.append(('ResNet20x4 (64-128-256)', _resnet))
  rows = []
  for name, make in cases:
    row = run_case(name, make, reps=args.reps, solvers=solvers)
    print(json.dumps(row), flush=True)
    rows.append(row)
  summary, first = [], []
  for r in rows:
    cells = {'model': r['case'], 'params': f"{r['params'] / 1e6:.2f}M",
             'port: wall / CPU (s)':
                 f"{r['gitrebasin_s']:.2f} / {r['gitrebasin_cpu_s']:.2f}"}
    for s in solvers:
      cells[f'mergejax ({s}): wall / CPU (s)'] = (
          f"{r[f'{s}_s']:.2f} / {r[f'{s}_cpu_s']:.2f}")
      cells[f'speedup ({s}): wall / CPU'] = (
          f"{r[f'{s}_speedup']:.1f}x / {r[f'{s}_speedup_cpu']:.1f}x")
    cells['sweeps'] = r[f'{solvers[0]}_sweeps']
    cells['objective: port / mergejax'] = (
        f"{r['gitrebasin_objective']:.6g} / " + ' / '.join(
            f"{r[f'{s}_objective']:.6g}" for s in solvers))
    cells['same permutations'] = all(
        r[f'{s}_same_permutations'] for s in solvers)
    summary.append(cells)
    first.append({'model': r['case'], **{
        f'{s}: wall / CPU (s)': f'{r["all_runs"][s][0][0]:.2f} / '
                                f'{r["all_runs"][s][0][1]:.2f}'
        for s in ('port',) + solvers}})
  tables = {'Time at equal objective (median over reps)': summary}
  if args.reps > 1:
    tables['First call of each (the port compiles its jnp ops per shape)'] = first
  for heading, t in tables.items():
    print(f'\n{heading}\n')
    common.print_table(t, list(t[0]))
  notes = [
      f"`lap` (C++ LAPJV) importable: {solvers_lib.have_lapjv()}; "
      f"`threadpoolctl` importable: {_have_threadpoolctl()} (both are "
      'dependencies of `pip install mergejax`; `auto` is the default solver).',
      f'{args.reps} interleaved repetition(s) per implementation; the port '
      'runs its jnp ops with the process\'s default threads.',
  ]
  print('wrote', common.write_json(args.workdir, 'weight_matching.json', dict(
      title='Benchmark: weight matching against a plain SciPy Git Re-Basin port',
      description=_description(),
      command=('python experiments/benchmarks/weight_matching.py '
               f'--workdir=DIR --reps={args.reps} --widths={args.widths}'
               + (' --no_resnet' if args.no_resnet else '')),
      tables=tables, notes=notes, raw=rows)))


def _description():
  # The module docstring's prose (not its command lines), one paragraph each.
  paras = __doc__.split('\n\n')[1:-1]
  return '\n\n'.join(' '.join(x.split()) if not x.lstrip().startswith('*')
                       else x for x in paras)


def _have_threadpoolctl():
  return importlib.util.find_spec('threadpoolctl') is not None


if __name__ == '__main__':
  main()
