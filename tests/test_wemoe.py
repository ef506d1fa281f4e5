"""WEMoE: routed dense layers against a per-input reference merge."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


def _zoo(k=3, seed=0):
  net = _MLP()
  base = net.init(jax.random.key(seed), jnp.zeros((1, 4)))['params']
  keys = jax.random.split(jax.random.key(seed + 1), k)
  fts = [jax.tree.map(lambda p, kk=kk: p + 0.3 * jax.random.normal(
      kk, p.shape), base) for kk in keys]
  return net, base, fts


def _reference(net, state, base, fts, x, prune_dense=None):
  """Per input: gates from each layer's own input, the merged model applied."""
  outs = []
  for xb in np.asarray(x):
    xb = jnp.asarray(xb)[None]
    h = xb
    params = jax.tree.map(lambda a: a, state.params)
    for name in ('Dense_0', 'Dense_1'):
      r = state.routers[name]
      g = np.asarray(jax.nn.relu(h @ r.w1 + r.b1[None]) @ r.w2 + r.b2[None])[0]
      layer = {}
      for leaf in ('kernel', 'bias'):
        taus = [f[name][leaf] - base[name][leaf] for f in fts]
        if prune_dense is not None and leaf == 'kernel':
          taus = list(prune_dense[name])
        layer[leaf] = base[name][leaf] + sum(gi * t for gi, t in zip(g, taus))
      params = {**params, name: layer}
      h = nn.Dense(layer['bias'].shape[0]).apply({'params': layer}, h)
      if name == 'Dense_0':
        h = nn.relu(h)
    outs.append(h[0])
  return jnp.stack(outs)


def _randomise_routers(state, key):
  leaves, tree = jax.tree.flatten(state.routers)
  keys = jax.random.split(key, len(leaves))
  return state._replace(routers=jax.tree.unflatten(
      tree, [l + 0.5 * jax.random.normal(k, l.shape) for l, k in
             zip(leaves, keys)]))


def test_routed_forward_equals_per_input_merged_models():
  net, base, fts = _zoo()
  s = mj.methods.wemoe_init(base, fts, key=jax.random.key(2))
  s = _randomise_routers(s, jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (5, 4))
  out = mj.methods.wemoe_apply(net, s, x)
  testing.assert_trees_close(out, _reference(net, s, base, fts, x),
                             rtol=1e-4, atol=1e-5)
  jitted = jax.jit(lambda s, x: mj.methods.wemoe_apply(net, s, x))(s, x)
  testing.assert_trees_close(jitted, out, rtol=1e-5, atol=1e-6)


def test_initial_routers_give_task_arithmetic():
  net, base, fts = _zoo()
  s = mj.methods.wemoe_init(base, fts, key=jax.random.key(2), init_lambda=0.3)
  s = s._replace(routers={p: r._replace(w2=jnp.zeros_like(r.w2))
                          for p, r in s.routers.items()})
  x = jax.random.normal(jax.random.key(4), (5, 4))
  ta = mj.merge(mj.methods.task_arithmetic(lambda_=0.3), base, fts)
  testing.assert_trees_close(mj.methods.wemoe_apply(net, s, x),
                             net.apply({'params': ta}, x), rtol=1e-5,
                             atol=1e-5)


def test_pruned_task_vectors_equal_their_dense_form():
  net, base, fts = _zoo()
  s = mj.methods.wemoe_init(base, fts, key=jax.random.key(2), prune=0.5)
  s = _randomise_routers(s, jax.random.key(3))
  dense = {}
  for name, tv in s.task_vectors.items():
    p = tv['kernel']
    m, n = base[name]['kernel'].shape
    assert p.index.shape == (3, (m * n + 1) // 2)
    d = np.zeros((3, m * n), np.float32)
    for i in range(3):
      d[i, np.asarray(p.index[i])] = np.asarray(p.values[i])
      full = np.abs(np.asarray(fts[i][name]['kernel'] - base[name]['kernel']))
      kept = np.abs(d[i]).reshape(m, n)
      # The kept entries are the largest magnitudes.
      assert kept[kept > 0].min() >= np.sort(full.ravel())[::-1][
          p.index.shape[1] - 1] - 1e-6
    dense[name] = d.reshape(3, m, n)
  x = jax.random.normal(jax.random.key(4), (4, 4))
  testing.assert_trees_close(
      mj.methods.wemoe_apply(net, s, x),
      _reference(net, s, base, fts, x, prune_dense=dense), rtol=1e-4,
      atol=1e-5)


def test_gates_batch_reduce_and_top_k():
  _, base, fts = _zoo()
  s = _randomise_routers(mj.methods.wemoe_init(base, fts,
                                               key=jax.random.key(0)),
                         jax.random.key(1))
  r = s.routers['Dense_0']
  x = jax.random.normal(jax.random.key(2), (6, 4))
  g = mj.methods.wemoe_gates(r, x)
  gb = mj.methods.wemoe_gates(r, x, batch_reduce=True)
  np.testing.assert_allclose(gb, jnp.broadcast_to(g.mean(0, keepdims=True), g.shape),
                             rtol=1e-6)
  g1 = mj.methods.wemoe_gates(r, x, top_k=1)
  assert int(jnp.sum(g1 != 0)) == 6
  np.testing.assert_allclose(g1.sum(-1), g.max(-1))
  # Tokens: the router sees the mean over the middle axes.
  xt = jnp.stack([x, x + 1.0], axis=1)
  np.testing.assert_allclose(mj.methods.wemoe_gates(r, xt),
                             mj.methods.wemoe_gates(r, x + 0.5), rtol=1e-5)


def test_fit_lowers_entropy_and_compiles_once_across_learning_rates():
  net, base, fts = _zoo()
  s = mj.methods.wemoe_init(base, fts, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(5), (4, 8, 4))
  batches = [x[i] for i in range(4)]

  def loss(state, xb):
    return mj.methods.prediction_entropy(mj.methods.wemoe_apply(net, state,
                                                                xb))

  with testing.log_compilations() as log:
    a = mj.methods.fit_wemoe(loss, s, batches, steps=30, learning_rate=1e-2)
    b = mj.methods.fit_wemoe(loss, s, batches, steps=30, learning_rate=3e-2)
  assert log.count('_fit') == 1
  assert a.losses[-1] < a.losses[0] and b.losses[-1] < b.losses[0]
  # Only the routers move.
  testing.assert_trees_close(a.state.task_vectors, s.task_vectors)
  testing.assert_trees_close(a.state.params, s.params)


@pytest.mark.parametrize('kwargs, match', [
    (dict(routed=['nope']), 'not dense layers'),
    (dict(prune=1.0), 'prune'),
])
def test_bad_settings_raise(kwargs, match):
  _, base, fts = _zoo()
  with pytest.raises(ValueError, match=match):
    mj.methods.wemoe_init(base, fts, key=jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match='steps'):
    mj.methods.fit_wemoe(lambda s, b: 0.0, mj.methods.wemoe_init(
        base, fts, key=jax.random.key(0)), [jnp.zeros(1)], steps=0)
