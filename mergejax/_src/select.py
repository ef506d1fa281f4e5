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

_BINS = 1 << 16


def magnitude_bits(x: jax.Array) -> jax.Array:
  """``|x|`` in float32, bit-cast to uint32 (order-preserving), flattened."""
  return jax.lax.bitcast_convert_type(
      jnp.abs(x.astype(jnp.float32)), jnp.uint32).reshape(-1)


def _hist(idx: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  idx = idx.astype(jnp.int32)
  if valid is not None:
    idx = jnp.where(valid, idx, _BINS)  # out of range: dropped below
  return jnp.zeros(_BINS, jnp.int32).at[idx].add(1, mode='drop')


def _suffix_sum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x[::-1])[::-1]


def _pick(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bucket holding the k-th largest element, and k's rank inside it."""
  # Two levels of 256: a cumsum over all 65536 bins compiles slowly on CPU
  # (~1 s, an associative scan), two of 256 take a few ms and run as fast.
  h2 = hist.reshape(256, 256)
  rows = jnp.sum(h2, axis=1)
  ge_rows = _suffix_sum(rows)  # elements in rows >= r
  r = jnp.maximum(jnp.sum(ge_rows >= k) - 1, 0)  # last row with ge >= k
  above_rows = ge_rows[r] - rows[r]
  row = h2[r]
  ge = _suffix_sum(row) + above_rows  # elements in buckets >= (r, c)
  c = jnp.maximum(jnp.sum(ge >= k) - 1, 0)
  above = ge[c] - row[c]
  return r * 256 + c, k - above


def kth_largest_bits(bits: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Bit pattern of the k-th largest value among several uint32 bit arrays.

  Args:
    bits: flat uint32 arrays from `magnitude_bits` (one per leaf, or one).
    k: 1-based rank, ``1 <= k <= total size`` (int, may be traced).

  Returns:
    A uint32 scalar: the bits of the k-th largest magnitude.
  """
  k = jnp.asarray(k, jnp.int32)
  hi = sum(_hist(b >> 16) for b in bits)
  bucket, k_in = _pick(hi, k)
  lo = sum(_hist(b & 0xFFFF, (b >> 16) == bucket.astype(jnp.uint32))
           for b in bits)
  low, _ = _pick(lo, k_in)
  return (bucket.astype(jnp.uint32) << 16) | low.astype(jnp.uint32)


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
    xs: arrays of any shapes, at most ``2**32 - 2`` entries in total.
    k: number of entries to keep (int, may be traced), clipped to
      ``[0, total size]``.
    exact: keep exactly ``k`` entries (see `topk_mask`).

  Returns:
    A list of bool arrays shaped like ``xs``.
  """
  masks = batched_topk_masks([x[None] for x in xs], jnp.asarray(k)[None],
                             exact=exact)
  return [m[0] for m in masks]


def batched_topk_masks(xs: Sequence[jax.Array], k: jax.Array, *,
                       exact: bool = True) -> list[jax.Array]:
  """`topk_masks` for a batch: leading axis B on every array and on ``k``.

  Row ``b`` keeps the ``k[b]`` largest magnitudes among ``x[b]`` of all
  ``xs``. The threshold search is vmapped over the batch; the exact
  tie-breaking passes run under one ``cond`` for the whole batch, so they are
  skipped when no row has surplus ties at its threshold (the usual case for
  continuous values: two histogram passes instead of four).

  Args:
    xs: arrays shaped ``[B, ...]``.
    k: int ``[B]`` (may be traced).
    exact: keep exactly ``k[b]`` entries per row.

  Returns:
    A list of bool arrays shaped like ``xs``.
  """
  sizes = [int(np.prod(x.shape[1:])) for x in xs]
  n = sum(sizes)
  if n >= (1 << 32) - 1:
    raise ValueError(f'topk_masks: {n} entries in total; at most 2**32 - 2 '
                     'are supported (split the selection).')
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, min(n, (1 << 31) - 1))
  bits = [jax.vmap(magnitude_bits)(x) for x in xs]  # [B, n_j]
  t = jax.vmap(lambda bs, kk: kth_largest_bits(bs, jnp.maximum(kk, 1)))(
      bits, k)[:, None]
  above = [b > t for b in bits]
  at = [b == t for b in bits]
  if exact:
    # Keep the `need` lowest-index ties. A cumsum over the tensor costs ~3x a
    # histogram pass on CPU, so pick the need-th smallest index among the ties
    # with the same radix select, applied to the complemented index (~i > 0 for
    # every real index, so the zeros standing in for non-ties rank last).
    need = k - sum(jnp.sum(a, axis=1, dtype=jnp.int32) for a in above)
    n_at = sum(jnp.sum(a, axis=1, dtype=jnp.int32) for a in at)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    idx = [~(jnp.arange(s, dtype=jnp.uint32) + jnp.uint32(o))
           for s, o in zip(sizes, offsets)]

    def break_ties_row(at_row, need_row):
      cut = kth_largest_bits([jnp.where(a, i, 0) for a, i in zip(at_row, idx)],
                             jnp.maximum(need_row, 1))
      return [a & (i >= cut) & (need_row > 0) for a, i in zip(at_row, idx)]

    at = jax.lax.cond(jnp.any(n_at > need),
                      lambda a: jax.vmap(break_ties_row)(a, need), list, at)
  return [((a | b) & (k[:, None] > 0)).reshape(x.shape)
          for a, b, x in zip(above, at, xs)]
