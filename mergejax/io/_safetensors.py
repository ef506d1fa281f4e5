"""Hugging Face safetensors checkpoints: lazy per-tensor reads, streaming writes.

Layout (as ``transformers`` and mergekit write it): a directory holding
``config.json`` and either one ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: shard}}``).

Reads are lazy and do not memory-map: the header of every shard is parsed once
and each tensor is fetched with one ``os.pread`` into a fresh buffer. A mapped
file would count against the address-space limit (``prlimit --as``) and its
touched pages against the RSS of the merge, whatever the tensor size; a
``pread`` costs exactly one tensor of memory and releases the GIL, so a thread
pool overlaps reads with compute. The bytes are the same ones
``safetensors.safe_open(framework="numpy")`` returns (tested).

Writes are planned: the list of output tensors (names, shapes, dtypes) is known
before merging, so shard boundaries and headers are fixed up front and each
tensor is appended to its shard the moment it is computed. Peak memory is then
a few tensors, not a whole (5 GB) shard as when a shard is collected before
``save_file``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from mergejax.io._atomic import MARKER_NAME

INDEX_NAME = 'model.safetensors.index.json'
SINGLE_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes, as mergekit ('5B').

_ST_TO_NP = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32),
    'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

_DTYPE_NAMES = {
    'float32': np.float32, 'fp32': np.float32, 'float': np.float32,
    'float16': np.float16, 'fp16': np.float16, 'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'bf16': ml_dtypes.bfloat16,
    'float64': np.float64, 'fp64': np.float64, 'double': np.float64,
}


def parse_dtype(name: Any) -> np.dtype:
  """``'bfloat16'``, ``'torch.float16'``, ``'fp32'``, a NumPy dtype… -> dtype."""
  if name is None:
    raise ValueError('dtype is None')
  if not isinstance(name, str):
    return np.dtype(name)
  key = name.lower().removeprefix('torch.').removeprefix('jnp.')
  if key not in _DTYPE_NAMES:
    raise ValueError(f'Unknown dtype {name!r}; use one of float32, float16, '
                     'bfloat16, float64.')
  return np.dtype(_DTYPE_NAMES[key])


def is_float(dtype: Any) -> bool:
  """True for floating dtypes, bfloat16 included (NumPy does not know it)."""
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def dtype_name(dtype: Any) -> str:
  """The ``torch_dtype`` spelling of a dtype (``'bfloat16'``, ``'float32'``)."""
  return str(np.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: file, byte range, dtype and shape."""
  name: str
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  nbytes: int


# JAX's CPU client uses a NumPy array's memory in place (no copy) when it is
# 64-byte aligned; a bytearray is only 16-byte aligned, which would cost one
# more copy of every tensor read (and twice its memory while both live).
_ALIGN = 64


