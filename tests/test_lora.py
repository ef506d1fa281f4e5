"""Tests of LoRA factor-pair merging (lora_svd, lora_lego, checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj


def _adapters(k=3, r=2, n_in=8, n_out=6, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return [{'q': mj.transforms.LoRA(f(n_in, r), f(r, n_out)), 'bias': f(n_out)} for _ in range(k)]


def _dense_sum(ads, w=None):
  w = [1.0] * len(ads) if w is None else w
  return sum(wi * np.asarray(a['q'].a, np.float64) @ np.asarray(a['q'].b, np.float64)
             for wi, a in zip(w, ads))


def test_lora_svd_exact_at_full_rank_and_optimal_below():
  ads = _adapters()
  w = [0.5, 1.0, 2.0]
  dense = _dense_sum(ads, w)
  out = mj.transforms.merge_lora(mj.methods.lora_svd(w, rank=6), ads)
  assert out['q'].a.shape == (8, 6) and out['q'].b.shape == (6, 6)
  np.testing.assert_allclose(mj.transforms.lora_delta(out)['q'], dense, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['bias'], sum(wi * np.asarray(a['bias']) for wi, a in zip(w, ads)),
                             rtol=1e-5)
  # Through mergejax.merge at the input rank: the Eckart-Young best rank-2 delta.
  out = mj.merge(mj.methods.lora_svd(w), None, ads)
  u, s, vh = np.linalg.svd(dense)
  np.testing.assert_allclose(mj.transforms.lora_delta(out)['q'], (u[:, :2] * s[:2]) @ vh[:2],
                             rtol=1e-4, atol=1e-4)


def test_lora_errors_name_the_leaf():
  ads = _adapters()
  bad = _adapters(k=1, r=3)[0]
  with pytest.raises(ValueError, match=r"LoRA leaf 'q' has rank 3 .* adapters\[0\] has rank 2"):
    mj.transforms.merge_lora(mj.methods.lora_svd(), ads + [bad])
  pair = {'q': mj.transforms.LoRA(jnp.ones((8, 2)), jnp.ones((3, 6))), 'bias': jnp.ones(6)}
  with pytest.raises(ValueError, match=r"LoRA leaf 'q': a has shape \(8, 2\) and b \(3, 6\)"):
    mj.transforms.merge_lora(mj.methods.lora_svd(), [pair])
  with pytest.raises(ValueError, match=r"rank 7 is impossible for LoRA leaf 'q'"):
    mj.transforms.merge_lora(mj.methods.lora_svd(rank=7), ads)


def test_lora_lego_recovers_a_repeated_adapter_and_clusters_units():
  ad = _adapters(k=1, r=3)[0]
  flipped = {'q': mj.transforms.LoRA(-ad['q'].a, -ad['q'].b), 'bias': ad['bias']}  # same delta
  out, st = mj.transforms.merge_lora(mj.methods.lora_lego(), [ad, flipped, ad], return_state=True)
  np.testing.assert_allclose(mj.transforms.lora_delta(out)['q'], _dense_sum([ad]), rtol=1e-4, atol=1e-4)
  ids = np.asarray(st.assignments['q']).reshape(3, 3)
  assert (ids == ids[0]).all() and len(set(ids[0])) == 3  # unit j of every copy together
  out = mj.transforms.merge_lora(mj.methods.lora_lego(rank=4, scale=2.0), _adapters())
  assert out['q'].a.shape == (8, 4) and out['q'].b.shape == (4, 6)


def test_lora_from_delta_is_exact_at_full_rank_and_eckart_young_below():
  rng = np.random.default_rng(1)
  tau = {'k0': jnp.asarray(rng.standard_normal((12, 20)), jnp.float32),
         'k1': jnp.asarray(rng.standard_normal((20, 20)), jnp.float32),
         'bias': jnp.asarray(rng.standard_normal(20), jnp.float32)}
  full = mj.transforms.lora_from_delta(tau, None)
  assert full['k0'].a.shape == (12, 12) and full['k0'].b.shape == (12, 20)
  assert full['k1'].a.shape == (20, 20) and full['bias'] is tau['bias']
  dense = mj.transforms.lora_delta(full)
  for k in tau:
    np.testing.assert_allclose(dense[k], tau[k], rtol=1e-5, atol=1e-5)
  low = mj.transforms.lora_from_delta(tau, 3)
  for k in ('k0', 'k1'):
    u, s, vh = np.linalg.svd(np.asarray(tau[k], np.float64))
    np.testing.assert_allclose(mj.transforms.lora_delta(low)[k], (u[:, :3] * s[:3]) @ vh[:3],
                               rtol=1e-4, atol=1e-4)
    # The singular values are split evenly: a^T a == b b^T == diag(s_r).
    a, b = np.asarray(low[k].a), np.asarray(low[k].b)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3]), atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3]), atol=1e-4)
  # The adapters feed the LoRA merges directly.
  out = mj.transforms.merge_lora(mj.methods.lora_svd(rank=3), [low, low])
  np.testing.assert_allclose(mj.transforms.lora_delta(out)['k1'], 2 * mj.transforms.lora_delta(low)['k1'],
                             rtol=1e-4, atol=1e-4)
  bf = mj.transforms.lora_from_delta(jax.tree.map(lambda x: x.astype(jnp.bfloat16), tau), 2)
  assert bf['k0'].a.dtype == jnp.bfloat16 and bf['bias'].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"rank 13 is impossible for leaf 'k0' of shape \(12, 20\)"):
    mj.transforms.lora_from_delta(tau, 13)
  with pytest.raises(ValueError, match='positive int'):
    mj.transforms.lora_from_delta(tau, 0)
