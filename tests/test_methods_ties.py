"""TIES-family methods: identities, NumPy pipelines, jit/vmap/recompile, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods


def _zoo(k=3, dtype=jnp.float32, seed=0, small=False):
  # Compile time grows with the number of leaves (one radix select each):
  # `small` gives one leaf for the tests that compile many chains.
  shapes = ({'head': (5, 4)} if small else
            {'enc/kernel': (6, 5), 'enc/bias': (5,), 'head': (5, 4)})
  return testing.random_models(shapes, k, seed=seed, dtype=dtype)


def _close(a, b, tol=1e-5):
  testing.assert_trees_close(a, b, rtol=tol, atol=tol)


def _np_ties(b, ms, w, rho, lam=1.0, normalize=True):
  """mergekit's generalized task arithmetic with magnitude trim and sum consensus."""
  deltas = []
  for m, r in zip(ms, rho):
    d = (m - b).ravel()
    k = d.size if r >= 1 else max(1, int(r * d.size))
    keep = np.zeros(d.size, bool)
    keep[np.argsort(-np.abs(d), kind='stable')[:k]] = True
    deltas.append(np.where(keep, d, 0).reshape(b.shape))
  u = np.stack(deltas) * np.reshape(w, (-1,) + (1,) * b.ndim)
  e = np.where(u.sum(0) >= 0, 1, -1)
  mask = np.sign(u) == e
  mixed = (u * mask).sum(0)
  div = (np.reshape(w, (-1,) + (1,) * b.ndim) * mask).sum(0)
  div[div == 0] = 1
  if normalize:
    mixed = mixed / div
  return b + lam * mixed


def test_ties_matches_numpy_mergekit_pipeline():
  base, models = _zoo()
  w, rho = [0.5, 1.0, 2.0], [0.3, 0.5, 0.9]
  for normalize in (True, False):
    out = mj.merge(M.ties(w, rho, lambda_=0.7, normalize=normalize), base, models)
    ref = jax.tree.map(lambda b, *ms: _np_ties(np.asarray(b), [np.asarray(m) for m in ms], w, rho,
                                               0.7, normalize), base, *models)
    _close(out, ref)


def test_ties_identities():
  base, models = _zoo(small=True)
  # One model, density 1, normalize: task arithmetic with weight 1.
  _close(mj.merge(M.ties(density=1.0), base, models[:1]),
         mj.merge(M.task_arithmetic(), base, models[:1]))
  # Density 1 and positive weights: the weighted disjoint mean of the raw task vectors.
  w = [1.0, 2.0, 0.5]
  ref = mj.merge(mj.chain(mj.transforms.task_vectors(), mj.transforms.elect_sign(weights=w), mj.transforms.disjoint_merge(w),
                          mj.transforms.apply_to_base()), base, models)
  _close(mj.merge(M.ties(w, 1.0), base, models), ref)
  # Per-model densities equal to one shared density.
  _close(mj.merge(M.ties(density=[0.4] * 3), base, models),
         mj.merge(M.ties(density=0.4), base, models))


def test_linear_variants_at_density_one_are_task_arithmetic():
  base, models = _zoo(small=True)
  key = jax.random.key(0)
  ta = mj.merge(M.task_arithmetic([1., 2., 3.], lambda_=0.5), base, models)
  for tx in (M.dare_linear([1., 2., 3.], 1.0, lambda_=0.5),
             M.breadcrumbs([1., 2., 3.], 1.0, lambda_=0.5),
             M.della_linear([1., 2., 3.], 1.0, lambda_=0.5)):
    _close(mj.merge(tx, base, models, key=key), ta)


def test_consensus_variants_at_density_one_are_ties():
  base, models = _zoo(small=True)
  key = jax.random.key(0)
  ref = mj.merge(M.ties(density=1.0, normalize=False), base, models)
  for tx in (M.dare_ties(density=1.0), M.breadcrumbs_ties(density=1.0),
             M.della(density=1.0, normalize=False)):
    _close(mj.merge(tx, base, models, key=key), ref)


def test_fusionbench_ties_preset_matches_numpy():
  """FusionBench: global trim to int(dK)+1 with ties, sign of sum, 0 -> majority, sum, 0.3."""
  base, models = _zoo()
  tx = M.ties(density=0.2, scope='global', count='fusionbench', exact=False, zero='majority',
              reduce='sum', lambda_=0.3)
  out = mj.merge(tx, base, models)
  flat_b = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(base)])
  tv = np.stack([np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(m)]) - flat_b
                 for m in models])
  d = tv.shape[1]
  kth = d - int(d * 0.2)
  thr = np.sort(np.abs(tv), axis=1)[:, kth - 1:kth]
  trimmed = tv * (np.abs(tv) >= thr)
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  kept = np.where(sign > 0, trimmed > 0, trimmed < 0) * trimmed
  ref_flat = flat_b + 0.3 * kept.sum(0)
  got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(out)])
  np.testing.assert_allclose(got, ref_flat, rtol=1e-5, atol=1e-6)
  assert np.count_nonzero(trimmed[0]) == int(d * 0.2) + 1