def _aligned_empty(nbytes: int) -> np.ndarray:
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  off = -raw.ctypes.data % _ALIGN
  return raw[off:off + nbytes]


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parses a ``.safetensors`` header into ``{name: TensorInfo}``."""
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f'{path} is not a safetensors file (too short); it may '
                       'be a partial download or an interrupted write.')
    (n,) = struct.unpack('<Q', head)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise ValueError(f'{path}: header length {n} exceeds the file size '
                       f'{size}; the file is truncated or not safetensors.')
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  out = {}
  for name, meta in header.items():
    if meta['dtype'] not in _ST_TO_NP:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype '
                       f'{meta["dtype"]}.')
    b, e = meta['data_offsets']
    if 8 + n + e > size:
      raise ValueError(f'{path}: tensor {name!r} ends at byte {8 + n + e} but '
                       f'the file has {size} bytes: the file is truncated.')
    out[name] = TensorInfo(name, path, _ST_TO_NP[meta['dtype']],
                           tuple(meta['shape']), 8 + n + b, e - b)
  return out


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (or a single file)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No checkpoint at {path!r}: expected a directory '
                            'with model.safetensors or '
                            f'{INDEX_NAME}, or a .safetensors file.')
  index = os.path.join(path, INDEX_NAME)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.exists(os.path.join(path, s))]
    if missing:
      raise FileNotFoundError(f'{index} lists shards {missing} that do not '
                              'exist; the checkpoint is incomplete.')
    return [os.path.join(path, s) for s in files]
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'{path} holds no .safetensors files (PyTorch .bin '
                            'checkpoints are not supported; convert them with '
                            'transformers save_pretrained(safe_serialization=True)).')
  return [os.path.join(path, f) for f in files]


class CheckpointReader:
  """Lazy reader of a (sharded) safetensors checkpoint.

  Example:
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(d, {'w': np.ones((2, 3), np.float32)})
    >>> r = CheckpointReader(d)
    >>> r.shape('w'), r.read('w').sum()
    ((2, 3), np.float32(6.0))
  """

  def __init__(self, path: str):
    self.path = path
    self.tensors: dict[str, TensorInfo] = {}
    for f in checkpoint_files(path):
      for name, info in read_header(f).items():
        if name in self.tensors:
          raise ValueError(f'Tensor {name!r} appears in both '
                           f'{self.tensors[name].file} and {f}.')
        self.tensors[name] = info
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def keys(self) -> list[str]:
    return list(self.tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._info(name).dtype

  def _info(self, name: str) -> TensorInfo:
    try:
      return self.tensors[name]
    except KeyError:
      raise KeyError(f'Tensor {name!r} is not in checkpoint {self.path}.'
                     ) from None

  def _fd(self, file: str) -> int:
    with self._lock:
      if file not in self._fds:
        self._fds[file] = os.open(file, os.O_RDONLY)
      return self._fds[file]

  def read(self, name: str, rows: int | None = None) -> np.ndarray:
    """Reads one tensor (its own copy; thread-safe; releases the GIL on IO).

    Args:
      name: the tensor.
      rows: read only the first ``rows`` entries of axis 0 (a prefix of the
        bytes), e.g. to crop an embedding to a common vocabulary.
    """
    info = self._info(name)
    shape = info.shape
    nbytes = info.nbytes
    if rows is not None:
      if not shape or rows > shape[0]:
        raise ValueError(f'Cannot read {rows} rows of {name!r} {shape}.')
      shape = (rows,) + tuple(shape[1:])
      nbytes = int(np.prod(shape, dtype=np.int64)) * info.dtype.itemsize
    buf = _aligned_empty(nbytes)
    view = memoryview(buf)
    fd, got = self._fd(info.file), 0
    while got < nbytes:
      n = os.preadv(fd, [view[got:]], info.start + got)
      if n <= 0:
        raise OSError(f'Short read of {name!r} from {info.file}.')
      got += n
    return buf.view(info.dtype).reshape(shape)

  def read_all(self) -> dict[str, np.ndarray]:
    return {k: self.read(k) for k in self.tensors}

  def source_files(self) -> list[str]:
    """The files the tensors are read from."""
    return checkpoint_files(self.path)

  def config(self) -> dict[str, Any] | None:
    """The checkpoint's ``config.json`` as a dict, or None."""
    p = os.path.join(self.path, CONFIG_NAME)
    if os.path.isdir(self.path) and os.path.exists(p):
      with open(p) as f:
        return json.load(f)
    return None

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int
                ) -> list[list[TensorSpec]]:
  """Greedy shard split in tensor order (mergekit's rule: a tensor that would
  overflow a non-empty shard starts a new one)."""
  shards, cur, size = [], [], 0
  for s in specs:
    if cur and max_shard_size > 0 and size + s.nbytes > max_shard_size:
      shards.append(cur)
      cur, size = [], 0
    cur.append(s)
    size += s.nbytes
  if cur or not shards:
    shards.append(cur)
  return shards


def shard_names(n: int) -> list[str]:
  if n == 1:
    return [SINGLE_NAME]
  return [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]
                  ) -> bytes:
  header: dict[str, Any] = {'__metadata__': dict(metadata)}
  off = 0
  for s in specs:
    header[s.name] = {'dtype': _NP_TO_ST[np.dtype(s.dtype)],
                      'shape': list(s.shape),
                      'data_offsets': [off, off + s.nbytes]}
    off += s.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors
  return struct.pack('<Q', len(raw)) + raw


