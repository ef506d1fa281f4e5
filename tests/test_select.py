"""The radix top-k select and its exact tie-break against NumPy references."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.transforms import _select as select


def _reference(xs, k):
  """Top-k of |x| over the concatenation, ties to the lowest position."""
  flat = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in xs])
  order = np.argsort(-flat, kind='stable')  # stable: lower index first
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  out, o = [], 0
  for x in xs:
    out.append(keep[o:o + x.size].reshape(x.shape))
    o += x.size
  return out


@hypothesis.settings(deadline=None, max_examples=12)
@hypothesis.given(sizes=st.lists(st.sampled_from([1, 7, 4095, 4096, 4097, 9000]),
                                 min_size=1, max_size=3),
                  levels=st.sampled_from([2, 5, 1000]),
                  frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_exact_topk_with_many_ties_matches_stable_sort(sizes, levels, frac,
                                                       seed):
  # Few distinct magnitudes: the threshold has thousands of ties spread over
  # several 4096-entry chunks and leaves, which the tie-break must order.
  rng = np.random.default_rng(seed)
  xs = [rng.integers(-levels, levels + 1, size=s).astype(np.float32)
        for s in sizes]
  k = int(round(frac * sum(sizes)))
  got = jax.jit(lambda *a: select.topk_masks(list(a), k))(*xs)
  for g, want in zip(got, _reference(xs, k)):
    np.testing.assert_array_equal(np.asarray(g), want)
  assert sum(int(np.sum(g)) for g in got) == k


def test_non_exact_keeps_every_tie_at_the_threshold():
  x = jnp.array([3., 1., 2., 2., 2., 0.])
  np.testing.assert_array_equal(select.topk_mask(x, 2, exact=False),
                                [True, False, True, True, True, False])
  np.testing.assert_array_equal(select.topk_mask(x, 2),
                                [True, False, True, False, False, False])


def test_batched_rows_are_independent_and_match_the_single_row():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, size=(3, 5000)).astype(np.float32)
  ks = jnp.array([0, 1700, 5000])
  got = select.batched_topk_masks([x], ks)[0]
  for b in range(3):
    np.testing.assert_array_equal(got[b], _reference([x[b]], int(ks[b]))[0])


def test_unrolled_and_vmapped_model_map_agree(monkeypatch):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 9000)).astype(np.float32))
  ks = jnp.array([10, 900, 4500, 8999])
  unrolled = select.batched_topk_masks([x], ks)[0]
  monkeypatch.setattr(select, '_UNROLL_MIN', 1)  # rows one by one...
  one_by_one = select.batched_topk_masks([x], ks)[0]
  np.testing.assert_array_equal(unrolled, one_by_one)
  monkeypatch.setattr(select.modelaxis, 'UNROLL_MAX', 1)  # ...and model_map's vmap
  vmapped = select.batched_topk_masks([x], ks)[0]
  np.testing.assert_array_equal(unrolled, vmapped)


# k traced: one compilation per input shape.
_TOPK = jax.jit(lambda a, k: select.topk_masks([a], k)[0])


def _check_exact(x, k):
  got = _TOPK(x, k)
  np.testing.assert_array_equal(np.asarray(got), _reference([x], k)[0])
  assert int(np.sum(got)) == k


@pytest.mark.parametrize('kind', ['random', 'bf16_ties', 'all_equal',
                                  'all_zero', 'signed_zeros'])
@pytest.mark.parametrize('n', [1, 5, 4097, 70_000])
def test_exact_k_and_ties_against_a_sort_on_edge_inputs(kind, n):
  rng = np.random.default_rng(n)
  if kind == 'random':
    x = rng.standard_normal(n).astype(np.float32)
  elif kind == 'bf16_ties':  # bf16 has 256 mantissa steps: many exact ties
    x = np.asarray(jnp.asarray(rng.standard_normal(n), jnp.bfloat16))
  elif kind == 'all_equal':
    x = np.full(n, -0.75, np.float32)
  elif kind == 'all_zero':
    x = np.zeros(n, np.float32)
  else:  # -0.0 and 0.0 have the same magnitude
    x = np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(np.float32)
  for k in sorted({0, 1, n // 3, n - 1, n} - {-1}):
    _check_exact(x, k)
  if kind == 'bf16_ties':
    # The bf16 input itself (not upcast by the caller) selects the same.
    got = jax.jit(select.topk_mask)(jnp.asarray(x, jnp.bfloat16), n // 3)
    np.testing.assert_array_equal(np.asarray(got),
                                  _reference([x], n // 3)[0])


@pytest.mark.slow
def test_exact_k_on_a_2_pow_27_tensor():
  n = 1 << 27
  x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
  k = n // 5
  mask = jax.jit(lambda a: select.topk_mask(a, k))(x)
  assert int(jnp.sum(mask)) == k
  # Everything kept is at least the largest dropped magnitude, and the ties
  # at the threshold are kept lowest index first.
  mag = jnp.abs(x.astype(jnp.float32))
  t = float(jnp.min(jnp.where(mask, mag, jnp.inf)))
  assert float(jnp.max(jnp.where(mask, -jnp.inf, mag))) <= t
  at = np.flatnonzero(np.asarray(mag == t))
  kept = np.asarray(mask)[at]
  assert kept.all() or (np.all(kept[:kept.sum()]) and not kept[kept.sum():].any())
