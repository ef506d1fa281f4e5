"""Evo-Merging: the coefficient transform against numpy, and the search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

S = mj.search


def _plain(raw, scale, keep, negative):
  raw = np.asarray(raw, np.float64)
  out = np.zeros_like(raw)
  for k, part, sign, s in ((keep, np.maximum(raw, 0), 1, scale[0]),
                           (negative, np.maximum(-raw, 0), -1, scale[1])):
    if not k:
      continue
    idx = np.argsort(-part, kind='stable')[:k]
    kept = np.zeros_like(raw)
    kept[idx] = part[idx]
    if kept.sum() > 0:
      out += sign * s * kept / kept.sum()
  return out


@pytest.mark.parametrize('keep,negative', [(1, 0), (3, 2), (8, 8), (0, 3)])
def test_coefficients_are_the_plain_denoise_and_scale(keep, negative):
  rng = np.random.default_rng(keep * 10 + negative)
  for _ in range(5):
    raw = rng.normal(size=8).astype(np.float32)
    raw[2] = raw[5]  # a tie
    scale = rng.uniform(size=2).astype(np.float32)
    got = S.evo_coefficients({'raw': jnp.asarray(raw),
                              'scale': jnp.asarray(scale)},
                             keep=keep, negative=negative)
    np.testing.assert_allclose(got, _plain(raw, scale, keep, negative),
                               rtol=1e-5, atol=1e-6)
    assert int(jnp.sum(got > 0)) <= keep and int(jnp.sum(got < 0)) <= negative
  # Jit and vmap over candidates agree with the single call.
  pop = {'raw': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
         'scale': jnp.ones((4, 2))}
  f = jax.jit(jax.vmap(lambda c: S.evo_coefficients(c, keep=keep,
                                                     negative=negative)))
  for i in range(4):
    np.testing.assert_allclose(
        f(pop)[i], _plain(pop['raw'][i], [1, 1], keep, negative), rtol=1e-5,
        atol=1e-6)


def test_the_search_ignores_irrelevant_models():
  # A repository of 12 task vectors: 3 useful, 9 noise; the metric is how
  # close the merge gets to the sum of the useful ones at 0.4 each.
  rng = np.random.default_rng(0)
  useful = jnp.asarray(rng.normal(size=(3, 20)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(9, 20)), jnp.float32)
  taus = jnp.concatenate([useful, noise])
  target = 0.4 * useful.sum(axis=0)
  metric = lambda c: -jnp.sum((c @ taus - target) ** 2)
  c, r = S.evo_merging(metric, 12, jax.random.key(0), keep=3,
                       generations=80, scale=(1.0, 0.0), progress=False)
  assert set(np.flatnonzero(np.asarray(c))) == {0, 1, 2}
  np.testing.assert_allclose(c[:3], 0.4, atol=0.05)
  assert r.evaluations == 80 * 16
  # Deterministic under the key.
  c2, _ = S.evo_merging(metric, 12, jax.random.key(0), keep=3,
                        generations=80, scale=(1.0, 0.0), progress=False)
  np.testing.assert_array_equal(c, c2)


def test_bad_settings_raise():
  with pytest.raises(ValueError, match='keep must be an int in'):
    S.evo_coefficients({'raw': jnp.zeros(3), 'scale': jnp.ones(2)}, keep=4)
  with pytest.raises(ValueError, match=r'scale \[2\]'):
    S.evo_coefficients({'raw': jnp.zeros(3), 'scale': jnp.ones(3)}, keep=1)
  with pytest.raises(ValueError, match='negative'):
    S.evo_merging(lambda c: c.sum(), 3, jax.random.key(0), keep=1,
                  negative=-1)
