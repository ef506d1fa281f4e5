"""Tests of LoRA factor-pair merging (lora_svd, lora_lego, checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj


def _adapters(k=3, r=2, n_in=8, n_out=6, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return [{'q': mj.LoRA(f(n_in, r), f(r, n_out)), 'bias': f(n_out)} for _ in range(k)]


def _dense_sum(ads, w=None):
  w = [1.0] * len(ads) if w is None else w
  return sum(wi * np.asarray(a['q'].a, np.float64) @ np.asarray(a['q'].b, np.float64)
             for wi, a in zip(w, ads))


def test_lora_svd_exact_at_full_rank_and_optimal_below():
  ads = _adapters()
  w = [0.5, 1.0, 2.0]
  dense = _dense_sum(ads, w)
  out = mj.merge_lora(mj.methods.lora_svd(w, rank=6), ads)
  assert out['q'].a.shape == (8, 6) and out['q'].b.shape == (6, 6)
  np.testing.assert_allclose(mj.lora_delta(out)['q'], dense, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['bias'], sum(wi * np.asarray(a['bias']) for wi, a in zip(w, ads)),
                             rtol=1e-5)
  # Through mergejax.merge at the input rank: the Eckart-Young best rank-2 delta.
  out = mj.merge(mj.methods.lora_svd(w), None, ads)
  u, s, vh = np.linalg.svd(dense)
  np.testing.assert_allclose(mj.lora_delta(out)['q'], (u[:, :2] * s[:2]) @ vh[:2],
                             rtol=1e-4, atol=1e-4)


def test_lora_errors_name_the_leaf():
  ads = _adapters()
  bad = _adapters(k=1, r=3)[0]
  with pytest.raises(ValueError, match=r"LoRA leaf 'q' has rank 3 .* adapters\[0\] has rank 2"):
    mj.merge_lora(mj.methods.lora_svd(), ads + [bad])
  pair = {'q': mj.LoRA(jnp.ones((8, 2)), jnp.ones((3, 6))), 'bias': jnp.ones(6)}
  with pytest.raises(ValueError, match=r"LoRA leaf 'q': a has shape \(8, 2\) and b \(3, 6\)"):
    mj.merge_lora(mj.methods.lora_svd(), [pair])
  with pytest.raises(ValueError, match=r"rank 7 is impossible for LoRA leaf 'q'"):
    mj.merge_lora(mj.methods.lora_svd(rank=7), ads)


def test_lora_lego_recovers_a_repeated_adapter_and_clusters_units():
  ad = _adapters(k=1, r=3)[0]
  flipped = {'q': mj.LoRA(-ad['q'].a, -ad['q'].b), 'bias': ad['bias']}  # same delta
  out, st = mj.merge_lora(mj.methods.lora_lego(), [ad, flipped, ad], return_state=True)
  np.testing.assert_allclose(mj.lora_delta(out)['q'], _dense_sum([ad]), rtol=1e-4, atol=1e-4)
  ids = np.asarray(st.assignments['q']).reshape(3, 3)
  assert (ids == ids[0]).all() and len(set(ids[0])) == 3  # unit j of every copy together
  out = mj.merge_lora(mj.methods.lora_lego(rank=4, scale=2.0), _adapters())
  assert out['q'].a.shape == (8, 4) and out['q'].b.shape == (4, 6)
