"""Exact top-k magnitude selection without sorting (two-pass radix select).

A non-negative float32's bit pattern, read as uint32, orders like the float.
So the k-th largest ``|x|`` is found from two 65536-bin histograms: of the high
16 bits, then of the low 16 bits inside the bucket that holds the k-th element.
On CPU this is ~70x faster than ``jnp.sort`` of the tensor (see
``shared/reference/performance.md``), ``k`` may be a traced value (so densities
sweep under ``vmap``), and histograms add across leaves and shards, which gives
global (whole-model) thresholds for free.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import modelaxis

BINS = 1 << 16
# Tie-break chunk (entries); positions are int32, hence the size limit.
_CHUNK = 4096
_MAX_ENTRIES = (1 << 31) - _CHUNK
# Histogram slice (entries): its index array stays in cache.
_SCAN = 1 << 18
# Rows of at least this many entries are selected one by one (see
# `batched_topk_masks`).
_UNROLL_MIN = 1 << 20


def magnitude_bits(x: jax.Array) -> jax.Array:
  """``|x|`` in float32, bit-cast to uint32 (order-preserving), flattened."""
  return jax.lax.bitcast_convert_type(
      jnp.abs(x.astype(jnp.float32)), jnp.uint32).reshape(-1)


def scan_hist(flat: jax.Array, key, size: int, prep=None) -> jax.Array:
  """Histogram (``size`` bins) of ``key(prep(slice), start)`` over ``flat``.

  ``prep`` maps a slice of ``flat`` to uint32 bits (default: ``flat`` is
  bits already); ``key(bits, start)`` gives each entry's bin (``>= size``
  drops it), ``start`` being the slice's offset in ``flat``. A scatter over a
  whole tensor makes XLA:CPU write an index array and an array of ones as
  large as the tensor; a loop over slices of `_SCAN` entries keeps both in
  cache and out of peak memory, and ``prep`` runs inside the loop so no bits
  array of the whole tensor is written either.
  """
  prep = prep or (lambda b: b)

  def hist(start, length, h):
    sl = jax.lax.dynamic_slice(flat, (start,), (length,))
    return h.at[key(prep(sl), start)].add(1, mode='drop')

  n = flat.shape[0]
  steps = n // _SCAN
  h = jnp.zeros(size, jnp.int32)
  if steps:
    h = jax.lax.fori_loop(0, steps, lambda i, h: hist(i * _SCAN, _SCAN, h), h)
  if n % _SCAN:
    h = hist(steps * _SCAN, n % _SCAN, h)
  return h


def hi_key(b, start):
  """Histogram key: the high 16 bits (see `scan_hist`)."""
  del start
  return (b >> 16).astype(jnp.int32)


def lo_key(bucket):
  """Histogram key: the low 16 bits of entries in high-bits ``bucket``."""

  def key(b, start):
    del start
    return jnp.where((b >> 16) == bucket.astype(jnp.uint32),
                     (b & 0xFFFF).astype(jnp.int32), BINS)
  return key


def _suffix_sum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x[::-1])[::-1]


def _pick(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bucket holding the k-th largest element, and k's rank inside it."""
  # Two levels of 256: a cumsum over all 65536 bins compiles slowly on CPU
  # (~1 s, an associative scan), two of 256 take a few ms and run as fast.
  h2 = hist.reshape(-1, 256)
  rows = jnp.sum(h2, axis=1)
  ge_rows = _suffix_sum(rows)  # elements in rows >= r
  r = jnp.maximum(jnp.sum(ge_rows >= k) - 1, 0)  # last row with ge >= k
  above_rows = ge_rows[r] - rows[r]
  row = h2[r]
  ge = _suffix_sum(row) + above_rows  # elements in buckets >= (r, c)
  c = jnp.maximum(jnp.sum(ge >= k) - 1, 0)
  above = ge[c] - row[c]
  return r * 256 + c, k - above