def test_magmax_and_ram_match_numpy():
  base, models = _zoo(small=True)
  b = np.asarray(base['head'])
  tv = np.stack([np.asarray(m['head']) - b for m in models])
  best = tv[0]
  for t in tv[1:]:
    best = np.where(np.abs(t) >= np.abs(best), t, best)
  np.testing.assert_allclose(mj.merge(M.magmax(), base, models)['head'], b + 0.5 * best,
                             rtol=1e-5)
  tv[0, :2] = 0.0  # create unique entries
  tv[1, 0] = 0.0
  fts = [{'w': jnp.asarray(b + t)} for t in tv]
  active = np.abs(tv) > 1e-5
  c = active.sum(0)
  ref = b + (tv * active * ((c == 1) + (c > 1) / np.maximum(c, 1))).sum(0)
  np.testing.assert_allclose(mj.merge(M.ram(), {'w': jnp.asarray(b)}, fts)['w'], ref, rtol=1e-5)


def test_named_steps_expose_diagnostics():
  base, models = _zoo()
  _, state = mj.merge(M.ties(density=0.5), base, models, return_state=True)
  assert set(state) == {'task_vectors', 'trim', 'elect', 'merge', 'scale', 'apply'}
  assert 0.0 < float(state['elect'].agreement) <= 1.0
  assert float(state['trim'].density) == 0.5


def test_jit_equals_no_jit():
  base, models = _zoo(small=True)
  for tx in (M.ties([1., 2., 1.], 0.3), M.dare_ties(density=0.5)):
    key = jax.random.key(3)
    jitted = mj.merge(tx, base, models, key=key)
    stacked = mj.stack_models(models)
    eager, _ = tx.update(stacked, tx.init(base), base, key=key)
    _close(jitted, eager)


def test_sweep_equals_loop_without_recompile():
  base, models = _zoo(small=True)
  densities = jnp.array([0.2, 0.5, 0.9])
  lams = jnp.array([0.3, 1.0, 1.5])
  run = jax.jit(jax.vmap(lambda d, l: mj.merge(M.ties(density=d, lambda_=l), base, models)))
  sweep = run(densities, lams)
  mj.merge(M.ties(density=0.1, lambda_=2.0), base, models)
  with testing.log_compilations() as log:
    for i in range(3):
      single = mj.merge(M.ties(density=float(densities[i]), lambda_=float(lams[i])), base, models)
      _close(jax.tree.map(lambda s: s[i], sweep), single)
  assert log.count('_run') == 0


def test_bf16_inputs_give_bf16_outputs():
  base, models = _zoo(dtype=jnp.bfloat16)
  out = mj.merge(M.ties(density=0.5), base, models)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  ref = mj.merge(M.ties(density=0.5), jax.tree.map(lambda x: x.astype(jnp.float32), base),
                 [jax.tree.map(lambda x: x.astype(jnp.float32), m) for m in models])
  _close(out, jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref), tol=1e-2)


def test_global_trim_restricted_by_masked():
  base, models = _zoo()
  tx = mj.chain(mj.transforms.task_vectors(), mj.masked(mj.transforms.trim(0.2, scope='global'), r'^enc/'),
                mj.transforms.disjoint_merge(), mj.transforms.apply_to_base())
  out = mj.merge(tx, base, models)
  np.testing.assert_allclose(out['head'], np.mean([m['head'] for m in models], 0), rtol=1e-5)
  kept = sum(np.count_nonzero(np.asarray(out['enc'][k] - base['enc'][k])) for k in out['enc'])
  assert kept <= 3 * int(0.2 * 35)


def test_bad_input():
  base, models = _zoo()
  with pytest.raises(ValueError, match=r'weights has shape \(2,\) but there are 3 models'):
    mj.merge(M.ties([1., 2.], 0.5), base, models)
  with pytest.raises(ValueError, match=r'density must lie in \(0.0, 1.0\]'):
    M.ties(density=1.2)
  with pytest.raises(ValueError, match=r'density must lie in \(0.0, 1.0\]'):
    M.dare_ties(density=0.0)
  with pytest.raises(ValueError, match='epsilon'):
    M.della(density=0.1, epsilon=0.15)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    mj.merge(M.della(density=0.5), base, models)
  with pytest.raises(ValueError, match='rescale must be a bool'):
    M.dare_linear(density=0.5, rescale='l2')
