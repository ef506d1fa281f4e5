"""``mergejax merge CONFIG.yml OUT_DIR``: mergekit-compatible merges, streamed.

Reads mergekit's YAML format (``models:`` or ``slices:``, ``base_model``,
``merge_method``, ``parameters`` with gradient lists and filters, ``dtype``,
``out_dtype``) and writes the same output layout (``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, and
``config.json``). Tensors stay in their file layout (PyTorch ``(out, in)``),
which is the layout mergekit's per-row methods are defined on.

Example:
  mergejax merge ties.yml ./merged --out-shard-size 2G --dtype bfloat16
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import numbers
import os
import re
import sys
import time
import warnings
from typing import Any, Sequence

import yaml

LOG = logging.getLogger('mergejax')

# Tensors that transformers ties to another one (tie_word_embeddings): a model
# that lacks the first uses the second, as mergekit does ('tied_names').
TIED_NAMES = {
    'lm_head.weight': ('model.embed_tokens.weight',
                       'transformer.wte.weight', 'model.embed_in.weight'),
}
_VOCAB_RE = re.compile(r'embed_tokens|lm_head|wte|embed_in|embed_out|'
                       r'word_embeddings')
# mergekit parameter name -> mergejax keyword (the rest are spelled alike).
_KWARG = {'lambda': 'lambda_'}


class _SizeError(argparse.ArgumentTypeError, ValueError):
  """A size that `parse_size` cannot read (argparse reports it as it is)."""


def parse_size(text: str | int) -> int:
  """``'5B'``/``'2G'``/``'500M'``/``'1e9'``/``1000`` -> bytes (B, G: 10^9).

  ``KiB``/``MiB``/``GiB`` are powers of 1024.

  Raises:
    ValueError: for a negative, non-finite or unreadable size.
  """
  if isinstance(text, numbers.Integral) and not isinstance(text, bool):
    if text < 0:
      raise _SizeError(f'Bad size {text!r}: sizes are not negative.')
    return int(text)
  m = re.fullmatch(r'\s*([0-9.eE+]+)\s*([kKmMgGbBtT]?)(i?[bB]?)\s*',
                   text if isinstance(text, str) else '')
  try:
    num = float(m.group(1)) if m else math.nan
  except ValueError:
    num = math.nan
  if not math.isfinite(num):
    raise _SizeError(f'Bad size {text!r}; e.g. 5G, 500M, 512MiB, 1e9.')
  unit = m.group(2).upper()
  binary = m.group(3).lower().startswith('i')
  base = 1024 if binary else 1000
  mult = {'': 1, 'K': base, 'M': base**2, 'G': base**3, 'B': base**3,
          'T': base**4}[unit]
  if not math.isfinite(num * mult):
    raise _SizeError(f'Bad size {text!r}: too large.')
  return int(num * mult)


def _factory(method: str):
  import mergejax  # pylint: disable=g-import-not-at-top
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  name = mc.METHODS[method].factory or method
  fn = getattr(mergejax.methods, name, None)
  if fn is None:
    raise NotImplementedError(
        f'merge_method {method!r} has no mergejax implementation yet '
        f'(mergejax.methods.{name} is missing).')
  return fn


def _build_kwargs(method: str, task, model_idx: Sequence[int]) -> dict[str, Any]:
  """mergekit parameters of one tensor -> keyword arguments of the factory."""
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  spec = mc.METHODS[method]
  fn = _factory(method)
  accepted = inspect.signature(fn).parameters
  kwargs: dict[str, Any] = {}

  def put(p, value, default):
    kw = _KWARG.get(p, p)
    if kw in accepted:
      kwargs[kw] = value
    elif p in spec.ignored or p in mc.MERGEJAX_SHARED:
      pass
    elif value != default:
      raise NotImplementedError(
          f'merge_method {method!r}: parameter {p!r}={value!r} is not '
          f'supported by mergejax.methods.{fn.__name__}.')

  for p, default in spec.per_model.items():
    vals = [task.per_model[i][p] for i in model_idx]
    if default is None and all(v is None for v in vals):
      continue
    put(p, [float(v) for v in vals], [default] * len(vals))
  for p, default in spec.shared.items():
    v = task.shared[p]
    if p not in spec.static and not isinstance(v, bool):
      v = float(v)
    put(p, v, default)
  return kwargs


def _transformation_builder(method: str, task, model_idx):
  kwargs = _build_kwargs(method, task, model_idx)
  fn = _factory(method)
  return lambda: fn(**kwargs)


def _resolve_input(reader, name, out_name, model_label):
  if name in reader:
    return name
  for alias in TIED_NAMES.get(name, ()):
    if alias in reader:
      LOG.info('%s has no %s; using its tied %s.', model_label, name, alias)
      return alias
  raise ValueError(
      f'Tensor {name!r} (output {out_name!r}) is missing from model '
      f'{model_label} ({reader.path}). All inputs must hold every merged '
      'tensor; check that the models share an architecture.')


def build_jobs(cfg, *, out_dtype=None, compute_dtype=None, seed=None,
               truncate_embeddings=False):
  """Plans a parsed config into the streaming merge's work.

  Returns:
    ``(jobs, config, hook, readers)``: one stream `Job` per output tensor, the
    output ``config.json`` (a dict, or None), the hook that runs before the
    merge pass (global statistics; or None) and the open input readers.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  from mergejax.parallel import _stream as stream  # pylint: disable=g-import-not-at-top
  from mergejax.io import _lora as lora_io  # pylint: disable=g-import-not-at-top
  from mergejax.io import _safetensors as st  # pylint: disable=g-import-not-at-top

  readers = {m: lora_io.open_checkpoint(m) for m in cfg.referenced_models()}
  configs = {m: r.config() for m, r in readers.items()}
  label = {}
  for s in (cfg.models or []) + [x for sl in cfg.slices or [] for x in sl.sources]:
    label[s.model] = s.name
  label.setdefault(cfg.base_model, cfg.raw.get('base_model'))
  tasks, n_layers = mc.plan(cfg, lambda m: readers[m].keys(),
                            lambda m: configs[m])
  spec = cfg.spec
  if compute_dtype is None and cfg.dtype is not None:
    compute_dtype = st.parse_dtype(cfg.dtype)
  if out_dtype is None:
    out_dtype = cfg.out_dtype or cfg.dtype
  out_dtype = None if out_dtype is None else st.parse_dtype(out_dtype)
  key = None if not spec.random else jax.random.key(0 if seed is None else seed)

  jobs = []
  global_scope = any(t.shared.get('trim_scope') == 'global' for t in tasks)
  for i, task in enumerate(tasks):
    inputs = []
    for (m, name) in task.inputs:
      inputs.append((readers[m], _resolve_input(readers[m], name, task.out_name,
                                                label.get(m, m))))
    shapes = [r.shape(n) for r, n in inputs]
    rows = None
    if len(set(shapes)) > 1:
      vocab = _VOCAB_RE.search(task.out_name) and all(
          len(s) == len(shapes[0]) and s[1:] == shapes[0][1:] for s in shapes)
      detail = ', '.join(f'{label.get(m, m)}: {s}' for (m, _), s in
                         zip(task.inputs, shapes))
      if vocab and truncate_embeddings:
        rows = min(s[0] for s in shapes)
        warnings.warn(f'{task.out_name}: vocabulary sizes differ ({detail}); '
                      f'keeping the first {rows} rows of each '
                      '(--unsafe-truncate-embeddings).', UserWarning)
      elif vocab:
        raise ValueError(
            f'Vocabulary size mismatch in {task.out_name!r}: {detail}. The '
            'models have different vocabularies; align their tokenizers, or '
            'pass --unsafe-truncate-embeddings to keep the common first rows '
            '(only correct if token ids agree).')
      else:
        raise ValueError(f'Shape mismatch in {task.out_name!r}: {detail}. '
                         'These models cannot be merged tensor by tensor.')
    dtypes = {r.dtype(n) for r, n in inputs}
    if out_dtype is not None:
      od = out_dtype
    elif compute_dtype is not None:
      od = compute_dtype
    else:  # mergekit promotes to the common input dtype
      od = np.result_type(*dtypes) if len(dtypes) > 1 else dtypes.pop()
    bi = task.base_index
    if spec.base == 'ignored':
      model_idx = list(range(len(inputs)))
    else:
      model_idx = [j for j in range(len(inputs)) if j != bi]
    jobs.append(stream.Job(
        task.out_name, inputs, bi,
        _transformation_builder(cfg.merge_method, task, model_idx),
        None if key is None else jax.random.fold_in(key, i), od,
        compute_dtype, rows))
  conf = mc.output_config(
      cfg, lambda m: configs[m], n_layers,
      None if (out_dtype or compute_dtype) is None else
      st.dtype_name(out_dtype or compute_dtype))
  hook = None
  if global_scope:
    hook = _global_trim_hook(cfg, tasks, jobs)
  return jobs, conf, hook, readers