def _threshold(bits: Sequence[jax.Array], k: jax.Array, prep=None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k-th largest bit pattern, how many ties at it to keep, and how many.

  ``bits`` are flat uint32 arrays, or flat arrays that ``prep`` turns into
  bits slice by slice (e.g. `magnitude_bits`).

  Returns ``(t, need, n_at)``: ``t`` the bits of the k-th largest value,
  ``need`` the number of entries equal to ``t`` that a top-k keeps (``k``
  minus the entries above ``t``) and ``n_at`` the number equal to ``t``. All
  three come from the two histograms, with no extra pass over the data.
  """
  k = jnp.asarray(k, jnp.int32)
  hi = sum(scan_hist(b, hi_key, BINS, prep) for b in bits)
  bucket, k_in = _pick(hi, k)
  lo = sum(scan_hist(b, lo_key(bucket), BINS, prep) for b in bits)
  low, need = _pick(lo, k_in)
  t = (bucket.astype(jnp.uint32) << 16) | low.astype(jnp.uint32)
  return t, need, lo[low]


def kth_largest_bits(bits: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Bit pattern of the k-th largest value among several uint32 bit arrays.

  Args:
    bits: flat uint32 arrays from `magnitude_bits` (one per leaf, or one).
    k: 1-based rank, ``1 <= k <= total size`` (int, may be traced).

  Returns:
    A uint32 scalar: the bits of the k-th largest magnitude.
  """
  return _threshold(bits, k)[0]


def kth_largest_magnitude(xs: Sequence[jax.Array] | jax.Array,
                          k: jax.Array) -> jax.Array:
  """The k-th largest ``|x|`` over one array or several (as float32).

  Example:
    >>> import jax.numpy as jnp
    >>> kth_largest_magnitude(jnp.array([0.5, -3., 2., 1.]), 2)
    Array(2., dtype=float32)
  """
  if not isinstance(xs, (list, tuple)):
    xs = [xs]
  t = kth_largest_bits([magnitude_bits(x) for x in xs], k)
  return jax.lax.bitcast_convert_type(t, jnp.float32)


def topk_mask(x: jax.Array, k: jax.Array, *, exact: bool = True) -> jax.Array:
  """Boolean mask of the ``k`` largest-magnitude entries of ``x``.

  Args:
    x: any-shaped array.
    k: number of entries to keep, ``0 <= k <= x.size`` (int, may be traced).
    exact: keep exactly ``k`` entries, breaking ties at the threshold by index
      (lowest first). With False, every entry tied with the k-th is kept.

  Returns:
    A bool array shaped like ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([0.5, -3., 2., 2.]), 2)
    Array([False,  True,  True, False], dtype=bool)
  """
  return topk_masks([x], k, exact=exact)[0]


def topk_masks(xs: Sequence[jax.Array], k: jax.Array, *,
               exact: bool = True) -> list[jax.Array]:
  """`topk_mask` over several arrays at once (a global top-k).

  The ``k`` largest magnitudes among all entries of all ``xs`` are kept; the
  histograms of the leaves are summed, so no concatenation happens. With
  ``exact``, ties at the threshold go to the lowest position in the order
  "leaf by leaf, then flat index".

  Args:
    xs: arrays of any shapes, fewer than ``2**31 - 4096`` entries in total.
    k: number of entries to keep (int, may be traced), clipped to
      ``[0, total size]``.
    exact: keep exactly ``k`` entries (see `topk_mask`).

  Returns:
    A list of bool arrays shaped like ``xs``.
  """
  return _topk_row(list(xs), k, exact=exact)


def batched_topk_masks(xs: Sequence[jax.Array], k: jax.Array, *,
                       exact: bool = True) -> list[jax.Array]:
  """`topk_masks` for a batch: leading axis B on every array and on ``k``.

  Row ``b`` keeps the ``k[b]`` largest magnitudes among ``x[b]`` of all
  ``xs``. Large rows are processed by `modelaxis.model_map` (unrolled for a
  few models, so no stacked intermediate is materialised), small ones by
  ``vmap`` (one compiled select).

  Args:
    xs: arrays shaped ``[B, ...]``.
    k: int ``[B]`` (may be traced).
    exact: keep exactly ``k[b]`` entries per row.

  Returns:
    A list of bool arrays shaped like ``xs``.
  """
  fn = lambda row, kk: _topk_row(row, kk, exact=exact)  # pylint: disable=unnecessary-lambda-assignment
  # Unrolled rows let XLA fold the stack's slices (no stacked copy of big
  # tensors) but compile one select per row; below _UNROLL_MIN entries a row
  # the compile time matters more, and vmap compiles one.
  if sum(int(np.prod(x.shape[1:])) for x in xs) < _UNROLL_MIN:
    return jax.vmap(fn)(list(xs), jnp.asarray(k))
  return modelaxis.model_map(fn, list(xs), jnp.asarray(k))


def _topk_row(xs: Sequence[jax.Array], k: jax.Array, *, exact: bool
              ) -> list[jax.Array]:
  sizes = [int(np.prod(x.shape)) for x in xs]
  n = sum(sizes)
  if n >= _MAX_ENTRIES:
    raise ValueError(f'topk_masks: {n} entries in one selection; at most '
                     f'{_MAX_ENTRIES - 1} are supported (split the selection, '
                     'e.g. trim per tensor instead of globally).')
  if n == 0:  # nothing to select (zero-size leaves): empty masks
    return [jnp.zeros(x.shape, bool) for x in xs]
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, n)
  flats = [x.reshape(-1) for x in xs]
  t, need, n_at = _threshold(flats, jnp.maximum(k, 1), magnitude_bits)
  if exact:
    first = _first_ties(flats, t, need, n_at)
  else:
    first = [jnp.ones((), bool)] * len(flats)
  bits = [magnitude_bits(f) for f in flats]
  return [((b > t) | ((b == t) & f)).reshape(x.shape) & (k > 0)
          for b, f, x in zip(bits, first, xs)]


