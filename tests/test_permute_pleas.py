"""Tests of PLeaS: size model, greedy ratios, block construction and least squares."""

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import permute
from mergejax.permute import models as M

KEY = jax.random.key(0)


def _models():
  m = M.MLP((12, 10), num_outputs=3)
  x = jnp.ones((1, 5))
  return m.init(jax.random.key(1), x)['params'], m.init(jax.random.key(2), x)['params']


def _apply(res, x):
  return M.MLP(res.widths, num_outputs=6).apply({'params': res.params}, x)


def test_merged_size_endpoints():
  dims = [(5, 12), (12, 10), (10, 3)]
  assert permute.merged_size(dims, [1.0, 1.0]) == 2.0
  one = 5 * 12 + 12 + 12 * 10 + 10 + 10 * 3 + 3
  np.testing.assert_allclose(permute.merged_size(dims, [0.0, 0.0]), (one + 10 * 3 + 3) / one)


def test_choose_ratios_respects_budget_and_prefers_dissimilar_units():
  dims = [(5, 12), (12, 10), (10, 3)]
  sims = [np.full(12, 0.9), np.full(10, 0.1)]  # second group badly matched
  r = permute.choose_ratios(sims, dims, 1.3)
  assert permute.merged_size(dims, r) <= 1.3 + 1e-9
  assert r[1] > r[0]
  assert permute.choose_ratios(sims, dims, 2.0) == (1.0, 1.0)


def test_full_size_is_exact_ensemble_and_ls_reproduces_it():
  a, b = _models()
  x = jax.random.normal(KEY, (64, 5))
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  for ls in (False, True):
    res = permute.pleas(a, b, [x], num_hidden=2, size=2.0, least_squares=ls, ridge=1e-9)
    assert res.widths == (24, 20)
    out = _apply(res, x)
    np.testing.assert_allclose(out[:, :3], ya, atol=1e-3)
    np.testing.assert_allclose(out[:, 3:], yb, atol=1e-3)


def test_identical_models_merge_exactly_at_size_one():
  a, _ = _models()
  b = permute.apply_permutation(permute.mlp_spec(2),
                                permute.random_permutations(permute.mlp_spec(2), a, KEY), a)
  x = jax.random.normal(KEY, (128, 5))
  res = permute.pleas(a, b, [x], num_hidden=2, size=1.0, least_squares=False)
  assert res.ratios == (0.0, 0.0)
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  np.testing.assert_allclose(_apply(res, x)[:, :3], ya, atol=1e-5)


def test_least_squares_beats_averaging_on_its_objective():
  a, b = _models()
  x = jax.random.normal(KEY, (256, 5))
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  target = jnp.concatenate([ya, yb], 1)
  errs = {}
  for ls in (False, True):
    res = permute.pleas(a, b, [x], num_hidden=2, size=1.2, least_squares=ls)
    errs[ls] = float(jnp.mean((_apply(res, x) - target) ** 2))
  assert errs[True] < errs[False]
