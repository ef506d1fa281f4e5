r"""End to end, side by side: ``mergekit-yaml`` vs ``mergejax merge``.

Generates Llama-shaped bf16 Hugging Face checkpoints with random weights (a
base and K fine-tunes = base + noise; sharded safetensors, cached in
``--workdir``), writes one mergekit YAML per method (linear, task_arithmetic,
ties, dare_ties, slerp; ``dtype: float32``, ``out_dtype: bfloat16``), and runs
both tools on each YAML as subprocesses, in one run, measuring

* wall time from process start to files written, and peak RSS (the kernel's
  ``ru_maxrss`` of the child, via ``os.wait4``); mergejax runs cold (an empty
  persistent compilation cache: compile time counts) and again warm (the
  cache filled by the cold run), unless ``--no_warm``;
* output agreement, tensor by tensor (max difference in bf16 ulps and the
  fraction of differing elements; for the random ``dare_ties`` the kept
  fraction and relative difference instead, since the two draw different
  masks);
* the effective bandwidth of mergejax's streaming merge: bytes read + written
  over its ``merge_s`` (from its stats line), as a fraction of the machine's
  NumPy copy bandwidth measured in the same run.

The checkpoint files are read once before the runs so that both tools start
from the page cache (the bandwidth figures assume that).

Run (~0.57B parameters per model, 3 fine-tunes + base):
  /work/venv/bin/python experiments/benchmarks/vs_mergekit.py \
      --workdir /tmp/mergejax_vs_mergekit --preset 0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ('linear', 'task_arithmetic', 'ties', 'dare_ties', 'slerp')
RANDOM = ('dare_ties', 'dare_linear', 'della', 'della_linear')


def make_yaml(method: str, base: str, fts: list[str], density: float) -> str:
  import yaml  # pylint: disable=g-import-not-at-top
  cfg = {'merge_method': method, 'dtype': 'float32', 'out_dtype': 'bfloat16'}
  if method == 'linear':
    cfg['models'] = [{'model': m, 'parameters': {'weight': 1.0}} for m in fts]
  elif method == 'slerp':
    cfg['base_model'] = base
    cfg['models'] = [{'model': base}, {'model': fts[0]}]
    cfg['parameters'] = {'t': 0.3}
  else:
    cfg['base_model'] = base
    params = {'weight': 1.0}
    if method in ('ties', 'dare_ties', 'dare_linear', 'breadcrumbs_ties'):
      params['density'] = density
    cfg['models'] = [{'model': m, 'parameters': dict(params)} for m in fts]
  return yaml.safe_dump(cfg, sort_keys=False)


def warm_page_cache(dirs: list[str]) -> None:
  for d in dirs:
    for f in os.listdir(d):
      with open(os.path.join(d, f), 'rb') as fh:
        while fh.read(64 << 20):
          pass


def _stats_line(text: str) -> dict:
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith('{') and 'merge_s' in line:
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        pass
  return {}


def compare(out_a: str, out_b: str, random: bool) -> dict:
  """Agreement of two output checkpoints (a = mergejax, b = mergekit)."""
  a = common.load_hf_checkpoint(out_a)
  b = common.load_hf_checkpoint(out_b)
  missing = sorted(set(b) ^ set(a))
  n, n_diff, n_big, max_ulps = 0, 0, 0, 0.0
  num, den = 0.0, 0.0
  for name in sorted(set(a) & set(b)):
    x = a[name].astype(np.float32)
    y = b[name].astype(np.float32)
    if x.shape != y.shape:
      missing.append(f'{name}: shape {x.shape} vs {y.shape}')
      continue
    d = np.abs(x - y)
    ulp = np.maximum(np.abs(y) * np.float32(2.0**-7), np.float32(1e-30))
    n += x.size
    n_diff += int(np.count_nonzero(d))
    n_big += int(np.count_nonzero(d > ulp))
    max_ulps = max(max_ulps, float((d / ulp).max()))
    num += float(np.sum(d.astype(np.float64)**2))
    den += float(np.sum(y.astype(np.float64)**2))
  out = {'tensors': len(set(a) & set(b)), 'mismatched_names': missing[:5],
         'rel_l2_diff': (num / max(den, 1e-30))**0.5}
  if not random:
    out.update({'frac_differing': n_diff / max(n, 1),
                'frac_over_1ulp': n_big / max(n, 1),
                'max_diff_bf16_ulps': max_ulps})
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', default='/tmp/mergejax_vs_mergekit')
  ap.add_argument('--preset', default='0.5b', choices=list(common.LLAMA_PRESETS))
  ap.add_argument('--num_models', type=int, default=3)
  ap.add_argument('--density', type=float, default=0.3)
  ap.add_argument('--methods', default=','.join(METHODS))
  ap.add_argument('--skip_mergekit', action='store_true')
  ap.add_argument('--no_warm', action='store_true',
                  help='skip the second mergejax run with a warm compile cache')
  ap.add_argument('--keep_outputs', action='store_true')
  ap.add_argument('--timeout', type=float, default=1800)
  args = ap.parse_args(argv)

  bin_dir = os.path.dirname(sys.executable)
  mergekit = os.path.join(bin_dir, 'mergekit-yaml')
  mergejax = os.path.join(bin_dir, 'mergejax')
  ckpt_root = os.path.join(args.workdir, 'checkpoints')
  t = time.perf_counter()
  dirs = common.make_llama_checkpoints(ckpt_root, args.preset, args.num_models)
  n = common.num_params(common.llama_shapes(args.preset))
  print(f'{args.preset}: {n / 1e9:.3f}B parameters per model, '
        f'{args.num_models} fine-tunes + base (ready in '
        f'{time.perf_counter() - t:.0f} s)', flush=True)
  warm_page_cache(dirs)
  bw = common.measure_bandwidth()
  print(f'NumPy copy bandwidth {bw["copy_gbps"]:.1f} GB/s', flush=True)

  env = dict(os.environ, TQDM_DISABLE='1', PYTHONWARNINGS='ignore')
  rows = []
  for method in args.methods.split(','):
    cfg_path = os.path.join(args.workdir, f'{method}.yml')
    with open(cfg_path, 'w') as f:
      f.write(make_yaml(method, dirs[0], dirs[1:], args.density))
    row = {'method': method, 'params_B': n / 1e9}
    outs = {}
    # Cold: an empty persistent compilation cache, so compile time counts.
    # Warm: a rerun that finds its compiled merges in that cache (what a
    # second merge of same-shaped checkpoints costs).
    cache = os.path.join(args.workdir, 'xla_cache', method)
    shutil.rmtree(cache, ignore_errors=True)
    mj_cmd = [mergejax, 'merge', cfg_path, None, '--overwrite',
              '--no-copy-tokenizer', '--random-seed', '0', '--compile-cache',
              cache]
    tools = [('mergejax', list(mj_cmd))]
    if not args.skip_mergekit:
      tools.append(('mergekit', [mergekit, cfg_path, None, '--no-copy-tokenizer',
                                 '--random-seed', '0', '--no-write-model-card']))
    if not args.no_warm:
      tools.append(('mergejax_warm', list(mj_cmd)))
    for tool, cmd in tools:
      out_dir = os.path.join(args.workdir, 'out', f'{method}-{tool}')
      shutil.rmtree(out_dir, ignore_errors=True)
      cmd[cmd.index(None)] = out_dir
      r = common.run_measured(cmd, env=env, timeout=args.timeout)
      if r['returncode'] != 0:
        print(f'{tool} {method} failed ({r["returncode"]}):\n{r["output_tail"]}')
        row[f'{tool}_error'] = r['output_tail'][-1000:]
        continue
      outs[tool] = out_dir
      row[f'{tool}_s'] = r['wall_s']
      row[f'{tool}_rss_gib'] = r['peak_rss_gib']
      if tool == 'mergejax_warm':
        shutil.rmtree(out_dir, ignore_errors=True)
        del outs[tool]
      if tool == 'mergejax':
        st = _stats_line(r['output_tail'])
        row['mergejax_stats'] = st
        if st.get('merge_s'):
          gbps = (st['read_GB'] + st['written_GB']) / st['merge_s']
          row['mergejax_stream_GBps'] = gbps
          row['mergejax_stream_bw_frac'] = gbps / bw['copy_gbps']
      print(f'{method:16s} {tool:9s} {r["wall_s"]:8.1f} s  '
            f'{r["peak_rss_gib"]:.2f} GiB', flush=True)
    if 'mergekit_s' in row and 'mergejax_s' in row:
      row['speedup'] = row['mergekit_s'] / row['mergejax_s']
      row['rss_ratio'] = row['mergejax_rss_gib'] / row['mergekit_rss_gib']
    if 'mergekit_s' in row and 'mergejax_warm_s' in row:
      row['speedup_warm'] = row['mergekit_s'] / row['mergejax_warm_s']
    if len(outs) == 2:
      row.update(compare(outs['mergejax'], outs['mergekit'], method in RANDOM))
    if not args.keep_outputs:
      for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    rows.append(row)
    common.write_json(args.workdir, 'vs_mergekit.json',
                      {'argv': sys.argv, 'bandwidth': bw, 'rows': rows})

  table = common.print_table(rows, [
      'method', 'mergekit_s', 'mergejax_s', 'speedup', 'mergejax_warm_s',
      'speedup_warm', 'mergekit_rss_gib',
      'mergejax_rss_gib', 'rss_ratio', 'max_diff_bf16_ulps', 'frac_over_1ulp',
      'rel_l2_diff', 'mergejax_stream_bw_frac'])
  path = common.write_json(args.workdir, 'vs_mergekit.json', {
      'argv': sys.argv, 'bandwidth': bw, 'cpu_count': os.cpu_count(),
      'preset': args.preset, 'config': common.llama_config(args.preset),
      'rows': rows, 'table': table})
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
