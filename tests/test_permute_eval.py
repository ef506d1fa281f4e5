"""Tests of barriers, activation matching, REPAIR and BatchNorm reset."""

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import permute
from mergejax.permute import models as M

KEY = jax.random.key(0)


def _mlp():
  m = M.MLP((24, 16))
  return m, m.init(KEY, jnp.ones((1, 6)))['params']


def _hidden(params, x):
  h0 = jax.nn.relu(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'][None])
  h1 = jax.nn.relu(h0 @ params['Dense_1']['kernel'] + params['Dense_1']['bias'][None])
  return {'P_0': h0, 'P_1': h1}


def _preact(params, x):
  z0 = x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'][None]
  z1 = jax.nn.relu(z0) @ params['Dense_1']['kernel'] + params['Dense_1']['bias'][None]
  return {'Dense_0': z0, 'Dense_1': z1}


def test_barrier_vmapped_equals_loop_and_definitions():
  m, a = _mlp()
  b = m.init(jax.random.key(1), jnp.ones((1, 6)))['params']
  x = jax.random.normal(KEY, (32, 6))
  loss = lambda p: jnp.mean(m.apply({'params': p}, x) ** 2)
  r = permute.interpolation_barrier(loss, a, b, num=5)
  loop = np.array([loss(permute.lerp_params(a, b, l)) for l in np.linspace(0, 1, 5)])
  np.testing.assert_allclose(r.curve, loop, rtol=1e-5)
  np.testing.assert_allclose(r.barrier, loop.max() - (loop[0] + loop[-1]) / 2, rtol=1e-5)
  chord = permute.interpolation_barrier(loss, a, b, num=5, relative_to='chord').barrier
  lams = np.linspace(0, 1, 5)
  np.testing.assert_allclose(chord, np.max(loop - ((1 - lams) * loop[0] + lams * loop[-1])),
                             rtol=1e-5, atol=1e-7)


def test_activation_matching_recovers_planted_permutation():
  spec = permute.mlp_spec(2)
  _, a = _mlp()
  planted = permute.random_permutations(spec, a, jax.random.key(4))
  b = permute.apply_permutation(spec, planted, a)
  batches = [jax.random.normal(jax.random.key(i), (64, 6)) for i in range(3)]
  perms, costs = permute.activation_matching(_hidden, a, b, batches, return_costs=True)
  back = permute.apply_permutation(spec, perms, b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), back, a)
  assert costs['P_0'].shape == (24, 24)


def test_repair_restores_unit_statistics():
  m, a = _mlp()
  b = m.init(jax.random.key(1), jnp.ones((1, 6)))['params']
  batches = [jax.random.normal(jax.random.key(i), (128, 6)) for i in range(2)]
  mid = permute.lerp_params(a, b, 0.5)
  fixed = permute.repair(_preact, mid, [a, b], batches, layers=['Dense_0', 'Dense_1'])
  for layer in ['Dense_0', 'Dense_1']:
    za = np.concatenate([_preact(a, x)[layer] for x in batches])
    zb = np.concatenate([_preact(b, x)[layer] for x in batches])
    zf = np.concatenate([_preact(fixed, x)[layer] for x in batches])
    np.testing.assert_allclose(zf.std(0), (za.std(0) + zb.std(0)) / 2, rtol=1e-3)
    np.testing.assert_allclose(zf.mean(0), (za.mean(0) + zb.mean(0)) / 2, atol=1e-3)


def test_reset_batch_stats_is_exact_average():
  m = M.CNN(features=(4,), dense=(), norm='batch')
  x = jax.random.normal(KEY, (8, 6, 6, 3))
  v = m.init(KEY, x)
  v = dict(v, batch_stats=jax.tree.map(lambda s: s + 3.0, v['batch_stats']))
  batches = [x[:4], x[4:]]
  out = permute.reset_batch_stats(
      lambda v, x: m.apply(v, x, train=True, mutable=['batch_stats']), v, batches)
  z = jax.lax.conv_general_dilated(
      x, v['params']['Conv_0']['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + v['params']['Conv_0']['bias'][None, None, None]
  np.testing.assert_allclose(out['batch_stats']['Norm_0']['mean'], z.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['batch_stats']['Norm_0']['var'], z.var((0, 1, 2)),
                             rtol=1e-3, atol=1e-5)


def test_ste_matching_returns_valid_permutations_no_worse_than_naive():
  import optax
  spec = permute.mlp_spec(2)
  m, a = _mlp()
  b = m.init(jax.random.key(1), jnp.ones((1, 6)))['params']
  x = jax.random.normal(KEY, (64, 6))
  y = jnp.argmax(m.apply({'params': a}, x), -1)  # A's own labels
  loss = lambda p, batch: optax.softmax_cross_entropy_with_integer_labels(
      m.apply({'params': p}, batch[0]), batch[1]).mean()
  perms = permute.ste_matching(spec, a, b, loss, [(x, y)], steps=8, key=KEY)
  for g, p in perms.items():
    assert sorted(np.asarray(p).tolist()) == list(range(p.shape[0]))
  mid = lambda pp: loss(permute.lerp_params(a, permute.apply_permutation(spec, pp, b), 0.5), (x, y))
  naive = loss(permute.lerp_params(a, b, 0.5), (x, y))
  assert float(mid(perms)) <= float(naive)
