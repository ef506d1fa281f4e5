"""The radix top-k select and its exact tie-break against NumPy references."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

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
