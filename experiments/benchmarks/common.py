"""Shared helpers for the benchmarks: bandwidth, Llama shapes, checkpoints, RSS.

* `measure_bandwidth`: the machine's memory bandwidth from a NumPy copy
  (bytes read + written per second), measured in the same run as the merge so
  that "fraction of bandwidth" compares like with like on a shared machine.
* `llama_shapes` / `LLAMA_PRESETS`: Hugging Face Llama parameter names and
  (out, in) shapes for a few sizes (TinyLlama's widths, fewer layers).
* `random_llama_params` / `write_hf_checkpoint`: random bf16 weights, base and
  fine-tunes (base + noise), written as sharded ``*.safetensors`` with
  ``model.safetensors.index.json`` and ``config.json``.
* `run_measured`: runs a command, returning wall time and peak RSS of the
  process tree (polled with psutil, or ``ru_maxrss`` of the children).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

# Benchmarks run as scripts (`python experiments/benchmarks/<name>.py`): the
# repository root must be importable for `experiments.tools`.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from experiments.tools import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

BF16 = None  # set lazily: ml_dtypes.bfloat16


def bf16():
  global BF16
  if BF16 is None:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    BF16 = ml_dtypes.bfloat16
  return BF16


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
  """Memory bandwidth in GB/s from ``np.copyto`` (read + write) and a sum.

  Returns the best of ``repeats`` (the least disturbed by other processes).
  """
  n = nbytes // 4
  a = np.ones(n, np.float32)
  b = np.empty_like(a)
  np.copyto(b, a)
  best_copy, best_sum = np.inf, np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(b, a)
    best_copy = min(best_copy, time.perf_counter() - t)
    t = time.perf_counter()
    a.sum()
    best_sum = min(best_sum, time.perf_counter() - t)
  return {'copy_gbps': 2 * a.nbytes / best_copy / 1e9,
          'sum_gbps': a.nbytes / best_sum / 1e9}


# TinyLlama widths (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000)
# with fewer layers for the larger presets; narrower models for the small ones.
LLAMA_PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    'tiny': (256, 704, 2, 4, 2, 4096),           # ~3.7M: smoke tests
    '50m': (512, 1408, 6, 8, 2, 32000),          # ~50M: the micro-benchmark
    '0.1b': (1024, 2816, 4, 16, 4, 32000),       # ~0.11B
    '0.25b': (2048, 5632, 3, 32, 4, 32000),      # ~0.26B
    '0.5b': (2048, 5632, 10, 32, 4, 32000),      # ~0.57B, Llama-shaped
    '1b': (2048, 5632, 22, 32, 4, 32000),        # ~1.1B: TinyLlama
}


def llama_config(preset: str) -> dict[str, Any]:
  """A Hugging Face ``config.json`` dict for a preset."""
  hidden, inter, layers, heads, kv, vocab = LLAMA_PRESETS[preset]
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'hidden_size': hidden, 'intermediate_size': inter,
      'num_hidden_layers': layers, 'num_attention_heads': heads,
      'num_key_value_heads': kv, 'vocab_size': vocab,
      'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5,
      'rope_theta': 10000.0, 'tie_word_embeddings': False,
      'torch_dtype': 'bfloat16', 'hidden_act': 'silu',
      'bos_token_id': 1, 'eos_token_id': 2,
  }


def llama_shapes(preset: str) -> dict[str, tuple[int, ...]]:
  """HF parameter names and shapes (Linear weights are (out, in))."""
  hidden, inter, layers, heads, kv, vocab = LLAMA_PRESETS[preset]
  head_dim = hidden // heads
  shapes = {'model.embed_tokens.weight': (vocab, hidden)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({
        p + 'self_attn.q_proj.weight': (hidden, hidden),
        p + 'self_attn.k_proj.weight': (kv * head_dim, hidden),
        p + 'self_attn.v_proj.weight': (kv * head_dim, hidden),
        p + 'self_attn.o_proj.weight': (hidden, hidden),
        p + 'mlp.gate_proj.weight': (inter, hidden),
        p + 'mlp.up_proj.weight': (inter, hidden),
        p + 'mlp.down_proj.weight': (hidden, inter),
        p + 'input_layernorm.weight': (hidden,),
        p + 'post_attention_layernorm.weight': (hidden,),
    })
  shapes['model.norm.weight'] = (hidden,)
  shapes['lm_head.weight'] = (vocab, hidden)
  return shapes


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
  return int(sum(np.prod(s) for s in shapes.values()))


class _Noise:
  """Fast pseudo-random float32 blocks: slices of one random pool.

  Drawing 0.5B normals per model takes ~10 s on a busy 2-core machine; random
  windows into a 16M-entry pool are as good for timing merges and ~20x faster.
  """

  def __init__(self, seed: int, pool: int = 1 << 24):
    self.rng = np.random.default_rng(seed)
    self.pool = self.rng.standard_normal(pool, np.float32)

  def __call__(self, shape: Sequence[int]) -> np.ndarray:
    n = int(np.prod(shape))
    out = np.empty(n, np.float32)
    done = 0
    while done < n:
      m = min(n - done, self.pool.size // 2)
      start = int(self.rng.integers(0, self.pool.size - m + 1))
      out[done:done + m] = self.pool[start:start + m]
      done += m
    return out.reshape(shape)


def random_llama_params(preset: str, num_models: int, *, seed: int = 0,
                        ft_scale: float = 0.01) -> list[dict[str, np.ndarray]]:
  """``[base, ft_1, ..., ft_K]`` as flat ``{name: bf16 ndarray}`` dicts."""
  shapes = llama_shapes(preset)
  noise = _Noise(seed)
  base = {}
  for n, s in shapes.items():
    if n.endswith('norm.weight'):
      base[n] = (1.0 + 0.1 * noise(s)).astype(bf16())
    else:
      base[n] = (0.02 * noise(s)).astype(bf16())
  out = [base]
  for _ in range(num_models):
    out.append({n: (x.astype(np.float32) + ft_scale * noise(x.shape)).astype(bf16())
                for n, x in base.items()})
  return out


def write_hf_checkpoint(path: str, params_iter, config: dict[str, Any], *,
                        shard_bytes: int = 1 << 30) -> None:
  """Writes ``(name, array)`` pairs as sharded safetensors + index + config."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  shards, cur, cur_bytes = [], {}, 0
  for name, x in params_iter:
    if cur and cur_bytes + x.nbytes > shard_bytes:
      shards.append(cur)
      cur, cur_bytes = {}, 0
    cur[name] = x
    cur_bytes += x.nbytes
  if cur:
    shards.append(cur)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(path, fname), metadata={'format': 'pt'})
    for n, x in shard.items():
      weight_map[n] = fname
      total += x.nbytes
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f,
              indent=2)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def make_llama_checkpoints(root: str, preset: str, num_models: int = 3, *,
                           seed: int = 0, ft_scale: float = 0.01) -> list[str]:
  """Writes base + ``num_models`` fine-tunes under ``root``; cached by marker.

  Tensors are generated and written one model at a time, so peak memory is
  about one model.
  """
  names = ['base'] + [f'ft{i}' for i in range(1, num_models + 1)]
  dirs = [os.path.join(root, f'{preset}-{n}') for n in names]
  marker = os.path.join(root, f'{preset}-{num_models}-{seed}-{ft_scale}.done')
  if os.path.exists(marker) and all(os.path.isdir(d) for d in dirs):
    return dirs
  shapes = llama_shapes(preset)
  config = llama_config(preset)
  noise = _Noise(seed)
  base = {}
  for n, s in shapes.items():
    if n.endswith('norm.weight'):
      base[n] = (1.0 + 0.1 * noise(s)).astype(bf16())
    else:
      base[n] = (0.02 * noise(s)).astype(bf16())
  write_hf_checkpoint(dirs[0], base.items(), config)
  for d in dirs[1:]:
    write_hf_checkpoint(
        d, ((n, (x.astype(np.float32) + ft_scale * noise(x.shape)).astype(bf16()))
            for n, x in base.items()), config)
  open(marker, 'w').close()
  return dirs