class ShardedWriter:
  """Writes a planned list of tensors into HF-layout shards, in order.

  Call `write` once per tensor in the order of ``specs`` (each tensor goes
  straight to disk), then `finalize`, which writes the index (for more than
  one shard) and ``config.json``. Write into a temporary directory from
  `atomic.atomic_output_dir` so that a killed run leaves nothing complete.
  """

  def __init__(self, out_dir: str, specs: Sequence[TensorSpec], *,
               max_shard_size: int = DEFAULT_SHARD_SIZE,
               metadata: Mapping[str, str] | None = None,
               on_shard: Callable[[str, str], None] | None = None,
               file_name: str | None = None):
    self.out_dir = out_dir
    # SHA-256 of every finished file, recorded in the output's marker so a
    # reader can tell a complete checkpoint from a corrupted or changed one.
    self.digests: dict[str, str] = {}
    self._on_shard = on_shard
    self._hash = None
    self.specs = list(specs)
    names = [s.name for s in self.specs]
    if len(set(names)) != len(names):
      raise ValueError('Duplicate output tensor names.')
    for s in self.specs:
      if np.dtype(s.dtype) not in _NP_TO_ST:
        raise ValueError(f'Cannot write {s.name!r} with dtype {s.dtype}.')
    self.shards = plan_shards(self.specs, max_shard_size)
    self.files = shard_names(len(self.shards))
    if file_name is not None:  # e.g. a PEFT adapter's adapter_model.safetensors
      if len(self.shards) != 1:
        raise ValueError(f'file_name={file_name!r} needs one shard; raise '
                         'max_shard_size.')
      self.files = [file_name]
    self.metadata = {'format': 'pt', **(metadata or {})}
    self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
    self._next = 0
    self._fh = None
    self._shard = -1

  def _open(self, i: int) -> None:
    if self._fh is not None:
      self._close()
    self._fh = open(os.path.join(self.out_dir, self.files[i]), 'wb')
    self._hash = hashlib.sha256()
    self._put(_header_bytes(self.shards[i], self.metadata))
    self._shard = i

  def _put(self, data) -> None:
    self._fh.write(data)
    self._hash.update(data)

  def _close(self) -> None:
    self._fh.flush()
    os.fsync(self._fh.fileno())
    self._fh.close()
    self._fh = None
    name = self.files[self._shard]
    self.digests[name] = self._hash.hexdigest()
    if self._on_shard is not None:
      self._on_shard(name, self.digests[name])

  def skip_shards(self, digests: Mapping[str, str]) -> int:
    """Continues after shards already on disk (a resumed run).

    Args:
      digests: ``{file: sha256}`` of the first shards, complete and verified.

    Returns:
      The number of tensors those shards hold (to skip in the input).
    """
    if self._next:
      raise ValueError('skip_shards() must be called before any write().')
    n = 0
    for i, name in enumerate(self.files):
      if name not in digests:
        break
      self.digests[name] = digests[name]
      self._shard = i
      n += len(self.shards[i])
    self._next = n
    return n

  def write(self, name: str, array: np.ndarray) -> None:
    if self._next >= len(self._order):
      raise ValueError(f'Unexpected tensor {name!r}: all tensors written.')
    i, spec = self._order[self._next]
    if name != spec.name:
      raise ValueError(f'Tensors must be written in plan order: expected '
                       f'{spec.name!r}, got {name!r}.')
    array = np.asarray(array, order='C')
    if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
      raise ValueError(f'{name!r}: planned {spec.shape} {spec.dtype}, got '
                       f'{array.shape} {array.dtype}.')
    if i != self._shard or self._fh is None:
      self._open(i)
    self._put(memoryview(array.reshape(-1).view(np.uint8)))
    self._next += 1

  def finalize(self, config: Mapping[str, Any] | None = None) -> None:
    if self._next != len(self._order):
      missing = [s.name for _, s in self._order[self._next:]][:5]
      raise ValueError(f'finalize() before all tensors were written; next '
                       f'missing: {missing}.')
    if self._fh is not None:
      self._close()
    if not self.specs:  # An empty checkpoint still gets a valid file.
      self._open(0)
      self._close()
    texts = {}
    if len(self.shards) > 1:
      index = {'metadata': {'total_size': sum(s.nbytes for s in self.specs)},
               'weight_map': {s.name: self.files[i]
                              for i, s in self._order}}
      texts[INDEX_NAME] = json.dumps(index, indent=2)
    if config is not None:
      texts[CONFIG_NAME] = json.dumps(dict(config), indent=2, sort_keys=True)
    for name, text in texts.items():
      data = text.encode()
      with open(os.path.join(self.out_dir, name), 'wb') as f:
        f.write(data)
      self.digests[name] = hashlib.sha256(data).hexdigest()
    # The marker `atomic_output_dir` completes (it adds who wrote it).
    with open(os.path.join(self.out_dir, MARKER_NAME), 'w') as f:
      json.dump({'sha256': dict(sorted(self.digests.items()))}, f, indent=1)


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
  """SHA-256 of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def verify_checkpoint(path: str) -> bool:
  """Checks a mergejax-written checkpoint against the checksums it recorded.

  Args:
    path: a checkpoint directory.

  Returns:
    True if it holds checksums and all match; False if it records none
    (not written by mergejax, or by a version without checksums).

  Raises:
    ValueError: a recorded file is missing or its contents changed since it
      was written, naming the file.
  """
  marker = os.path.join(path, MARKER_NAME)
  if not os.path.isfile(marker):
    return False
  try:
    with open(marker) as f:
      digests = json.load(f).get('sha256')
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f'{marker}: unreadable mergejax metadata ({e}).') from None
  if not digests:
    return False
  for name, want in digests.items():
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise ValueError(f'{file} is missing: the checkpoint at {path} is '
                       'incomplete (its metadata lists this file).')
    got = file_sha256(file)
    if got != want:
      raise ValueError(f'{file} changed since mergejax wrote it (SHA-256 '
                       f'{got[:12]}…, recorded {want[:12]}…): the file is '
                       'corrupt or was modified; restore or re-create it.')
  return True


def save_checkpoint(out_dir: str, tensors: Mapping[str, Any], *,
                    dtype: Any = None, config: Mapping[str, Any] | None = None,
                    max_shard_size: int = DEFAULT_SHARD_SIZE,
                    overwrite: bool = True) -> None:
  """Writes ``{name: array}`` as an HF safetensors checkpoint, atomically.

  Args:
    out_dir: the checkpoint directory.
    tensors: flat ``{name: array}`` (NumPy or JAX arrays).
    dtype: cast floating tensors to this dtype (``'bfloat16'``…); None keeps.
    config: written as ``config.json`` (``torch_dtype`` is set to ``dtype``).
    max_shard_size: bytes per shard; more than one shard adds the index file.
    overwrite: replace an existing directory.
  """
  from mergejax.io import _atomic as atomic  # pylint: disable=g-import-not-at-top
  arrays = {}
  for k, v in tensors.items():
    a = np.asarray(v)
    if dtype is not None and is_float(a.dtype):
      a = a.astype(parse_dtype(dtype))
    arrays[k] = a
  specs = [TensorSpec(k, a.shape, a.dtype) for k, a in arrays.items()]
  if config is not None and dtype is not None:
    config = {**config, 'torch_dtype': dtype_name(parse_dtype(dtype))}
  with atomic.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    w = ShardedWriter(tmp, specs, max_shard_size=max_shard_size)
    for k, a in arrays.items():
      w.write(k, a)
    w.finalize(config)


def load_checkpoint(path: str, *, dtype: Any = None,
                    shardings: Any = None, verify: bool = True) -> dict[str, Any]:
  """Reads a whole checkpoint as ``{name: array}``.

  Args:
    path: a checkpoint directory or a ``.safetensors`` file.
    verify: check the files against the checksums a mergejax-written
      checkpoint records (`verify_checkpoint`) before reading.
    dtype: cast to this dtype; None keeps the stored dtypes.
    shardings: None returns NumPy arrays. Otherwise each tensor is placed with
      ``jax.device_put`` right after it is read (so the host holds one tensor
      at a time): a ``jax.sharding.Sharding`` for all tensors, a function
      ``(name, shape) -> Sharding``, or ``[(regex, Sharding), ...]`` rules
      (first match wins).
  """
  if verify and os.path.isdir(path):
    verify_checkpoint(path)
  out = {}
  with CheckpointReader(path) as r:
    for k in r.keys():
      a = r.read(k)
      if dtype is not None:
        a = a.astype(parse_dtype(dtype))
      if shardings is not None:
        import jax  # pylint: disable=g-import-not-at-top
        a = jax.device_put(a, resolve_sharding(shardings, k, a.shape))
      out[k] = a
  return out


def resolve_sharding(shardings: Any, name: str, shape: tuple[int, ...]):
  """Picks the sharding for one tensor from a sharding, function or rules."""
  if callable(shardings) and not hasattr(shardings, 'addressable_devices'):
    return shardings(name, shape)
  if isinstance(shardings, (list, tuple)):
    from mergejax._src import paths  # pylint: disable=g-import-not-at-top
    return paths.match_rules(shardings, name, what='sharding rule')
  return shardings


def iter_specs(reader: CheckpointReader, names: Iterable[str] | None = None):
  for n in (reader.keys() if names is None else names):
    yield TensorSpec(n, reader.shape(n), reader.dtype(n))
