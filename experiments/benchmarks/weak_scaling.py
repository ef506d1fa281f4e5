r"""Weak scaling of a sharded merge over 1, 2, 4, 8 CPU devices.

Each device count runs in a fresh process (``jax_num_cpu_devices`` must be set
before JAX starts) with a problem that grows with it: ``--params_per_device``
parameters per device and model, as Llama-shaped bf16 leaves (embedding, MLP
and attention matrices; the layer count scales with the device count), K=3
fine-tunes + base, merged on a ``(1, n)`` (models x fsdp) mesh with
``mergejax.parallel.sharded_merge``. The compiled merge step is timed on already
placed inputs (warm, best of ``--repeats``), plus the full call (host arrays
in: placement + step).

Weak-scaling efficiency is ``t(1) / t(n)`` (1.0 = perfect). On a machine with
fewer cores than devices the virtual devices share cores, so efficiency
falls as ``cores / n`` beyond that point: the figure to read there is the
bandwidth, which should stay flat.

Run:
  /work/venv/bin/python experiments/benchmarks/weak_scaling.py \
      --workdir /tmp/mergejax_weak_scaling
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _params(n_dev: int, per_device: int, k: int, seed: int = 0):
  """Flat Llama-like tree with ~``n_dev * per_device`` parameters."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  hidden, inter = 512, 1408
  per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
  layers = max(1, round(n_dev * per_device / per_layer))
  shapes = {}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'self_attn.q_proj.weight': (hidden, hidden),
                   p + 'self_attn.k_proj.weight': (hidden, hidden),
                   p + 'self_attn.v_proj.weight': (hidden, hidden),
                   p + 'self_attn.o_proj.weight': (hidden, hidden),
                   p + 'mlp.gate_proj.weight': (inter, hidden),
                   p + 'mlp.up_proj.weight': (inter, hidden),
                   p + 'mlp.down_proj.weight': (hidden, inter),
                   p + 'input_layernorm.weight': (hidden,),
                   p + 'post_attention_layernorm.weight': (hidden,)})
  noise = common._Noise(seed)  # pylint: disable=protected-access
  base = {n: (0.02 * noise(s)).astype(common.bf16()) for n, s in shapes.items()}
  models = [{n: (x.astype(np.float32) + 0.01 * noise(x.shape)).astype(common.bf16())
             for n, x in base.items()} for _ in range(k)]
  return base, models, sum(int(np.prod(s)) for s in shapes.values())


def worker(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  import mergejax as mj  # pylint: disable=g-import-not-at-top
  from mergejax import parallel as sh  # pylint: disable=g-import-not-at-top
  n = args.devices
  base, models, n_params = _params(n, args.params_per_device, args.num_models)
  mesh = sh.make_mesh((1, n))
  results = {'devices': n, 'params': n_params}
  for method in args.methods.split(','):
    m = mj.methods
    if not hasattr(m, method):
      continue
    tx = (m.ties(density=0.3) if method == 'ties' else getattr(m, method)())
    t = time.perf_counter()
    fn, call_args = sh.prepare_sharded_merge(tx, base, models, mesh=mesh,
                                             check_finite=False)
    place = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(fn(*call_args))
    first = time.perf_counter() - t
    best = float('inf')
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(*call_args))
      best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(mj.parallel.sharded_merge(tx, base, models, mesh=mesh,
                                           check_finite=False))
    full = time.perf_counter() - t
    traffic = (args.num_models + 2) * n_params * 2  # bf16 in and out
    results[method] = {'step_s': best, 'first_call_s': first,
                       'place_s': place, 'full_call_s': full,
                       'step_GBps': traffic / best / 1e9}
  return results


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='/tmp/mergejax_weak_scaling')
  ap.add_argument('--device_counts', default='1,2,4,8')
  ap.add_argument('--params_per_device', type=int, default=6_000_000)
  ap.add_argument('--num_models', type=int, default=3)
  ap.add_argument('--methods', default='task_arithmetic,ties')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--devices', type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.devices:  # worker mode
    print('RESULT ' + json.dumps(worker(args)))
    return

  bw = common.measure_bandwidth()
  print(f'{os.cpu_count()} CPUs; NumPy copy bandwidth {bw["copy_gbps"]:.1f} '
        'GB/s', flush=True)
  runs = []
  for n in [int(c) for c in args.device_counts.split(',')]:
    cmd = [sys.executable, os.path.abspath(__file__), '--devices', str(n),
           '--params_per_device', str(args.params_per_device),
           '--num_models', str(args.num_models), '--methods', args.methods,
           '--repeats', str(args.repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')]
    if r.returncode or not lines:
      print(f'{n} devices failed:\n{r.stderr[-3000:]}')
      continue
    runs.append(json.loads(lines[-1][len('RESULT '):]))
    print(f'{n} devices done', flush=True)
  rows = []
  for method in args.methods.split(','):
    t1 = None
    for run in runs:
      if method not in run:
        continue
      res = run[method]
      t1 = res['step_s'] if t1 is None else t1
      rows.append({'method': method, 'devices': run['devices'],
                   'params_M': run['params'] / 1e6, 'step_s': res['step_s'],
                   'efficiency': t1 / res['step_s'],
                   'step_GBps': res['step_GBps'],
                   'bw_frac': res['step_GBps'] / bw['copy_gbps'],
                   'first_call_s': res['first_call_s'],
                   'full_call_s': res['full_call_s']})
  table = common.print_table(rows, ['method', 'devices', 'params_M', 'step_s',
                                    'efficiency', 'step_GBps', 'bw_frac',
                                    'first_call_s', 'full_call_s'])
  path = common.write_json(args.workdir, 'weak_scaling.json', {
      'argv': sys.argv, 'bandwidth': bw, 'cpu_count': os.cpu_count(),
      'runs': runs, 'rows': rows, 'table': table})
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
