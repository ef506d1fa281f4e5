"""Twin-Merging: factorised exclusive parts, per-input mixing, the router."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods


def _zoo(k=3, seed=0, m=24, n=20):
  shapes = {'Dense_0/kernel': (m, n), 'Dense_0/bias': (n,),
            'Dense_1/kernel': (n, 6), 'Dense_1/bias': (6,)}
  return testing.random_models(shapes, k, seed=seed, scale=0.3)


def _np_low_rank(x, r):
  u, s, vh = np.linalg.svd(x, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vh[:r]


def _dense_twins(base, models, density):
  """NumPy reference: theta* = TA(0.29), v_t = rank-r(theta_t - theta*)."""
  f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  base, models = f64(base), [f64(m) for m in models]
  shared = jax.tree.map(lambda b, *ms: b + 0.29 * sum(x - b for x in ms), base, *models)
  def comp(s, *ms):
    if s.ndim == 1:
      return np.stack([x - s for x in ms])
    r = max(1, int(density * min(s.shape)))
    return np.stack([_np_low_rank(x - s, r) for x in ms])
  return shared, jax.tree.map(comp, shared, *models)


def _close(a, b, tol=1e-4):
  testing.assert_trees_close(a, b, rtol=tol, atol=tol)


def test_exclusive_parts_are_stored_factorised_and_match_dense():
  base, models = _zoo()
  _, st = mj.merge(M.twin(density=0.25), base, models, return_state=True)
  v = st.twins['Dense_0']['kernel']
  assert isinstance(v, mj.transforms.SVDBasis)
  r = int(0.25 * 20)
  assert v.u.shape == (3, 24, r) and v.s.shape == (3, r) and v.vh.shape == (3, r, 20)
  # Stored bytes: r (m + n + 1) per task instead of m n.
  stored = sum(x.nbytes for x in v)
  assert stored == 3 * r * (24 + 20 + 1) * 4
  assert stored / (3 * 24 * 20 * 4) == pytest.approx(r * (24 + 20 + 1) / (24 * 20))
  assert stored < 0.5 * 3 * 24 * 20 * 4
  # Same task models and mixes as the dense NumPy reference.
  shared, twins = _dense_twins(base, models, 0.25)
  for i in range(3):
    want = jax.tree.map(lambda s, t: s + t[i], shared, twins)
    jax.tree.map(_close, M.reconstruct(st, base, i), want)
  w = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
  mix = M.twin_mix(st, jnp.asarray(w))
  for b in range(2):
    want = jax.tree.map(lambda s, t: s + np.tensordot(w[b], t, axes=1), shared, twins)
    jax.tree.map(lambda a, x: _close(a[b], x), mix, want)
  with pytest.raises(ValueError, match=r'weights must have shape \[3\]'):
    M.twin_mix(st, jnp.ones(4))


def _forward_dense(params, x):
  h = jax.nn.relu(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  return h @ params['Dense_1']['kernel'] + params['Dense_1']['bias']


@pytest.mark.parametrize('compress', ['svd', 'magnitude'])
def test_per_input_mixing_fused_and_chunked_match_dense(compress):
  base, models = _zoo()
  _, st = mj.merge(M.twin(density=0.3, compress=compress), base, models,
                   return_state=True)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((10, 24)), jnp.float32)
  w = jax.nn.softmax(jnp.asarray(rng.standard_normal((10, 3)), jnp.float32))
  # Dense reference: one fully mixed model per input.
  want = np.stack([np.asarray(_forward_dense(M.twin_mix(st, w[b]), x[b]))
                   for b in range(10)])
  # twin_apply: any model, chunks of 4 inputs (10 = 4 + 4 + 2).
  got = M.twin_apply(_forward_dense, st, w, x, batch_size=4)
  _close(got, want)
  # twin_dense: the mix fused into each layer's matmul.
  h = jax.nn.relu(M.twin_dense(x, w, st, 'Dense_0'))
  _close(M.twin_dense(h, w, st, 'Dense_1'), want)
  _close(jax.jit(lambda a, b: M.twin_dense(a, b, st, 'Dense_0'))(x, w),
         M.twin_dense(x, w, st, 'Dense_0'), 1e-5)
  with pytest.raises(ValueError, match=r'weights must have shape \(10, 3\)'):
    M.twin_apply(_forward_dense, st, w[:, :2], x)
  with pytest.raises(ValueError, match=r"x must be \[B, 24\].*'Dense_0'"):
    M.twin_dense(x[:, :5], w, st, 'Dense_0')


def test_router_learns_task_ids_and_validates():
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((4, 16)) * 3
  ids = np.repeat(np.arange(4), 12)
  f = jnp.asarray(centers[ids] + rng.standard_normal((48, 16)), jnp.float32)
  for hidden in ((), (32,)):
    r = M.twin_train_router(f, jnp.asarray(ids), 4, key=jax.random.key(0),
                            hidden=hidden, steps=100)
    w = M.twin_route(r, f)
    assert w.shape == (48, 4)
    _close(jnp.sum(w, -1), np.ones(48), 1e-5)
    assert float(jnp.mean(jnp.argmax(w, -1) == jnp.asarray(ids))) == 1.0
  with pytest.raises(ValueError, match=r'task_ids must lie in \[0, 4\)'):
    M.twin_train_router(f, jnp.asarray(ids + 1), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match='task_ids must be an int array'):
    M.twin_train_router(f, jnp.asarray(ids, jnp.float32), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match='needs the state of a twin'):
    _, st = mj.merge(M.task_arithmetic(), *_zoo(), return_state=True)
    M.twin_apply(_forward_dense, st, w, f)


def test_digits_routed_protocol_matches_flax_model_per_input():
  from experiments import twin_routed  # pylint: disable=g-import-not-at-top
  from experiments import zoo  # pylint: disable=g-import-not-at-top
  model = zoo.Classifier(width=16)
  p = zoo.init_params(model, jax.random.key(2))
  fts = [jax.tree.map(lambda x, i=i: x + 0.1 * jax.random.normal(
      jax.random.key(10 + i), x.shape), p) for i in range(2)]
  shared, st = mj.merge(M.twin(density=0.25), p['backbone'],
                        [f['backbone'] for f in fts], return_state=True)
  x = jax.random.uniform(jax.random.key(4), (6, 64))
  w = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((6, 2)),
                                 jnp.float32))
  fused = twin_routed.backbone_forward(shared, st, x, w, depth=2)
  flax_bb = lambda params, xi: model.apply(  # pylint: disable=g-long-lambda
      {'params': {'backbone': params, 'head': p['head']}}, xi[None],
      method=lambda m, y: m.backbone(y))[0]
  _close(fused, M.twin_apply(flax_bb, st, w, x, batch_size=4))
  _close(twin_routed.backbone_forward(shared, st, x, None, depth=2),
         model.apply({'params': {'backbone': shared, 'head': p['head']}}, x,
                     method=lambda m, y: m.backbone(y)))


@pytest.mark.slow
def test_digits_routed_protocol_runs():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from experiments import default as default_exp  # pylint: disable=g-import-not-at-top
  from experiments import zoo  # pylint: disable=g-import-not-at-top
  d = zoo.load_digits(jax.random.key(0))
  tasks = zoo.make_tasks(d, ['rot90', 'invert'], jax.random.key(1))
  p = zoo.init_params(zoo.Classifier(width=16), jax.random.key(2))
  fts = [jax.tree.map(lambda x, i=i: x + 0.1 * jax.random.normal(
      jax.random.key(10 + i), x.shape), p) for i in range(2)]
  heads = jax.tree.map(lambda *h: jnp.stack(h), *[f['head'] for f in fts])
  entry = ml_collections.ConfigDict(dict(
      kwargs=dict(density=0.25), sweep={}, protocol='routed',
      router=dict(per_task=8, steps=20)))
  config = ml_collections.ConfigDict(dict(zoo=dict(depth=2)))
  val, test, notes, extra = default_exp._routed(  # pylint: disable=protected-access
      'twin', entry, p['backbone'], [f['backbone'] for f in fts], tasks, heads,
      config, jax.random.key(3))
  assert val.shape == (2,) and test.shape == (2,)
  assert extra['oracle_test'].shape == (2,) and 'router' in notes[0]
  assert 0.0 <= extra['router']['accuracy']['test'] <= 1.0
