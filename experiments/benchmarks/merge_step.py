r"""Micro-benchmark: the merge step of mergejax vs mergekit, same tensors, one run.

K=3 fine-tunes + base of a ~50M-parameter Llama-shaped bf16 model (random
weights) are merged in memory with TIES (density 0.3) and task arithmetic by

* mergejax: ``mergejax.merge`` (compiled, warm: the first call's compile time
  is reported separately), fp32 arithmetic, bf16 out;
* mergekit 0.1.5: its own merge functions called in-process on the same
  tensors as torch tensors (``method(groups, parameters=..., dtype=float32,
  out_dtype=bfloat16)``: the per-tensor loop of its executor, no file IO).

It reports times, the speed-up, the output agreement, and the fraction of the
machine's memory bandwidth (a NumPy copy, measured in the same run) that each
reaches, counting the minimum traffic: read K+1 bf16 models, write one.

Run:
  /work/venv/bin/python experiments/benchmarks/merge_step.py \
      --workdir /tmp/mergejax_bench
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import mergejax as mj  # pylint: disable=g-import-not-at-top,wrong-import-position


def _kwargs(fn, **kw):
  """The subset of ``kw`` that ``fn`` accepts (methods differ in signature)."""
  params = inspect.signature(fn).parameters
  return {k: v for k, v in kw.items() if k in params}


def mergejax_tx(method: str, k: int, density: float):
  m = mj.methods
  if method == 'task_arithmetic':
    return m.task_arithmetic(**_kwargs(m.task_arithmetic, weight=[1.0] * k,
                                       lambda_=1.0))
  if method == 'ties':
    return m.ties(**_kwargs(m.ties, density=density, weight=[1.0] * k))
  raise ValueError(method)


MERGEKIT_PARAMS = {
    'task_arithmetic': lambda k, d: dict(weight=1.0, normalize=False,
                                         **{'lambda': 1.0}),
    'ties': lambda k, d: dict(weight=1.0, density=d, normalize=True,
                              **{'lambda': 1.0}),
}


def time_mergejax(tx, base, models, repeats):
  t = time.perf_counter()
  out = jax.block_until_ready(mj.merge(tx, base, models, check_finite=False))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(mj.merge(tx, base, models, check_finite=False))
    times.append(time.perf_counter() - t)
  return out, first, times


def time_mergekit(method, params, base_t, models_t, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  from mergekit.merge_methods import registry  # pylint: disable=g-import-not-at-top
  from mergekit.merge_methods.base import TensorGroup  # pylint: disable=g-import-not-at-top
  fn = registry.get(method)
  k = len(models_t)
  groups = [TensorGroup.from_tensors([base_t[n]] + [m[n] for m in models_t],
                                     ids=['base'] + list(range(k)),
                                     base_index=0, name=n) for n in base_t]
  times, outs = [], None
  for _ in range(repeats):
    t = time.perf_counter()
    outs = fn(groups, parameters=params, dtype=torch.float32,
              out_dtype=torch.bfloat16)
    times.append(time.perf_counter() - t)
  return dict(zip(base_t, outs)), times


def to_torch(x):
  import torch  # pylint: disable=g-import-not-at-top
  # bf16 NumPy (ml_dtypes) -> torch.bfloat16 without a float round trip.
  return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(
      torch.bfloat16)


def agreement(a: dict, b: dict) -> dict:
  n_diff, n, max_abs, max_rel_ulp = 0, 0, 0.0, 0.0
  for name in a:
    x = np.asarray(a[name], np.float32)
    y = b[name].float().numpy()
    d = np.abs(x - y)
    ulp = np.maximum(np.abs(y) * np.float32(2.0**-7), np.float32(1e-30))  # ~1 bf16 ulp
    n_diff += int(np.sum(d > 0))
    n += x.size
    max_abs = max(max_abs, float(d.max()))
    max_rel_ulp = max(max_rel_ulp, float((d / ulp).max()))
  return {'frac_elements_differing': n_diff / n, 'max_abs_diff': max_abs,
          'max_diff_in_bf16_ulps': max_rel_ulp}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='/tmp/mergejax_bench')
  ap.add_argument('--preset', default='50m', choices=list(common.LLAMA_PRESETS))
  ap.add_argument('--num_models', type=int, default=3)
  ap.add_argument('--density', type=float, default=0.3)
  ap.add_argument('--methods', default='ties,task_arithmetic')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--mergekit_repeats', type=int, default=2)
  ap.add_argument('--no_mergekit', action='store_true')
  args = ap.parse_args(argv)

  k = args.num_models
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs; generating {args.preset} x {k + 1} ...')
  params = common.random_llama_params(args.preset, k, seed=0)
  n = common.num_params(common.llama_shapes(args.preset))
  bw = common.measure_bandwidth()
  print(f'{n / 1e6:.1f}M parameters per model; NumPy copy bandwidth '
        f'{bw["copy_gbps"]:.1f} GB/s, sum {bw["sum_gbps"]:.1f} GB/s')
  traffic = (k + 2) * n * 2  # read K+1 bf16 models, write one bf16 model

  base_j = {n_: jnp.asarray(x) for n_, x in params[0].items()}
  models_j = [{n_: jnp.asarray(x) for n_, x in m.items()} for m in params[1:]]
  if not args.no_mergekit:
    base_t = {n_: to_torch(x) for n_, x in params[0].items()}
    models_t = [{n_: to_torch(x) for n_, x in m.items()} for m in params[1:]]

  rows = []
  for method in args.methods.split(','):
    if method == 'ties' and not hasattr(mj.methods, 'ties'):
      print('mergejax.methods.ties is not available in this checkout; skipped')
      continue
    tx = mergejax_tx(method, k, args.density)
    out_j, first, times = time_mergejax(tx, base_j, models_j, args.repeats)
    row = {'method': method, 'params_per_model_M': n / 1e6,
           'mergejax_first_call_s': first,
           'mergejax_s': min(times), 'mergejax_median_s': statistics.median(times),
           'mergejax_GBps': traffic / min(times) / 1e9}
    row['mergejax_bw_frac'] = row['mergejax_GBps'] / bw['copy_gbps']
    if not args.no_mergekit:
      out_t, ktimes = time_mergekit(method, MERGEKIT_PARAMS[method](k, args.density),
                                    base_t, models_t, args.mergekit_repeats)
      row.update({'mergekit_s': min(ktimes),
                  'mergekit_GBps': traffic / min(ktimes) / 1e9,
                  'speedup': min(ktimes) / min(times)})
      row['mergekit_bw_frac'] = row['mergekit_GBps'] / bw['copy_gbps']
      row.update(agreement({n_: np.asarray(v) for n_, v in out_j.items()}, out_t))
    rows.append(row)
    print(f'{method}: mergejax {min(times):.3f} s (first call {first:.2f} s)'
          + (f', mergekit {row["mergekit_s"]:.2f} s, speed-up '
             f'{row["speedup"]:.1f}x' if 'speedup' in row else ''))

  table = common.print_table(rows, [
      'method', 'mergejax_s', 'mergejax_first_call_s', 'mergekit_s', 'speedup',
      'mergejax_bw_frac', 'mergekit_bw_frac', 'max_diff_in_bf16_ulps',
      'frac_elements_differing'])
  path = common.write_json(args.workdir, 'merge_step.json', {
      'argv': sys.argv, 'bandwidth': bw, 'traffic_bytes': traffic,
      'cpu_count': os.cpu_count(), 'jax': jax.__version__,
      'devices': [str(d) for d in jax.devices()], 'rows': rows,
      'table': table})
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
