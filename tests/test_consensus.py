"""elect_sign and disjoint_merge against NumPy references."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

SETTINGS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)


@functools.partial(jax.jit, static_argnames=('update',))
def _jit_update(update, u, state):
  return update(u, state)


def _apply(tx, tree):
  return _jit_update(tx.update, tree, tx.init(None))


def _sparse(rng, shape):
  """Small integers with many zeros and sign ties (the interesting cases)."""
  return rng.integers(-2, 3, size=shape).astype(np.float32)


def _np_elect(u, w, method, zero):
  wu = u * w.reshape((-1,) + (1,) * (u.ndim - 1))
  tot = wu.sum(0) if method == 'sum' else np.sign(wu).sum(0)
  if zero == 'plus':
    e = np.where(tot >= 0, 1.0, -1.0)
  else:
    s = np.sign(tot)
    e = np.where(s == 0, np.sign(s.sum()), s)
  keep = np.where(e > 0, wu > 0, wu < 0)
  return np.where(keep, u, 0), keep


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16), method=st.sampled_from(['sum', 'count']),
                  zero=st.sampled_from(['plus', 'majority']),
                  w=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=3, max_size=3))
def test_elect_sign_matches_numpy(seed, method, zero, w):
  u = _sparse(np.random.default_rng(seed), (3, 4, 5))
  w = np.asarray(w, np.float32)
  out, state = _apply(mj.transforms.elect_sign(method, weights=w, zero=zero), {'w': jnp.asarray(u)})
  ref, keep = _np_elect(u, w, method, zero)
  np.testing.assert_array_equal(out['w'], ref)
  nonzero = np.count_nonzero(u * w[:, None, None])
  np.testing.assert_allclose(state.agreement, keep.sum() / max(nonzero, 1), rtol=1e-6)


def test_elect_sign_mergekit_rules():
  # A zero total elects +1; zeros never agree.
  u = jnp.array([[1., -1., 0.], [-1., 1., 0.]])
  out, _ = _apply(mj.transforms.elect_sign(), {'w': u})
  np.testing.assert_array_equal(out['w'], [[1., 0., 0.], [0., 1., 0.]])
  # The election is on weighted values: weight 3 makes model 1 win.
  u = jnp.array([[2., 1.], [-1., -1.]])
  out, _ = _apply(mj.transforms.elect_sign(weights=[1., 3.]), {'w': u})
  np.testing.assert_array_equal(out['w'], [[0., 0.], [-1., -1.]])


def test_elect_sign_majority_is_global_over_leaves():
  # FusionBench: a zero total takes the sign of the sum of all elected signs.
  tree = {'a': jnp.array([[1., 1.], [-1., 1.]]), 'b': jnp.array([[1.], [1.]])}
  out, _ = _apply(mj.transforms.elect_sign(zero='majority'), tree)
  np.testing.assert_array_equal(out['a'], [[1., 1.], [0., 1.]])
  tree = {'a': jnp.array([[-1., -1.], [1., -1.]]), 'b': jnp.array([[-1.], [-1.]])}
  out, _ = _apply(mj.transforms.elect_sign(zero='majority'), tree)
  np.testing.assert_array_equal(out['a'], [[-1., -1.], [0., -1.]])


def _np_disjoint(u, w, reduce):
  wb = w.reshape((-1,) + (1,) * (u.ndim - 1))
  if reduce == 'sum':
    return (wb * u).sum(0)
  if reduce == 'mean':
    den = (wb * (u != 0)).sum(0)
    return (wb * u).sum(0) / np.where(den == 0, 1, den)
  v = wb * u
  best = v[0]
  for i in range(1, len(v)):
    best = np.where(np.abs(v[i]) >= np.abs(best), v[i], best)
  return best


@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**16), reduce=st.sampled_from(['mean', 'sum', 'max']),
                  w=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=3, max_size=3))
def test_disjoint_merge_matches_numpy(seed, reduce, w):
  u = _sparse(np.random.default_rng(seed), (3, 4, 5))
  w = np.asarray(w, np.float32)
  out, _ = _apply(mj.transforms.disjoint_merge(w, reduce=reduce), {'w': jnp.asarray(u)})
  np.testing.assert_allclose(out['w'], _np_disjoint(u, w, reduce), rtol=1e-6, atol=1e-6)


def test_max_ties_go_to_the_later_model():
  u = jnp.array([[2., -3.], [-2., 3.]])
  out, _ = _apply(mj.transforms.disjoint_merge(reduce='max'), {'w': u})
  np.testing.assert_array_equal(out['w'], [-2., 3.])


def test_bad_options_and_weight_length():
  with pytest.raises(ValueError, match='elect_sign method'):
    mj.transforms.elect_sign('vote')
  with pytest.raises(ValueError, match='disjoint_merge reduce'):
    mj.transforms.disjoint_merge(reduce='median')
  tx = mj.transforms.disjoint_merge([1., 2.])
  with pytest.raises(ValueError, match=r'weights has shape \(2,\) but there are 3 models'):
    tx.update({'w': jnp.ones((3, 2))}, tx.init(None))
