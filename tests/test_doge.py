"""DOGE-TA: a NumPy reference, the reference identities, layouts, sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

T = mj.transforms


def _np_doge(tvs, *, lamda, density, lr, steps, subspace):
  """FusionBench's DOGE_TA_Algorithm.run, written plainly in float64.

  ``tvs`` maps a key to its ``[K, out, in]`` task matrices. The loss is
  FusionBench's ``taskvector_loss`` literally; its gradient is taken by
  central differences (exact for a quadratic up to rounding), the optimiser
  is PyTorch's Adam, and the mask is ``topk_values_mask`` on the sorted,
  concatenated keys.

  Returns:
    ``({key: merged task vector}, {key: delta})``.
  """
  keys = sorted(tvs)
  n_tasks = next(iter(tvs.values())).shape[0]
  lams, deltas = {}, {}
  for key in keys:
    v = np.asarray(tvs[key], np.float64)
    _, m, n = v.shape
    lam = np.array([lamda / np.linalg.norm(t) for t in v])
    r = min(m, n)
    per = r // n_tasks
    sum_u = np.zeros((m, r))
    for i, t in enumerate(v):
      u, _, _ = np.linalg.svd(t, full_matrices=False)
      sum_u[:, i * per:(i + 1) * per] = u[:, :per]
    uu, _, _ = np.linalg.svd(sum_u, full_matrices=False)
    proj = uu[:, :r // subspace] @ uu[:, :r // subspace].T

    def loss(d, v=v, lam=lam):
      total = 0.0
      s = (v * lam[:, None, None]).sum(0)
      sd = (d[None] * lam[:, None, None]).sum(0)
      for vj in v:
        total += ((-vj * s - vj * sd + vj * vj).sum(axis=1) ** 2).sum()
      return total

    d = np.zeros((m, n))
    mom, vel = np.zeros_like(d), np.zeros_like(d)
    for t in range(1, steps + 1):
      g = np.zeros_like(d)
      for idx in np.ndindex(*d.shape):
        e = np.zeros_like(d)
        e[idx] = 1e-3
        g[idx] = (loss(d + e) - loss(d - e)) / 2e-3
      g = g - proj @ g
      mom = 0.9 * mom + 0.1 * g
      vel = 0.999 * vel + 0.001 * g * g
      d = d - lr * (mom / (1 - 0.9 ** t)) / (
          np.sqrt(vel / (1 - 0.999 ** t)) + 1e-8)
    lams[key], deltas[key] = lam, d

  merged = {k: np.zeros(tvs[k].shape[1:]) for k in keys}
  for i in range(n_tasks):
    flat = np.concatenate([np.asarray(tvs[k][i], np.float64).ravel()
                           for k in keys])
    dd = flat.size
    kth = np.sort(np.abs(flat))[dd - int(dd * density) - 1]
    mask = np.abs(flat) >= kth
    start = 0
    for k in keys:
      size = tvs[k][i].size
      mi = mask[start:start + size].reshape(tvs[k].shape[1:])
      merged[k] += lams[k][i] * (tvs[k][i] + deltas[k]) * mi
      start += size
  return merged, deltas


def _tvs(k=3, shape=(8, 6), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(k,) + shape), jnp.float32)


def _merge(tvs, base=None, **kw):
  """DOGE-TA of ``(out, in)`` matrices ``[K, m, n]`` through the public merge."""
  base = jnp.zeros(tvs.shape[1:]) if base is None else base
  models = [{'x': {'weight': base + t}} for t in tvs]
  return mj.merge(mj.methods.doge_ta(**kw), {'x': {'weight': base}},
                  models)['x']['weight']


def test_matches_a_numpy_reference_of_the_whole_algorithm():
  rng = np.random.default_rng(0)
  k = 3
  w = rng.normal(size=(k, 8, 6)).astype(np.float32)    # 'a.weight': (out, in)
  ker = rng.normal(size=(k, 5, 7)).astype(np.float32)  # 'b/kernel': (in, out)
  bias = rng.normal(size=(k, 8)).astype(np.float32)
  kw = dict(lamda=0.5, density=0.3, lr=1e-2, steps=8, subspace=2)
  want, deltas = _np_doge({'a.weight': w, 'b/kernel': np.swapaxes(ker, 1, 2)},
                          **kw)
  # A zero base makes the task vectors the models themselves, bit for bit.
  base = {'a.weight': jnp.zeros((8, 6)), 'a.bias': jnp.zeros(8),
          'b': {'kernel': jnp.zeros((5, 7))}}
  models = [{'a.weight': jnp.asarray(w[i]), 'a.bias': jnp.asarray(bias[i]),
             'b': {'kernel': jnp.asarray(ker[i])}} for i in range(k)]
  tx = mj.methods.doge_ta(kw['lamda'], density=kw['density'],
                          learning_rate=kw['lr'], steps=kw['steps'],
                          subspace=kw['subspace'])
  out = mj.merge(tx, base, models)
  testing.assert_trees_close(out['a.weight'], want['a.weight'], rtol=1e-4,
                             atol=1e-5)
  testing.assert_trees_close(out['b']['kernel'], want['b/kernel'].T,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out['a.bias'], 0.0)  # FusionBench: theta_0
  delta, _, _ = T.doge_delta(jnp.asarray(w), lamda=0.5, learning_rate=1e-2,
                             steps=8, subspace=2)
  assert float(jnp.max(jnp.abs(delta))) > 1e-2  # the correction is material
  testing.assert_trees_close(delta, deltas['a.weight'], rtol=1e-4, atol=1e-5)


def test_identical_tasks_with_unit_lambda_sum_keep_delta_zero():
  # Entries +-1..24 over 8: ||tau||_F = 70 / 8 exactly (1^2 + ... + 24^2 =
  # 70^2), so lamda = ||tau|| / 2 gives lam_i = 1/2 and sum_i lam_i = 1 with
  # no rounding; the loss and its gradient are then exactly 0 at delta = 0.
  rng = np.random.default_rng(1)
  vals = rng.permutation(np.arange(1, 25)) * rng.choice([-1.0, 1.0], 24)
  tau = jnp.asarray((vals / 8).reshape(4, 6), jnp.float32)
  base = jnp.asarray(rng.integers(-8, 8, size=(4, 6)) / 4, jnp.float32)
  lamda = 70 / 8 / 2
  tvs = jnp.stack([tau, tau])
  delta, lam, _ = T.doge_delta(tvs, lamda=jnp.float32(lamda),
                               learning_rate=jnp.float32(1e-4), steps=400,
                               subspace=6)
  np.testing.assert_array_equal(lam, [0.5, 0.5])
  np.testing.assert_array_equal(delta, 0.0)
  out = _merge(tvs, base, lamda=lamda)  # the defaults: K = 30 %, 400 steps
  keep = np.abs(vals.reshape(4, 6)) >= 17  # int(24 * 0.3) + 1 = 8 largest
  np.testing.assert_array_equal(out, base + jnp.where(keep, tau, 0.0))


def test_update_projection_keeps_delta_orthogonal_to_the_shared_subspace():
  tvs = _tvs(3, (12, 8), seed=2)
  kw = dict(lamda=jnp.float32(0.5), learning_rate=jnp.float32(1e-2), steps=50,
            subspace=2)
  delta, _, basis = T.doge_delta(tvs, projection='update', **kw)
  assert basis.shape == (12, 4)  # min(12, 8) // 2
  testing.assert_trees_close(basis.T @ basis, jnp.eye(4), atol=1e-5)
  scale = float(jnp.max(jnp.abs(delta)))
  assert scale > 0.1
  assert float(jnp.max(jnp.abs(basis.T @ delta))) < 1e-6 * max(scale, 1.0)
  # FusionBench projects only the gradient: Adam's per-entry scaling of the
  # update then moves delta into the subspace.
  drift, _, _ = T.doge_delta(tvs, projection='gradient', **kw)
  assert float(jnp.max(jnp.abs(basis.T @ drift))) > 1e-2


def test_full_density_keeps_every_entry():
  tvs = _tvs(3, (8, 6), seed=3)
  kw = dict(lamda=0.3, learning_rate=1e-2, steps=10, subspace=2)
  delta, lam, _ = T.doge_delta(tvs, **kw)
  want = jnp.einsum('k,kmn->mn', lam, tvs + delta[None])
  testing.assert_trees_close(_merge(tvs, density=1.0, **kw), want, rtol=1e-5,
                             atol=1e-6)


def test_entries_tied_with_the_threshold_are_kept():
  # int(4 * 0.25) + 1 = 2 entries, and the other 3 is tied with the second
  # (FusionBench keeps every |tau| >= the threshold).
  tau = jnp.array([[4., 3.], [3., 1.]])
  out = _merge(tau[None], lamda=float(jnp.linalg.norm(tau)), density=0.25,
               steps=0)
  testing.assert_trees_close(out, [[4., 3.], [3., 0.]])


def test_jit_and_no_jit_agree():
  tvs = {'x': {'kernel': _tvs(2, (6, 5), seed=4)}, 'b': _tvs(2, (5,), seed=5)}
  tx = T.doge_reduce(lamda=0.5, learning_rate=1e-2, steps=5, subspace=2,
                     other='mean')
  eager, _ = tx.update(tvs, tx.init(None))
  jitted, _ = jax.jit(tx.update)(tvs, tx.init(None))
  testing.assert_trees_close(eager, jitted, rtol=1e-5, atol=1e-6)
  testing.assert_trees_close(eager['b'], jnp.mean(tvs['b'], axis=0))


def test_lamda_learning_rate_density_sweep_in_one_compile():
  tvs = _tvs(3, (6, 5), seed=6)
  base = {'x': {'weight': jnp.zeros((6, 5))}}
  models = [{'x': {'weight': t}} for t in tvs]
  run = lambda lam, lr, rho: mj.merge(
      mj.methods.doge_ta(lam, learning_rate=lr, density=rho, steps=20,
                         subspace=2), base, models)
  with testing.log_compilations() as log:
    a = run(0.07, 1e-3, 0.3)
    b = run(0.5, 1e-2, 0.6)
  assert log.count('_run') == 1
  swept = jax.vmap(run)(jnp.array([0.07, 0.5]), jnp.array([1e-3, 1e-2]),
                        jnp.array([0.3, 0.6]))['x']['weight']
  testing.assert_trees_close(swept[0], a['x']['weight'], rtol=1e-5, atol=1e-6)
  testing.assert_trees_close(swept[1], b['x']['weight'], rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match='density'):
    jax.block_until_ready(jax.jit(run)(0.1, 1e-3, jnp.float32(1.5)))


def test_layouts_and_leaf_selection():
  tvs = _tvs(2, (7, 4), seed=7)
  kw = dict(lamda=0.4, learning_rate=1e-2, steps=10, subspace=2)
  torch_style = _merge(tvs, **kw)  # '...weight': (out, in)
  base = {'x': {'kernel': jnp.zeros((4, 7))}, 'y': {'kernel': jnp.ones((4, 7))}}
  models = [{'x': {'kernel': t.T}, 'y': {'kernel': 1.0 + t.T}} for t in tvs]
  out = mj.merge(mj.methods.doge_ta(exclude='y', **kw), base, models)
  testing.assert_trees_close(out['x']['kernel'], torch_style.T, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(out['y']['kernel'], 1.0)  # excluded: the base
  only = mj.merge(mj.methods.doge_ta(include='^x/', other='mean', **kw), base,
                  models)
  testing.assert_trees_close(only['y']['kernel'], 1.0 + jnp.mean(tvs, 0).T)
  wrong = mj.merge(mj.methods.doge_ta(layout='out_in', exclude='y', **kw),
                   base, models)
  assert float(jnp.max(jnp.abs(wrong['x']['kernel'] - out['x']['kernel']))) > 1e-4


def test_zero_task_vector_contributes_nothing():
  tvs = jnp.concatenate([_tvs(2, (6, 5), seed=8), jnp.zeros((1, 6, 5))])
  delta, lam, basis = T.doge_delta(tvs, lamda=jnp.float32(0.3),
                                   learning_rate=jnp.float32(1e-2), steps=10,
                                   subspace=1)
  assert float(lam[2]) == 0.0
  assert bool(jnp.all(jnp.isfinite(delta)))
  # Each task gives 5 // 3 = 1 direction to U_cat; the zero task's would be
  # arbitrary and is dropped from the min(5 // 1, 3) = 3 requested.
  np.testing.assert_allclose(jnp.linalg.norm(basis, axis=0), [1, 1, 0],
                             atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(_merge(tvs, steps=10))))


@pytest.mark.parametrize('kwargs, match', [
    (dict(steps=-1), 'steps'), (dict(steps=1.5), 'steps'),
    (dict(subspace=0), 'subspace'), (dict(subspace=True), 'subspace'),
    (dict(projection='both'), 'projection'), (dict(layout='rows'), 'layout'),
    (dict(other='median'), 'other'), (dict(density=0.0), 'density'),
    (dict(density=1.5), 'density'), (dict(lamda=-0.1), 'lamda'),
    (dict(learning_rate=float('nan')), 'learning_rate')])
def test_invalid_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.methods.doge_ta(**kwargs)


def test_bf16_inputs_keep_their_dtype():
  tvs = _tvs(2, (6, 4), seed=9).astype(jnp.bfloat16)
  kw = dict(lamda=0.3, learning_rate=1e-2, steps=10, subspace=2)
  out = _merge(tvs, jnp.zeros((6, 4), jnp.bfloat16), **kw)
  assert out.dtype == jnp.bfloat16
  want = _merge(tvs.astype(jnp.float32), **kw)
  testing.assert_trees_close(out.astype(jnp.float32), want, rtol=2e-2,
                             atol=2e-2)
