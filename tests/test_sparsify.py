"""Sparsifiers (trim, dare, breadcrumbs, della) against NumPy references."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.transforms import _select as select
from mergejax.transforms import _sparsify as sparsify

SETTINGS = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
SHAPES = [(4, 6), (3, 2, 5)]


def _distinct(rng, k, shape):
  """Values with distinct magnitudes (so the top-k is unambiguous)."""
  n = int(np.prod(shape))
  mags = rng.permutation(n * k)[: n * k].astype(np.float32) + 1.0
  signs = rng.choice([-1.0, 1.0], size=n * k).astype(np.float32)
  return (mags * signs / (n * k)).reshape((k,) + shape)


@functools.partial(jax.jit, static_argnames=('update',))
def _jit_update(update, u, state, key):
  return update(u, state, key=key)[0]


def _run(tx, u, state, key=None):
  # Jit on `update` (hashable, equal across factory calls with the same static
  # config) so that new hyperparameter values re-use the compiled function.
  return _jit_update(tx.update, u, state, key)


def _apply(tx, tree, key=None):
  return _run(tx, tree, tx.init(None), key)


def _np_topk(x, k):
  flat = np.abs(x).reshape(-1)
  order = np.argsort(-flat, kind='stable')
  m = np.zeros(flat.size, bool)
  m[order[:k]] = True
  return m.reshape(x.shape)


def _np_mergekit_k(rho, n):
  if rho >= 1:
    return n
  return max(1, int(rho * n))


@SETTINGS
@hypothesis.given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
                  rho=st.lists(st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]),
                               min_size=2, max_size=2))
def test_trim_tensor_matches_numpy(shape, seed, rho):
  u = _distinct(np.random.default_rng(seed), 2, shape)
  out = np.asarray(_apply(mj.transforms.trim(rho), {'w': jnp.asarray(u)})['w'])
  for i in range(2):
    ref = np.where(_np_topk(u[i], _np_mergekit_k(rho[i], u[i].size)), u[i], 0)
    np.testing.assert_array_equal(out[i], ref)


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16),
                  rho=st.sampled_from([0.05, 0.2, 0.5, 0.9]),
                  count=st.sampled_from(['mergekit', 'fusionbench']))
def test_trim_global_matches_numpy(seed, rho, count):
  rng = np.random.default_rng(seed)
  a, b = _distinct(rng, 3, (4, 6)), _distinct(rng, 3, (5,))
  out = _apply(mj.transforms.trim(rho, scope='global', count=count),
               {'a': jnp.asarray(a), 'b': jnp.asarray(b)})
  for i in range(3):
    flat = np.concatenate([a[i].ravel(), b[i].ravel()])
    n = flat.size
    k = _np_mergekit_k(rho, n) if count == 'mergekit' else min(n, int(rho * n) + 1)
    ref = np.where(_np_topk(flat, k), flat, 0)
    got = np.concatenate([np.asarray(out['a'][i]).ravel(), np.asarray(out['b'][i]).ravel()])
    np.testing.assert_array_equal(got, ref)


def test_trim_fusionbench_count_keeps_int_dk_plus_one_and_ties():
  # FusionBench: threshold = kthvalue(|x|, n - int(n K)); keep |x| >= threshold.
  x = np.array([[1., 2., 3., 4., 5., 6., 7., 8., 9., 10.]], np.float32)
  out = np.asarray(_apply(mj.transforms.trim(0.2, count='fusionbench', exact=False), {'w': jnp.asarray(x)})['w'])
  assert np.count_nonzero(out) == 3  # int(10 * 0.2) + 1
  x = np.array([[1., 2., 3., 4., 5., 6., 7., 8., 8., 8.]], np.float32)
  out = np.asarray(_apply(mj.transforms.trim(0.1, count='fusionbench', exact=False), {'w': jnp.asarray(x)})['w'])
  np.testing.assert_array_equal(out, np.where(x >= 8, x, 0))  # all ties kept


def test_trim_exact_breaks_ties_by_index_and_non_exact_keeps_ties():
  x = jnp.array([[1., -2., 2., 2., 0.5]])
  np.testing.assert_array_equal(_apply(mj.transforms.trim(0.4), {'w': x})['w'], [[0., -2., 2., 0., 0.]])
  np.testing.assert_array_equal(_apply(mj.transforms.trim(0.4, exact=False), {'w': x})['w'],
                                [[0., -2., 2., 2., 0.]])
  # Global ties go to the earlier leaf (leaves in tree order), then lower index.
  m = jax.jit(select.topk_masks)([jnp.array([1., 3.]), jnp.array([3., 3.])], 2)
  np.testing.assert_array_equal(np.concatenate([np.asarray(v) for v in m]), [0, 1, 1, 0])


def test_trim_edges_density_one_and_tiny_density():
  x = jnp.asarray(_distinct(np.random.default_rng(0), 1, (10,)))
  np.testing.assert_array_equal(_apply(mj.transforms.trim(1.0), {'w': x})['w'], x)
  # mergekit keeps at least one entry: k = max(1, int(0.01 * 10)) = 1.
  assert int(jnp.count_nonzero(_apply(mj.transforms.trim(0.01), {'w': x})['w'])) == 1
  # Decimal densities count exactly despite float32: int(0.7 * 10) == 7.
  assert int(sparsify.keep_count(jnp.float32(0.7), 10)) == 7
  assert int(sparsify.keep_count(jnp.float32(0.3), 1000)) == 300


def test_trim_rescale_l1_preserves_norm():
  x = jnp.asarray(_distinct(np.random.default_rng(1), 2, (4, 6)))
  out = _apply(mj.transforms.trim(0.3, rescale='l1'), {'w': x})['w']
  np.testing.assert_allclose(jnp.abs(out).sum((1, 2)), jnp.abs(x).sum((1, 2)), rtol=1e-5)
  assert int(jnp.count_nonzero(out[0])) == 7


@pytest.mark.parametrize('bad', [0.0, -0.1, 1.5, float('nan'), [0.5, 1.2]])
def test_density_outside_range_is_an_error(bad):
  for factory in (mj.transforms.trim, mj.transforms.dare, mj.transforms.breadcrumbs_prune):
    with pytest.raises(ValueError, match=r'density must lie in \(0.0, 1.0\]'):
      factory(bad)


def test_bad_options_are_errors():
  with pytest.raises(ValueError, match='trim scope'):
    mj.transforms.trim(0.5, scope='layer')
  with pytest.raises(ValueError, match='dare rescale'):
    mj.transforms.dare(0.5, rescale='l2')
  with pytest.raises(ValueError, match='gamma'):
    mj.transforms.breadcrumbs_prune(0.5, gamma=1.0)


def test_per_model_density_wrong_length_is_an_error():
  tx = mj.transforms.trim([0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match=r'density has shape \(3,\) but there are 2 models'):
    tx.update({'w': jnp.ones((2, 4))}, tx.init(None))


# ---------------------------------------------------------------- DARE


def test_dare_without_key_is_a_clear_error():
  tx = mj.transforms.dare(0.5)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    tx.update({'w': jnp.ones((2, 4))}, tx.init(None))
  base = {'w': jnp.zeros(4)}
  with pytest.raises(ValueError, match='needs a PRNG key'):
    mj.merge(mj.methods.dare_ties(density=0.5), base, [{'w': jnp.ones(4)}])


def test_dare_l1_is_exact_and_kept_fraction_matches_density():
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((3, 64, 64)), jnp.float32)
  tx = mj.transforms.dare([0.2, 0.5, 0.9], rescale='l1')
  out = _apply(tx, {'w': u}, jax.random.key(1))['w']
  np.testing.assert_allclose(jnp.abs(out).sum((1, 2)), jnp.abs(u).sum((1, 2)), rtol=1e-5)
  frac = np.asarray(jnp.mean(out != 0, axis=(1, 2)))
  np.testing.assert_allclose(frac, [0.2, 0.5, 0.9], atol=0.02)  # 4096 draws: sd < 0.008
  # Kept entries are scaled copies; dropped ones are zero.
  ratio = np.asarray(out / u)
  for i in range(3):
    r = ratio[i][np.asarray(out[i]) != 0]
    np.testing.assert_allclose(r, r[0], rtol=1e-5)


def test_dare_inverse_density_is_unbiased():
  u = jnp.asarray(np.random.default_rng(0).standard_normal((1, 512)), jnp.float32)
  tx = mj.transforms.dare(0.25, rescale='inverse_density')
  state = tx.init(None)
  draws = jax.vmap(lambda k: _run(tx, {'w': u}, state, k)['w'])(
      jax.random.split(jax.random.key(0), 400))
  kept = np.asarray(draws)[np.asarray(draws) != 0]
  np.testing.assert_allclose(np.abs(kept).min() * 0.25, np.abs(np.asarray(u)).min(), rtol=1e-5)
  mean = np.asarray(draws.mean(0))
  # sd of the mean of 400 draws: |u| * sqrt(3) / 20 ~ 0.09 |u|; check the L2 error overall.
  assert np.linalg.norm(mean - np.asarray(u)) < 0.15 * np.linalg.norm(np.asarray(u))


def test_dare_density_one_keeps_everything_and_keys_differ_per_model():
  u = jnp.ones((2, 100))
  np.testing.assert_array_equal(_apply(mj.transforms.dare(1.0), {'w': u}, jax.random.key(0))['w'], u)
  out = _apply(mj.transforms.dare(0.5, rescale=None), {'w': u}, jax.random.key(0))['w']
  assert not np.array_equal(out[0], out[1])


def test_apply_mask_matches_mergekit_rescale_formula():
  rng = np.random.default_rng(3)
  d = rng.standard_normal((2, 5, 4)).astype(np.float32)
  m = rng.random((2, 5, 4)) < 0.4
  out = np.asarray(sparsify.apply_mask(jnp.asarray(d), jnp.asarray(m), 0.4, 'l1'))
  for i in range(2):
    kept = d[i] * m[i]
    np.testing.assert_allclose(out[i], kept * np.abs(d[i]).sum() / np.abs(kept).sum(), rtol=1e-5)
  # Nothing kept: no rescale (mergekit skips norms below 1e-7).
  z = sparsify.apply_mask(jnp.asarray(d), jnp.zeros(d.shape, bool), 0.4, 'l1')
  assert not np.any(np.asarray(z))


# ---------------------------------------------------------------- breadcrumbs


def _np_breadcrumbs(x, rho, gamma):
  """mergekit 0.1.5 `magnitude_outliers` in NumPy."""
  if rho >= 1:
    return x
  n = x.size
  target, n_top = int(rho * n), int(gamma * n)
  n_bot = max(0, n - target - n_top)
  order = np.argsort(np.abs(x).ravel(), kind='stable')
  m = np.zeros(n, bool)
  m[order[n_bot:n_bot + target]] = True
  return np.where(m.reshape(x.shape), x, 0)


@SETTINGS
@hypothesis.given(shape=st.sampled_from([(4, 6), (20, 10)]), seed=st.integers(0, 2**16),
                  rho=st.sampled_from([0.1, 0.3, 0.5, 0.9, 0.99, 1.0]),
                  gamma=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5]))
def test_breadcrumbs_matches_mergekit_numpy(shape, seed, rho, gamma):
  u = _distinct(np.random.default_rng(seed), 2, shape)
  out = np.asarray(_apply(mj.transforms.breadcrumbs_prune(rho, gamma), {'w': jnp.asarray(u)})['w'])
  for i in range(2):
    np.testing.assert_array_equal(out[i], _np_breadcrumbs(u[i], rho, gamma))


def test_breadcrumbs_gamma_zero_and_tiny_tensors_keep_target():
  # mergekit <= 0.1.4 zeroed these tensors (empty slice order[n_bot:-0]).
  u = jnp.asarray(_distinct(np.random.default_rng(0), 1, (50,)))
  for gamma in (0.0, 0.01):  # 0.01 * 50 < 1: n_top = 0
    out = _apply(mj.transforms.breadcrumbs_prune(0.4, gamma), {'w': u})['w']
    np.testing.assert_array_equal(out, _apply(mj.transforms.trim(0.4), {'w': u})['w'])
  out = _apply(mj.transforms.breadcrumbs_prune(0.4, 0.1), {'w': u})['w']
  assert int(jnp.count_nonzero(out)) == 20
  assert float(jnp.abs(out).max()) < float(jnp.sort(jnp.abs(u[0]))[-5])  # top 5 dropped
  # target = int(0.01 * 50) = 0 keeps nothing (no max(1, .) here, unlike trim).
  assert not np.any(np.asarray(_apply(mj.transforms.breadcrumbs_prune(0.01, 0.0), {'w': u})['w']))


# ---------------------------------------------------------------- DELLA


_della_probs = jax.jit(sparsify.della_probs, static_argnums=3)


def test_della_probs_match_mergekit_ranks_both_layouts():
  rng = np.random.default_rng(0)
  w_torch = _distinct(rng, 1, (3, 8))[0]  # (out, in)
  p = np.asarray(_della_probs(jnp.asarray(w_torch), 0.5, 0.2, 1))
  ranks = np.argsort(np.argsort(np.abs(w_torch), axis=1), axis=1)
  np.testing.assert_allclose(p, 0.3 + 0.4 * ranks / 7, rtol=1e-6)
  # The same weights in Flax layout (in, out) with axis=-2 give the same probabilities.
  p_flax = np.asarray(_della_probs(jnp.asarray(w_torch.T), 0.5, 0.2, -2))
  np.testing.assert_allclose(p_flax, p.T, rtol=1e-6)
  # 1-D leaves and rows of length 1 are guarded (no 0/0).
  np.testing.assert_allclose(_della_probs(jnp.ones((4, 1)), 0.5, 0.2, 1), 0.3)
  v = np.asarray(_della_probs(jnp.asarray([3., 1., 2.]), 0.5, 0.2, 1))
  np.testing.assert_allclose(v, [0.7, 0.3, 0.5], rtol=1e-6)


def test_della_statistics_and_rescale():
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.standard_normal((2, 128, 64)), jnp.float32)
  out = _apply(mj.transforms.della_prune(0.5, 0.3, rescale=None), {'w': u}, jax.random.key(0))['w']
  kept = np.asarray(out != 0)
  ranks = np.argsort(np.argsort(np.abs(np.asarray(u)), axis=2), axis=2)
  # p = 0.2 + 0.6 rank / 63: mean 0.224 over the 6 smallest ranks, 0.776 over the 6
  # largest (1536 draws each: sd 0.011).
  assert abs(kept[ranks < 6].mean() - 0.224) < 0.04
  assert abs(kept[ranks >= 58].mean() - 0.776) < 0.04
  out = _apply(mj.transforms.della_prune(0.5, 0.3), {'w': u}, jax.random.key(0))['w']
  np.testing.assert_allclose(jnp.abs(out).sum((1, 2)), jnp.abs(u).sum((1, 2)), rtol=1e-5)
  out = _apply(mj.transforms.della_prune(0.5, 0.3, rescale='inverse_prob'), {'w': u}, jax.random.key(0))['w']
  p = np.asarray(jax.jit(jax.vmap(lambda x: sparsify.della_probs(x, 0.5, 0.3, 1)))(u))
  nz = np.asarray(out) != 0
  np.testing.assert_allclose(np.asarray(out)[nz] * p[nz], np.asarray(u)[nz], rtol=1e-5)


@pytest.mark.parametrize('density, epsilon', [(0.5, 0.5), (0.2, 0.2), (0.9, 0.1), (0.5, 0.6)])
def test_della_epsilon_validation(density, epsilon):
  with pytest.raises(ValueError, match='epsilon'):
    mj.transforms.della_prune(density, epsilon)


def test_della_density_one_is_unchanged_whatever_epsilon():
  u = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
  np.testing.assert_array_equal(
      _apply(mj.transforms.della_prune(1.0, 0.15), {'w': u}, jax.random.key(0))['w'], u)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    _apply(mj.transforms.della_prune(0.5, 0.1), {'w': u})
