"""Streaming executor: merge checkpoints larger than memory, tensor by tensor.

Each output tensor is one *job*: its inputs (a reader and a tensor name per
model), a `MergeTransformation` built for that tensor, and where its base is.
The executor

* reads inputs lazily on a thread pool (``os.pread`` releases the GIL), a
  bounded number of bytes ahead of the computation;
* merges each tensor with one jitted function whose static arguments are the
  transformation's ``update`` (a hashable `static_fn`) and the dtypes, so it
  compiles **once per distinct (shape, dtype, static configuration)**:
  per-tensor numbers (a density from a gradient list, a weight from a filter)
  live in the transformation's state and are traced;
* hands results to a writer thread that appends them to the planned output
  shards while the next tensor computes (JAX dispatch is asynchronous);
* keeps peak memory at a few tensors per model whatever the model size.

Methods that need a global statistic (``trim_scope: global``) get a first pass
that sums per-model radix histograms of ``|theta_i - theta_0|`` over every
tensor (see `mergejax.transforms._select`), giving one exact magnitude threshold per
model; the merge pass then turns it into a per-tensor density.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import base as base_lib
from mergejax.transforms import _select as select
from mergejax.io import _atomic as atomic
from mergejax.io import _safetensors as st

_LEAF = 'w'  # one fixed leaf name, so tree structure never forces a recompile
# Seconds to sleep after each tensor write: lets tests kill a run mid-write.
_DELAY_ENV = 'MERGEJAX_DEBUG_WRITE_DELAY'


@dataclasses.dataclass
class Job:
  """One output tensor.

  Attributes:
    out_name: name in the output checkpoint.
    inputs: ``(reader, tensor_name)`` per input model, in order.
    base_index: which input is the base (passed as ``params``), or None.
    build: ``() -> MergeTransformation`` for this tensor (called once, right
      before the merge, so global statistics can feed it).
    key: PRNG key for random methods, or None.
    out_dtype: output dtype (None: the base's, else the first input's).
    compute_dtype: inputs are rounded to this dtype before the float32 math
      (mergekit's ``dtype:``), or None.
    rows: read only the first ``rows`` rows of every input (vocabulary crop).
  """
  out_name: str
  inputs: list[tuple[st.CheckpointReader, str]]
  base_index: int | None
  build: Callable[[], base_lib.MergeTransformation]
  key: jax.Array | None = None
  out_dtype: Any = None
  compute_dtype: Any = None
  rows: int | None = None  # crop axis 0 of every input (vocabulary)

  def shape(self, r: st.CheckpointReader, n: str) -> tuple[int, ...]:
    s = r.shape(n)
    return s if self.rows is None else (self.rows,) + tuple(s[1:])

  def spec(self) -> st.TensorSpec:
    r, n = self.inputs[self.base_index or 0]
    dt = self.out_dtype if self.out_dtype is not None else r.dtype(n)
    return st.TensorSpec(self.out_name, self.shape(r, n), np.dtype(dt))

  def nbytes_in(self) -> int:
    return sum(int(np.prod(self.shape(r, n), dtype=np.int64)) *
               r.dtype(n).itemsize for r, n in self.inputs)


def _cast_in(x, compute_dtype):
  if compute_dtype is not None:
    x = x.astype(compute_dtype)
  return x.astype(jnp.float32)


@functools.partial(jax.jit,
                   static_argnames=('update', 'out_dtype', 'compute_dtype'))
def _merge_leaf(update, models, state, base, key, *, out_dtype,
                compute_dtype):
  stacked = {_LEAF: jnp.stack([_cast_in(m, compute_dtype) for m in models])}
  b = None if base is None else {_LEAF: _cast_in(base, compute_dtype)}
  out, _ = update(stacked, state, b, key=key)
  out = out[_LEAF]
  if out.shape != models[0].shape:
    raise ValueError(f'The merge returned shape {out.shape} for an input of '
                     f'shape {models[0].shape}: it must reduce the model axis.')
  # Whether every input is finite, fused into the same read of the inputs: a
  # merge can hide a NaN input (TIES' trim may drop it), and a NaN in a
  # checkpoint means the checkpoint is broken whatever the output says.
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in
                              models + (() if base is None else (base,))]))
  return out.astype(out_dtype), finite


# Compiled per-tensor merges by signature (static config + argument types),
# shared by every run in the process: executables or futures of them.
_EXECUTABLES: dict[Any, Any] = {}
_EXECUTABLES_LOCK = threading.Lock()


def compile_count() -> int:
  """Number of compiled per-tensor merge functions so far (for tests)."""
  return len(_EXECUTABLES)


def _call(job: Job, tx, arrays) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
  """``(signature, dynamic args, static kwargs)`` of ``job``'s merge call.

  ``arrays`` are the inputs, or `jax.ShapeDtypeStruct`s standing for them.
  """
  bi = job.base_index
  base = None if bi is None else arrays[bi]
  models = tuple(a for i, a in enumerate(arrays) if i != bi)
  spec = job.spec()
  state = tx.init({_LEAF: jax.ShapeDtypeStruct(spec.shape, jnp.float32)})
  static = dict(out_dtype=np.dtype(spec.dtype), compute_dtype=None
                if job.compute_dtype is None else np.dtype(job.compute_dtype))
  args = (models, state, base, job.key)
  avals = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
  sig = (tx.update, jax.tree.structure(args), avals,
         tuple(sorted((k, str(v)) for k, v in static.items())))
  return sig, args, static


def _executable(job: Job, tx, arrays):
  """The compiled merge for ``job`` (compiling it, or waiting for a compile
  already under way), and the arguments to call it with."""
  sig, args, static = _call(job, tx, arrays)
  with _EXECUTABLES_LOCK:
    entry = _EXECUTABLES.get(sig)
    mine = entry is None
    if mine:
      entry = _EXECUTABLES[sig] = cf.Future()
  if mine:
    try:
      entry.set_result(_merge_leaf.lower(tx.update, *args, **static).compile())
    except BaseException as e:  # pylint: disable=broad-except
      with _EXECUTABLES_LOCK:
        del _EXECUTABLES[sig]  # let a later call retry (and raise) itself
      entry.set_exception(e)
  return entry.result(), args


def _precompile(jobs: Sequence[Job], pool: cf.Executor) -> None:
  """Compiles every distinct per-tensor merge on ``pool`` while reads begin.

  On CPU, compiling the six distinct shapes of a Llama TIES merge takes
  several seconds; started up front they overlap the first reads and each
  other instead of stalling the merge loop once per new shape.
  """
  seen = set()
  for job in jobs:
    tx = job.build()
    specs = [jax.ShapeDtypeStruct(job.shape(r, n), r.dtype(n))
             for r, n in job.inputs]
    sig = _call(job, tx, specs)[0]
    if sig not in seen:
      seen.add(sig)
      pool.submit(_executable, job, tx, specs)


def _merge_one(job: Job, arrays: list[np.ndarray], tx=None) -> jax.Array:
  tx = tx if tx is not None else job.build()
  compiled, args = _executable(job, tx, arrays)
  return compiled(*args)


# --------------------------------------------------------- global trimming --

@functools.partial(jax.jit, static_argnames=('compute_dtype', 'low'))
def _tv_hist(models, base, bucket, *, compute_dtype, low):
  """Per-model 65536-bin histograms of |theta_i - theta_0| bit patterns."""
  b = _cast_in(base, compute_dtype)
  hists = []
  for i, m in enumerate(models):
    key = select.lo_key(bucket[i]) if low else select.hi_key
    hists.append(select.scan_hist((_cast_in(m, compute_dtype) - b).reshape(-1),
                                  key, select.BINS, select.magnitude_bits))
  return jnp.stack(hists)


@functools.partial(jax.jit, static_argnames=('compute_dtype',))
def _count_at_least(models, base, thr_bits, *, compute_dtype):
  b = _cast_in(base, compute_dtype)
  return jnp.stack([
      jnp.sum(select.magnitude_bits(_cast_in(m, compute_dtype) - b)
              >= thr_bits[i], dtype=jnp.int32)
      for i, m in enumerate(models)])


def _pick_np(hist: np.ndarray, k: np.ndarray):
  """Per row: bucket holding the k-th largest, and k's rank inside it."""
  ge = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
  b = np.maximum((ge >= k[:, None]).sum(axis=1) - 1, 0)
  rows = np.arange(hist.shape[0])
  above = ge[rows, b] - hist[rows, b]
  return b, k - above


def global_thresholds(jobs: Sequence[Job], keep: Sequence[np.ndarray],
                      *, pool: cf.Executor, progress: bool = False
                      ) -> np.ndarray:
  """Exact per-model k-th largest |task vector| bits over all ``jobs``.

  Args:
    jobs: jobs with a base; their non-base inputs are the K models.
    keep: per job, ``[K]`` (fractional) numbers of entries each model keeps
      in that tensor (density x size); ``int`` of their sum is the global k
      per model (``int(density x total size)`` for a constant density, as
      an in-memory global trim counts).
    pool: thread pool for reads.
    progress: show a progress bar.

  Returns:
    ``[K]`` uint32 threshold bit patterns (keep ``bits >= threshold``).
  """
  k_total = np.floor(np.sum(np.stack(keep), axis=0) + 1e-9).astype(np.int64)
  k_total = np.maximum(k_total, 1)
  hi = None
  bucket = None
  for low in (False, True):
    acc = None
    for job, arrays in _prefetch(jobs, pool, desc=('trim pass ' +
                                                   ('2/2' if low else '1/2')),
                                 progress=progress):
      bi = job.base_index
      models = tuple(a for i, a in enumerate(arrays) if i != bi)
      cd = None if job.compute_dtype is None else np.dtype(job.compute_dtype)
      h = np.asarray(_tv_hist(models, arrays[bi],
                              jnp.asarray(bucket if low else
                                          np.zeros(len(models)), jnp.uint32),
                              compute_dtype=cd, low=low), np.int64)
      acc = h if acc is None else acc + h
    if not low:
      hi = acc
      bucket, k_in = _pick_np(hi, k_total)
    else:
      lowbits, _ = _pick_np(acc, k_in)
  return ((bucket.astype(np.uint64) << 16) | lowbits.astype(np.uint64)
          ).astype(np.uint32)


# ----------------------------------------------------------------- executor --

def _read_job(job: Job) -> list[np.ndarray]:
  return [r.read(n, rows=job.rows) for r, n in job.inputs]


def _prefetch(jobs: Sequence[Job], pool: cf.Executor, *,
              max_bytes: int = 1 << 30, desc: str = 'merge',
              progress: bool = False) -> Iterable[tuple[Job, list[np.ndarray]]]:
  """Yields ``(job, arrays)`` in order, reading ahead up to ``max_bytes``."""
  pending: collections.deque = collections.deque()
  inflight = 0
  nxt = 0
  bar = _progress_bar(jobs, desc) if progress else None
  held = 0  # the job being merged still counts against the budget
  try:
    for _ in range(len(jobs)):
      inflight -= held
      # Always keep one job in flight; add more while under the byte budget.
      while nxt < len(jobs) and (not pending or
                                 inflight + jobs[nxt].nbytes_in() <= max_bytes):
        pending.append((jobs[nxt], pool.submit(_read_job, jobs[nxt])))
        inflight += jobs[nxt].nbytes_in()
        nxt += 1
      job, fut = pending.popleft()
      arrays = fut.result()
      held = job.nbytes_in()
      yield job, arrays
      if bar is not None:
        bar.update(job.nbytes_in())
  finally:
    for _, fut in pending:
      fut.cancel()
    if bar is not None:
      bar.close()


def _progress_bar(jobs, desc):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=sum(j.nbytes_in() for j in jobs), desc=desc, unit='B',
              unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


@dataclasses.dataclass
class StreamStats:
  tensors: int = 0
  bytes_read: int = 0
  bytes_written: int = 0
  compiles: int = 0
  seconds: float = 0.0
  shards: int = 0
  resumed_shards: int = 0  # output shards kept from a killed run


def run_jobs(jobs: Sequence[Job], out_dir: str, *,
             config: dict[str, Any] | None = None,
             max_shard_size: int = st.DEFAULT_SHARD_SIZE,
             prefetch_bytes: int = 1 << 29, threads: int = 4,
             overwrite: bool = False, progress: bool = False,
             global_trim: Callable[[np.ndarray], None] | None = None,
             metadata: dict[str, str] | None = None,
             inputs: Sequence[str] = (),
             copy_files: Sequence[str] = (),
             extra_files: dict[str, str] | None = None,
             resume_key: str | None = None,
             allow_nonfinite: bool = False) -> StreamStats:
  """Runs ``jobs`` and writes the results as an HF checkpoint, atomically.

  Args:
    jobs: one per output tensor, in output order.
    out_dir: output directory (written via a temporary directory and renamed
      when complete: a killed run leaves nothing that looks complete).
    config: ``config.json`` contents for the output, or None.
    max_shard_size: bytes per output shard.
    prefetch_bytes: read-ahead budget (input bytes in flight).
    threads: reader threads.
    overwrite: replace an existing non-empty ``out_dir``.
    progress: tqdm progress bar (bytes read, with ETA).
    global_trim: internal hook for ``trim_scope: global`` (a first pass).
    metadata: extra safetensors header metadata.
    copy_files: files copied into the output (e.g. tokenizer files) before
      it is renamed into place.
    extra_files: ``{file name: text}`` written into the output likewise
      (e.g. ``mergekit_config.yml``, as mergekit writes).
    inputs: the checkpoints read; ``out_dir`` may not hold any of them.
    resume_key: a string identifying the run (inputs, method, options):
      a killed run with the same key is resumed, keeping the output shards
      it finished whose checksums still match, and the result is the same
      as an uninterrupted run's. None starts afresh every time.
    allow_nonfinite: merge inputs and write outputs holding NaN/Inf; by
      default either is an error naming the tensor and the inputs that hold
      NaN/Inf (a merge such as TIES can hide a NaN input in a finite output).

  Returns:
    A `StreamStats`.

  Raises:
    ValueError: a non-finite input or output (without ``allow_nonfinite``),
      and the input errors of the jobs.
  """
  t0 = time.perf_counter()
  compiles0 = compile_count()
  stats = StreamStats()
  specs = [j.spec() for j in jobs]
  if resume_key is not None:
    resume_key = _run_key(resume_key, jobs, specs, max_shard_size, metadata,
                          config, copy_files, extra_files)
  with atomic.atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs,
                                resume_key=resume_key) as tmp, \
      cf.ThreadPoolExecutor(threads, thread_name_prefix='mergejax-read') as pool:
    journal = {'key': resume_key, 'shards': {}}

    def on_shard(name, digest):
      if resume_key is not None:
        journal['shards'][name] = digest
        atomic.write_progress(tmp, journal)

    writer = st.ShardedWriter(tmp, specs, max_shard_size=max_shard_size,
                              metadata=metadata, on_shard=on_shard)
    stats.shards = len(writer.files)
    done = _finished_shards(tmp, writer.files, resume_key)
    journal['shards'] = dict(done)
    skip = writer.skip_shards(done)
    stats.resumed_shards = len(done)
    if global_trim is not None:
      global_trim(pool)
    compile_pool = cf.ThreadPoolExecutor(2, thread_name_prefix='mergejax-jit')
    _precompile(jobs[skip:], compile_pool)
    compile_pool.shutdown(wait=False)  # it finishes its queue in background
    # One writer thread; the queue holds at most two results, so device
    # arrays waiting to be written stay bounded.
    q: collections.deque = collections.deque()
    cv = threading.Condition()
    err: list[BaseException] = []

    delay = float(os.environ.get(_DELAY_ENV, 0) or 0)

    def write_loop():
      try:
        while True:
          with cv:
            while not q:
              cv.wait()
            item = q[0]
          if item is None:
            return
          job, (arr, inputs_finite) = item
          host = np.asarray(arr)  # blocks until the computation is done
          if not allow_nonfinite:
            _check_finite(job, host, bool(inputs_finite))
          writer.write(job.out_name, host)
          if delay:
            time.sleep(delay)
          with cv:
            q.popleft()
            cv.notify_all()
      except BaseException as e:  # pylint: disable=broad-except
        err.append(e)
        with cv:
          q.clear()
          cv.notify_all()

    wt = threading.Thread(target=write_loop, name='mergejax-write', daemon=True)
    wt.start()
    try:
      # Up to two merges run ahead of the writer (XLA's CPU client runs
      # dispatched computations concurrently), but a large tensor (an
      # embedding) runs alone: its intermediates dominate peak memory.
      big_bytes = max(prefetch_bytes // 4, 1 << 26)
      prev_big = False
      for job, arrays in _prefetch(jobs[skip:], pool, max_bytes=prefetch_bytes,
                                   progress=progress):
        big = job.nbytes_in() > big_bytes
        ahead = 0 if (big or prev_big) else 1
        with cv:
          while len(q) > ahead and not err:
            cv.wait()
          if err:
            break
        out = _merge_one(job, arrays)
        del arrays
        prev_big = big
        stats.tensors += 1
        stats.bytes_read += job.nbytes_in()
        stats.bytes_written += job.spec().nbytes
        with cv:
          q.append((job, out))
          cv.notify_all()
    finally:
      with cv:
        q.append(None)
        cv.notify_all()
      wt.join()
    if err:
      raise err[0]
    writer.finalize(config)
    for f in copy_files:
      shutil.copy(f, os.path.join(tmp, os.path.basename(f)))
    for name, text in (extra_files or {}).items():
      with open(os.path.join(tmp, name), 'w') as fh:
        fh.write(text)
  stats.compiles = compile_count() - compiles0
  stats.seconds = time.perf_counter() - t0
  return stats


def _run_key(user_key, jobs, specs, max_shard_size, metadata, config,
             copy_files, extra_files) -> str:
  """The caller's key bound to everything else that decides the output bytes.

  The output plan, the written metadata and every input file's size and
  modification time: a run resumes only on exactly the inputs it started on.
  """
  files = sorted({f for j in jobs for r, _ in j.inputs
                  for f in r.source_files()} | set(copy_files))
  stat = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  blob = json.dumps(dict(
      key=user_key, shard=max_shard_size, metadata=metadata, config=config,
      extra=extra_files, files=stat,
      specs=[(s.name, list(s.shape), str(np.dtype(s.dtype))) for s in specs]),
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def _finished_shards(tmp: str, files: Sequence[str],
                     resume_key: str | None) -> dict[str, str]:
  """The leading output shards a resumed run keeps: journaled and unchanged.

  Everything else a killed run left (a partly written shard, shards after a
  changed one) is deleted, so the writer continues from a clean state.
  """
  progress = atomic.read_progress(tmp) if resume_key is not None else None
  recorded = (progress or {}).get('shards', {})
  done = {}
  for name in files:
    path = os.path.join(tmp, name)
    if name not in recorded or not os.path.isfile(path):
      break
    if st.file_sha256(path) != recorded[name]:
      break
    done[name] = recorded[name]
  for name in files:
    if name not in done and os.path.exists(os.path.join(tmp, name)):
      os.remove(os.path.join(tmp, name))
  return done


def _check_finite(job: Job, out: np.ndarray, inputs_finite: bool) -> None:
  """A NaN/Inf input or output is an error naming the tensor and the inputs."""
  out_finite = not st.is_float(out.dtype) or bool(np.isfinite(out).all())
  if inputs_finite and out_finite:
    return
  bad = []
  for r, name in job.inputs:
    x = r.read(name)
    if st.is_float(x.dtype) and not np.isfinite(x).all():
      bad.append(f'{name!r} in {r.path} ({int(np.sum(~np.isfinite(x)))} '
                 'NaN/Inf entries)')
  where = ('; inputs with NaN/Inf: ' + ', '.join(bad)) if bad else (
      '; the inputs are finite, so the merge itself overflowed (check the '
      'weights and the output dtype)')
  what = 'holds NaN/Inf' if not out_finite else 'is finite but its inputs are not'
  raise ValueError(f'Output tensor {job.out_name!r} {what}{where}. '
                   'Nothing was written; fix or replace the input, or pass '
                   '--allow-nonfinite (allow_nonfinite=True) to write it anyway.')


# ------------------------------------------------------------ Python API ----

def stream_merge(transformation: base_lib.MergeTransformation,
                 base: str | None, models: Sequence[str], out_dir: str, *,
                 key: jax.Array | None = None, out_dtype: Any = None,
                 names: Sequence[str] | None = None,
                 max_shard_size: int = st.DEFAULT_SHARD_SIZE,
                 prefetch_bytes: int = 1 << 29, threads: int = 4,
                 overwrite: bool = False, progress: bool = False,
                 resume_key: str | None = None,
                 allow_nonfinite: bool = False) -> StreamStats:
  """Merges HF safetensors checkpoints tensor by tensor into ``out_dir``.

  Equivalent to ``mergejax.merge(transformation, base, models)`` on the
  loaded checkpoints (for tensor-local transformations), but holds only a few
  tensors in memory. Tensors are merged in their file layout.

  Args:
    transformation: the merge (its update is applied to every tensor; numeric
      hyperparameters are shared by all tensors).
    base: base checkpoint directory, or None for methods without a base.
    models: fine-tuned checkpoint directories.
    out_dir: output directory.
    key: PRNG key for random methods; each tensor gets ``fold_in(key, i)``.
    out_dtype: output dtype (default: the base's, else the first model's).
    names: tensors to merge (default: all tensors of the base/first model).
    max_shard_size: bytes per output shard.
    prefetch_bytes: read-ahead budget in bytes.
    threads: reader threads.
    overwrite: replace an existing ``out_dir``.
    progress: show a progress bar.
    resume_key: a string naming this merge (the transformation and its
      hyperparameters, which the executor cannot fingerprint itself): a killed
      run with the same key and the same inputs is resumed (`run_jobs`).
    allow_nonfinite: merge NaN/Inf inputs and write NaN/Inf outputs instead
      of raising.

  Returns:
    A `StreamStats`.
  """
  readers = ([st.CheckpointReader(base)] if base is not None else []) + [
      st.CheckpointReader(m) for m in models]
  ref = readers[0]
  names = list(ref.keys()) if names is None else list(names)
  bi = 0 if base is not None else None
  jobs = []
  for i, n in enumerate(names):
    for r in readers:
      if n not in r:
        raise ValueError(f'Tensor {n!r} is missing from {r.path} (present in '
                         f'{ref.path}).')
      if r.shape(n) != ref.shape(n):
        raise ValueError(f'Tensor {n!r} has shape {r.shape(n)} in {r.path} '
                         f'but {ref.shape(n)} in {ref.path}.')
    jobs.append(Job(n, [(r, n) for r in readers], bi,
                    lambda: transformation,
                    None if key is None else jax.random.fold_in(key, i),
                    out_dtype))
  conf = ref.config()
  if conf is not None and out_dtype is not None:
    conf = {**conf, 'torch_dtype': st.dtype_name(st.parse_dtype(out_dtype))}
  try:
    return run_jobs(jobs, out_dir, config=conf, max_shard_size=max_shard_size,
                    prefetch_bytes=prefetch_bytes, threads=threads,
                    overwrite=overwrite, progress=progress,
                    inputs=[base, *models] if base is not None else list(models),
                    resume_key=resume_key, allow_nonfinite=allow_nonfinite)
  finally:
    for r in readers:
      r.close()
