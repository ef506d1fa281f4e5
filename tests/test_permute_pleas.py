"""Tests of PLeaS: size model, greedy ratios, block construction and least squares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _ridge_objective(head, feats, target, ridge):
  x = jnp.concatenate([feats, jnp.ones((feats.shape[0], 1))], 1)
  w = jnp.concatenate([head['kernel'], head['bias'][None]], 0)
  g = x.T @ x
  lam = ridge * jnp.mean(jnp.diag(g))
  return float(jnp.sum((x @ w - target) ** 2) + lam * jnp.sum(w ** 2))


def test_merged_inputs_fit_each_layer_to_what_it_reads():
  # inputs='merged' solves layer by layer on the merged network's own features:
  # on those features its head is the ridge optimum, so the head fitted on the
  # original models' features ('original', PLeaS' reference) or the averaged
  # head cannot do better there. (Both heads use the same block layout.)
  a, b = _models()
  x = jax.random.normal(KEY, (256, 5))
  ridge = 1e-3
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, x)
  yb = M.MLP((12, 10), num_outputs=3).apply({'params': b}, x)
  target = jnp.concatenate([ya, yb], 1)
  kw = dict(num_hidden=2, size=1.5, ratios=(0.25, 0.5), ridge=ridge)
  merged = permute.pleas(a, b, [x[:128], x[128:]], inputs='merged', **kw)
  orig = permute.pleas(a, b, [x], inputs='original', **kw)
  avg = permute.pleas(a, b, [x], least_squares=False, **kw)
  assert merged.widths == orig.widths == avg.widths
  p = merged.params
  feats = jax.nn.relu(jax.nn.relu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'][None])
                      @ p['Dense_1']['kernel'] + p['Dense_1']['bias'][None])
  best = _ridge_objective(p['Dense_2'], feats, target, ridge)
  for other in (orig, avg):
    assert best <= _ridge_objective(other.params['Dense_2'], feats, target, ridge) + 1e-6
  # Layer 0 reads the shared input in both modes: identical solutions.
  np.testing.assert_allclose(merged.params['Dense_0']['kernel'],
                             orig.params['Dense_0']['kernel'], rtol=1e-4, atol=1e-5)
  # End to end, the merged-input fit is closer to the endpoints here.
  err = lambda r: float(jnp.mean((_apply(r, x) - target) ** 2))
  assert err(merged) < err(orig)


def test_pleas_rejects_unknown_inputs():
  a, b = _models()
  with pytest.raises(ValueError, match='inputs'):
    permute.pleas(a, b, [jnp.ones((4, 5))], num_hidden=2, size=1.5, inputs='mixed')


def test_ridge_chosen_on_held_out_rows():
  a, b = _models()
  x = jax.random.normal(KEY, (200, 5))
  kw = dict(num_hidden=2, size=1.4)
  one = permute.pleas(a, b, [x], ridge=1e-3, **kw)
  same = permute.pleas(a, b, [x], ridge=(1e-3,), **kw)
  assert one.ridges == same.ridges == (1e-3,) * 3
  for l in range(3):
    np.testing.assert_array_equal(one.params[f'Dense_{l}']['kernel'],
                                  same.params[f'Dense_{l}']['kernel'])
  # An absurd candidate (it zeroes every weight) is never chosen.
  grid = permute.pleas(a, b, [x[:100], x[100:]], ridge=(1e6, 1e-3, 1e-6), **kw)
  assert len(grid.ridges) == 3 and 1e6 not in grid.ridges
  assert permute.pleas(a, b, [x], least_squares=False, **kw).ridges is None


def test_ridge_towards_averaged_weights():
  # A huge ridge towards the permute-then-average weights returns them.
  a, b = _models()
  x = jax.random.normal(KEY, (128, 5))
  kw = dict(num_hidden=2, size=1.4)
  avg = permute.pleas(a, b, [x], least_squares=False, **kw)
  pulled = permute.pleas(a, b, [x], ridge=1e9, ridge_to='average', **kw)
  for l in range(3):
    np.testing.assert_allclose(pulled.params[f'Dense_{l}']['kernel'],
                               avg.params[f'Dense_{l}']['kernel'], atol=1e-5)
  with pytest.raises(ValueError, match='ridge_to'):
    permute.pleas(a, b, [x], ridge_to='ones', **kw)


def test_task_tagged_batches_fit_each_head_on_its_task():
  # Batch 1 (task B) has huge inputs; untagged, they dominate A's head fit.
  a, b = _models()
  xa = jax.random.normal(KEY, (128, 5))
  xb = 30.0 * jax.random.normal(jax.random.key(9), (128, 5))
  kw = dict(num_hidden=2, size=1.2, ridge=1e-6)
  ya = M.MLP((12, 10), num_outputs=3).apply({'params': a}, xa)
  err = {}
  for tags in (None, [0, 1]):
    r = permute.pleas(a, b, [xa, xb], batch_tasks=tags, **kw)
    err[tags is None] = float(jnp.mean((_apply(r, xa)[:, :3] - ya) ** 2))
  assert err[False] < 0.5 * err[True]
  with pytest.raises(ValueError, match='batch_tasks'):
    permute.pleas(a, b, [xa, xb], batch_tasks=[0], **kw)