def load_hf_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a safetensors checkpoint directory (NumPy, bf16)."""
  bf16()  # registers bfloat16 with NumPy before safetensors reads it
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith('.safetensors'):
      with safe_open(os.path.join(path, fname), framework='numpy') as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
  return out


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None,
                 poll_s: float = 0.05, timeout: float | None = None
                 ) -> dict[str, Any]:
  """Runs ``cmd``; returns its wall time and peak resident memory.

  ``peak_rss_gib`` is the kernel's ``ru_maxrss`` of the command, reported by
  ``/usr/bin/time -f %M`` (a small parent: ``ru_maxrss`` of a child forked
  from this Python process would count this process's own RSS at fork time);
  ``polled_tree_rss_gib`` is the largest sum over the process tree seen by a
  psutil poll every ``poll_s`` seconds (a cross-check; may miss short peaks).
  """
  import psutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  log = tempfile.TemporaryFile(mode='w+')
  t0 = time.perf_counter()
  use_time = os.path.exists('/usr/bin/time')
  if use_time:
    cmd = ['/usr/bin/time', '-f', 'MERGEJAX_BENCH_MAXRSS_KB=%M', *cmd]
  proc = subprocess.Popen(list(cmd), env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  peak = [0]
  done = threading.Event()

  def poll():
    try:
      root = psutil.Process(proc.pid)
      while not done.is_set():
        rss = root.memory_info().rss
        for c in root.children(recursive=True):
          try:
            rss += c.memory_info().rss
          except psutil.Error:
            pass
        peak[0] = max(peak[0], rss)
        time.sleep(poll_s)
    except psutil.Error:
      pass

  th = threading.Thread(target=poll, daemon=True)
  th.start()
  timer = None
  if timeout is not None:
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  done.set()
  th.join()
  if timer is not None:
    timer.cancel()
  log.seek(0)
  out = log.read()
  log.close()
  maxrss_kb = usage.ru_maxrss
  if use_time:
    m = re.findall(r'MERGEJAX_BENCH_MAXRSS_KB=(\d+)', out)
    maxrss_kb = int(m[-1]) if m else float('nan')
  return {'wall_s': wall, 'peak_rss_gib': maxrss_kb / 2**20,
          'polled_tree_rss_gib': peak[0] / 2**30,
          'returncode': proc.returncode, 'output_tail': out[-4000:]}


def print_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
  """Prints and returns a Markdown table of ``rows`` restricted to ``cols``."""
  text = results_lib.markdown_table(
      rows, cols, float_format=lambda v: f'{v:.3g}' if abs(v) < 1000
      else f'{v:.0f}')
  print(text)
  sys.stdout.flush()
  return text


def write_json(workdir: str, name: str, obj: Any) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  if isinstance(obj, dict):
    # Commit, date, machine (with its load: it may be shared) for the page.
    obj = {'benchmark': os.path.splitext(name)[0],
           'provenance': results_lib.provenance(), **obj,
           'loadavg_at_write': os.getloadavg()}
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, default=str)
  return path