def _global_trim_hook(cfg, tasks, jobs):
  """``trim_scope: global``: one magnitude threshold per model over all tensors.

  A first pass over the checkpoints finds, per model, the exact k-th largest
  ``|theta_i - theta_0|`` over every tensor (k = sum over tensors of
  ``density x size``); the merge pass then gives each tensor the density that
  keeps exactly the entries at or above that threshold, so the per-tensor
  method computes the global trim without a recompile.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mergejax.parallel import _stream as stream  # pylint: disable=g-import-not-at-top
  if cfg.spec.base != 'required' or 'density' not in cfg.spec.per_model:
    raise ValueError(f'trim_scope: global needs a task-vector method with a '
                     f'density, not {cfg.merge_method!r}.')

  def hook(pool):
    keep = []
    for task, job in zip(tasks, jobs):
      n = int(np.prod(job.spec().shape))
      dens = [task.per_model[j]['density'] for j in range(len(task.inputs))
              if j != task.base_index]
      keep.append(np.array([d * n for d in dens], np.float64))
    thr = stream.global_thresholds(jobs, keep, pool=pool)
    thr_j = jnp.asarray(thr, jnp.uint32)
    for task, job in zip(tasks, jobs):
      arrays = stream._read_job(job)  # pylint: disable=protected-access
      bi = job.base_index
      models = tuple(a for k, a in enumerate(arrays) if k != bi)
      cd = None if job.compute_dtype is None else np.dtype(job.compute_dtype)
      counts = np.asarray(stream._count_at_least(  # pylint: disable=protected-access
          models, arrays[bi], thr_j, compute_dtype=cd))
      n = int(np.prod(job.spec().shape))
      model_idx = [j for j in range(len(task.inputs)) if j != bi]
      for c, j in zip(counts, model_idx):
        # int((c + 0.5) / n * n) == c: the per-tensor trim keeps c entries.
        task.per_model[j]['density'] = min(1.0, (int(c) + 0.5) / n)
      job.build = _transformation_builder(cfg.merge_method, task, model_idx)
  return hook


def run_merge(config: str | dict, out_dir: str, *, out_shard_size: int | str =
              '5B', dtype: str | None = None, compute_dtype: str | None = None,
              seed: int | None = None, overwrite: bool = False,
              progress: bool = False, truncate_embeddings: bool = False,
              prefetch_bytes: int = 1 << 29, threads: int = 4,
              copy_tokenizer: bool = False, resume: bool = True,
              allow_nonfinite: bool = False, verify: bool = True):
  """Runs a mergekit YAML config (path, YAML text or dict) into ``out_dir``.

  Args:
    config: the mergekit configuration.
    out_dir: output checkpoint directory (written atomically).
    out_shard_size: bytes per output shard (``'5B'`` as mergekit: 5e9).
    dtype: output dtype, overriding ``out_dtype``/``dtype`` from the config.
    compute_dtype: round inputs to this dtype before the float32 math
      (default: the config's ``dtype``).
    seed: PRNG seed for random methods (DARE, DELLA).
    overwrite: replace an existing non-empty ``out_dir``.
    progress: show a progress bar.
    truncate_embeddings: crop vocabulary tensors to the smallest vocabulary.
    prefetch_bytes: read-ahead budget in bytes.
    threads: reader threads.
    copy_tokenizer: copy tokenizer files from the base (else first) model.
    resume: continue a killed run of the same merge (same config, options
      and input files) from the output shards it finished.
    allow_nonfinite: merge inputs and write outputs holding NaN/Inf instead
      of stopping.
    verify: check inputs that mergejax wrote against their recorded
      checksums before merging.

  Returns:
    The executor's `StreamStats`.
  """
  from mergejax.cli import _mergekit_config as mc  # pylint: disable=g-import-not-at-top
  from mergejax.parallel import _stream as stream  # pylint: disable=g-import-not-at-top
  from mergejax.io import _atomic as atomic  # pylint: disable=g-import-not-at-top
  from mergejax.io import _lora as lora_io  # pylint: disable=g-import-not-at-top
  from mergejax.io import _safetensors as st  # pylint: disable=g-import-not-at-top
  cfg = mc.load_config(config)
  # Before any work: a dangerous output path (empty, '.', a parent of an
  # input, ...) is refused rather than replaced.
  inputs = [p for m in cfg.referenced_models()
            for p in lora_io.split_reference(m)]
  atomic.check_output_path(out_dir, inputs=inputs)
  for m in inputs:
    if verify and os.path.isdir(m):
      st.verify_checkpoint(m)
  for m in (lora_io.split_reference(r)[0] for r in cfg.referenced_models()):
    if os.path.isdir(m) and not os.path.exists(os.path.join(m, st.CONFIG_NAME)):
      warnings.warn(f'{m} has no {st.CONFIG_NAME}: its architecture cannot be '
                    'checked against the other models, and the output has no '
                    f'{st.CONFIG_NAME} unless another model provides one.',
                    UserWarning)
  jobs, conf, hook, readers = build_jobs(
      cfg, out_dtype=dtype, compute_dtype=compute_dtype, seed=seed,
      truncate_embeddings=truncate_embeddings)
  copy = []
  if copy_tokenizer:
    src = cfg.base_model or cfg.referenced_models()[0]
    copy = [os.path.join(src, f) for f in _TOKENIZER_FILES
            if os.path.isdir(src) and os.path.exists(os.path.join(src, f))]
  try:
    return stream.run_jobs(
        jobs, out_dir, config=conf, max_shard_size=parse_size(out_shard_size),
        prefetch_bytes=prefetch_bytes, threads=threads, overwrite=overwrite,
        progress=progress, global_trim=hook, inputs=cfg.referenced_models(),
        metadata={'mergejax_method': cfg.merge_method}, copy_files=copy,
        extra_files={'mergekit_config.yml': yaml.safe_dump(cfg.raw,
                                                          sort_keys=False)},
        resume_key=json.dumps(dict(
            config=cfg.raw, dtype=dtype, compute_dtype=compute_dtype, seed=seed,
            truncate=truncate_embeddings), sort_keys=True, default=str)
        if resume else None, allow_nonfinite=allow_nonfinite)
  finally:
    for r in readers.values():
      r.close()


COMPILE_CACHE_ENV = 'MERGEJAX_COMPILE_CACHE'


def default_compile_cache() -> str | None:
  """``$MERGEJAX_COMPILE_CACHE`` (empty, ``none`` or ``off`` disables), else
  ``$XDG_CACHE_HOME/mergejax/xla`` (default ``~/.cache/mergejax/xla``)."""
  env = os.environ.get(COMPILE_CACHE_ENV)
  if env is not None:
    return None if env.lower() in ('', 'none', 'off') else env
  root = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(root, 'mergejax', 'xla')


def _configure_devices(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  cache = args.compile_cache
  if cache and cache.lower() not in ('none', 'off'):
    # Compiled per-tensor merges persist across runs: a rerun with other
    # hyperparameters (or other checkpoints of the same shapes) compiles
    # nothing, which on CPU is most of a small merge's start-up.
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
  if args.device:
    jax.config.update('jax_platforms', args.device)
  if args.cpu_devices:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='mergejax',
      description='Model merging in JAX. `mergejax merge CONFIG.yml OUT_DIR` '
      'reads mergekit YAML configs.')
  sub = p.add_subparsers(dest='command', required=True)
  e = sub.add_parser('extract-lora', help='extract a PEFT LoRA adapter from '
                     'a fine-tune (truncated SVD of its delta)')
  e.add_argument('base', help='base model checkpoint directory')
  e.add_argument('finetuned', help='fine-tuned checkpoint directory')
  e.add_argument('out_dir', help='adapter directory (written atomically)')
  e.add_argument('--rank', type=int, required=True, help='adapter rank')
  e.add_argument('--include', nargs='*', default=None,
                 help='fnmatch patterns of module names to adapt (default: '
                 'every linear layer)')
  e.add_argument('--embeddings', action='store_true',
                 help='adapt embedding and output-head matrices too')
  e.add_argument('--sv-epsilon', type=float, default=0.0,
                 help='drop singular values at most this (as mergekit)')
  e.add_argument('--dtype', default=None, help='factor dtype (default: the '
                 "base's)")
  e.add_argument('--overwrite', action='store_true',
                 help='replace an existing adapter directory')
  m = sub.add_parser('merge', help='merge checkpoints from a mergekit YAML')
  m.add_argument('config', help='mergekit YAML file')
  m.add_argument('out_dir', help='output directory (written atomically)')
  m.add_argument('--out-shard-size', default='5B', type=parse_size,
                 help='bytes per output shard: 5B (default, = 5e9, as '
                 'mergekit), 2G, 500M, 2GiB')
  m.add_argument('--dtype', default=None,
                 help='output dtype (bfloat16, float16, float32); overrides '
                 'out_dtype/dtype from the config')
  m.add_argument('--compute-dtype', default=None,
                 help='round inputs to this dtype before the float32 math '
                 '(default: the config\'s dtype)')
  m.add_argument('--device', default=None, choices=['cpu', 'gpu', 'cuda',
                                                     'tpu'],
                 help='JAX platform to compute on (default: JAX\'s choice)')
  m.add_argument('--cpu-devices', type=int, default=None,
                 help='number of virtual CPU devices (for --device cpu)')
  m.add_argument('--random-seed', type=int, default=None,
                 help='seed for random methods (dare_*, della*)')
  m.add_argument('--overwrite', action='store_true',
                 help='replace a non-empty OUT_DIR')
  m.add_argument('--unsafe-truncate-embeddings', action='store_true',
                 help='crop vocabulary tensors to the smallest vocabulary')
  m.add_argument('--prefetch', default='512MiB', type=parse_size,
                 help='read-ahead budget (input bytes in flight), default '
                 '512MiB; lower it to save memory, raise it on fast disks')
  m.add_argument('--threads', type=int, default=4, help='reader threads')
  m.add_argument('--quiet', action='store_true', help='no progress bar')
  m.add_argument('--copy-tokenizer', dest='copy_tokenizer',
                 action='store_true', default=True,
                 help='copy tokenizer files from the base model (default)')
  m.add_argument('--no-copy-tokenizer', dest='copy_tokenizer',
                 action='store_false')
  m.add_argument('--compile-cache', default=default_compile_cache(),
                 help='directory of the persistent XLA compilation cache '
                 f'(default: ${COMPILE_CACHE_ENV} or ~/.cache/mergejax/xla; '
                 '"none" disables it)')
  m.add_argument('--no-resume', dest='resume', action='store_false',
                 help='start afresh even if a killed run of this same merge '
                 'left finished output shards (by default they are kept, after '
                 'checking their checksums)')
  m.add_argument('--allow-nonfinite', action='store_true',
                 help='merge input and write output tensors holding NaN/Inf '
                 '(by default they stop the merge, naming the inputs that '
                 'hold NaN/Inf)')
  m.add_argument('--no-verify', dest='verify', action='store_false',
                 help='skip checking mergejax-written inputs against their '
                 'recorded checksums')
  m.add_argument('-v', '--verbose', action='count', default=0)
  return p


_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                    'special_tokens_map.json', 'tokenizer.model',
                    'generation_config.json', 'vocab.json', 'merges.txt')


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``mergejax`` command."""
  args = _parser().parse_args(argv)
  logging.basicConfig(
      level=logging.WARNING - 10 * min(getattr(args, 'verbose', 0), 2),
      format='%(levelname)s %(name)s: %(message)s')
  if args.command == 'extract-lora':
    return _extract_lora(args)
  _configure_devices(args)
  t0 = time.perf_counter()
  try:
    stats = run_merge(
        args.config, args.out_dir, out_shard_size=args.out_shard_size,
        dtype=args.dtype, compute_dtype=args.compute_dtype,
        seed=args.random_seed, overwrite=args.overwrite,
        progress=not args.quiet, prefetch_bytes=args.prefetch,
        threads=args.threads,
        truncate_embeddings=args.unsafe_truncate_embeddings,
        copy_tokenizer=args.copy_tokenizer, resume=args.resume,
        allow_nonfinite=args.allow_nonfinite, verify=args.verify)
  except (ValueError, FileNotFoundError, FileExistsError,
          NotImplementedError) as e:
    print(f'mergejax: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # read-only filesystem, full disk, permissions
    print(f'mergejax: error: {e.strerror or e} ({e.filename or args.out_dir}); '
          'nothing complete was written there.', file=sys.stderr)
    return 1
  if not args.quiet:
    print(json.dumps({
        'tensors': stats.tensors, 'shards': stats.shards,
        'resumed_shards': stats.resumed_shards, 'compiles': stats.compiles,
        'read_GB': round(stats.bytes_read / 1e9, 3),
        'written_GB': round(stats.bytes_written / 1e9, 3),
        'merge_s': round(stats.seconds, 2),
        'total_s': round(time.perf_counter() - t0, 2)}), file=sys.stderr)
  return 0


def _extract_lora(args) -> int:
  from mergejax.io import _lora as lora_io  # pylint: disable=g-import-not-at-top
  try:
    res = lora_io.extract_lora(args.base, args.finetuned, args.out_dir,
                               rank=args.rank, include=args.include,
                               embeddings=args.embeddings,
                               sv_epsilon=args.sv_epsilon, dtype=args.dtype,
                               overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'mergejax: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps({
      'modules': len(res.modules),
      'max_relative_error': round(max(res.errors.values()), 6),
      'not_carried': res.skipped}), file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