def _first_ties(flats: list[jax.Array], t: jax.Array, need: jax.Array,
                n_at: jax.Array) -> list[jax.Array]:
  """Masks keeping the ``need`` lowest-position entries whose bits equal ``t``.

  Positions run leaf by leaf, then by flat index. A cumsum over the whole
  selection would cost several passes on CPU; instead one histogram pass
  counts the ties per chunk of `_CHUNK` entries, a short cumsum over the
  chunk counts finds the chunk holding the ``need``-th tie, and a cumsum over
  that one chunk finds its position. The masks are then ``position <= cut``:
  elementwise, fused with the rest of the merge.
  """
  lane = jnp.arange(_CHUNK, dtype=jnp.int32)
  sizes = [f.shape[0] for f in flats]
  offsets = np.cumsum([0] + sizes[:-1]).tolist()
  counts = []
  for f, m in zip(flats, sizes):
    chunks = -(-m // _CHUNK)

    def key(b, start, chunks=chunks):
      pos = start + jnp.arange(b.shape[0], dtype=jnp.int32)
      return jnp.where(b == t, pos // _CHUNK, chunks)

    counts.append(scan_hist(f, key, chunks, magnitude_bits))
  starts = jnp.asarray(np.concatenate(
      [o + _CHUNK * np.arange(-(-m // _CHUNK)) for o, m in zip(offsets, sizes)]),
                       jnp.int32)
  counts = jnp.concatenate(counts)
  csum = jnp.cumsum(counts)
  c = jnp.minimum(jnp.sum(csum < need), counts.shape[0] - 1)
  rem = need - (csum[c] - counts[c])  # ties to keep inside chunk c
  start = starts[c]
  window = jnp.zeros(_CHUNK, bool)
  for f, o, m in zip(flats, offsets, sizes):
    local = jnp.clip(start - o, 0, m) + lane
    inside = (start >= o) & (start < o + m) & (local < m)
    got = magnitude_bits(jnp.take(f, jnp.minimum(local, m - 1))) == t
    window |= inside & got
  cut = start + jnp.sum(jnp.cumsum(window.astype(jnp.int32)) < rem)
  keep_all = need >= n_at
  return [(jnp.arange(m, dtype=jnp.int32) + o <= cut) | keep_all
          for m, o in zip(sizes, offsets)]
