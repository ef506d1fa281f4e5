"""MWA: weights, the offline merge, LoRA adapters, the running trackers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods
LoRA = mj.transforms.LoRA


def _ckpts(t=5, seed=0):
  _, models = testing.random_models(k=t, seed=seed)
  return models


def _np_weights(metric, kind, p):
  m = np.asarray(metric, np.float64)
  w = m ** p if kind == 'step' else m ** -p
  return w / w.sum()


def _np_merge(models, w):
  return jax.tree.map(lambda *xs: np.tensordot(w, np.stack(xs), axes=1),
                      *models)


LOSSES = [2.3, 1.1, 0.7, 0.9, 0.5]
STEPS = [100, 200, 300, 400, 500]


@pytest.mark.parametrize('kind, metric', [('step', STEPS), ('loss', LOSSES)])
@pytest.mark.parametrize('p', [0.0, 0.5, 2.0, 7.0])
def test_weights_and_merge_match_numpy(kind, metric, p):
  w = M.mwa_weights(metric, kind=kind, penalty=p)
  np.testing.assert_allclose(w, _np_weights(metric, kind, p), rtol=1e-5,
                             atol=1e-7)
  models = _ckpts()
  out = mj.merge(M.mwa(metric, kind=kind, penalty=p), None, models)
  testing.assert_trees_close(out, _np_merge(models, _np_weights(metric, kind,
                                                                p)))


def test_penalty_zero_is_the_uniform_average():
  models = _ckpts()
  for kind, metric in (('step', STEPS), ('loss', LOSSES)):
    np.testing.assert_allclose(M.mwa_weights(metric, kind=kind, penalty=0.0),
                               0.2, rtol=1e-6)
    testing.assert_trees_close(
        mj.merge(M.mwa(metric, kind=kind, penalty=0.0), None, models),
        mj.merge(M.average(), None, models))


def test_large_penalty_selects_the_best_checkpoint_without_overflow():
  models = _ckpts()
  for kind, metric, best in (('step', STEPS, 4), ('loss', LOSSES, 4),
                             ('loss', [0.3, 0.9, 1.0, 2.0, 5.0], 0)):
    w = M.mwa_weights(metric, kind=kind, penalty=500.0)
    assert bool(jnp.all(jnp.isfinite(w)))
    np.testing.assert_allclose(w, np.eye(5)[best], atol=1e-6)
    out = mj.merge(M.mwa(metric, kind=kind, penalty=500.0), None, models)
    testing.assert_trees_close(out, models[best], atol=1e-5)
  # Ties share the weight; huge steps and penalties stay finite.
  np.testing.assert_allclose(M.mwa_weights([1., 0.5, 0.5], kind='loss',
                                           penalty=1e4), [0., .5, .5],
                             atol=1e-6)
  w = M.mwa_weights([1e6, 2e6], kind='step', penalty=1e3)
  np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-6)


def test_base_plays_no_part():
  models = _ckpts()
  tx = M.mwa(LOSSES, kind='loss', penalty=1.5)
  ref = mj.merge(tx, None, models)
  for b in (models[0], jax.tree.map(lambda x: x + 7.0, models[0])):
    testing.assert_trees_close(mj.merge(tx, b, models), ref)


def test_jit_and_no_jit_agree():
  models = _ckpts()
  w_eager = M.mwa_weights(LOSSES, kind='loss', penalty=1.3)
  w_jit = jax.jit(lambda p, m: M.mwa_weights(m, kind='loss', penalty=p))(
      1.3, jnp.asarray(LOSSES))
  testing.assert_trees_close(w_jit, w_eager, rtol=1e-6)
  tx = M.mwa(LOSSES, kind='loss', penalty=1.3)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
  with jax.disable_jit():
    eager, state = tx.update(stacked, tx.init(None))
  testing.assert_trees_close(eager, mj.merge(tx, None, models))
  testing.assert_trees_close(state.weights, w_eager)
  tr = M.mwa_tracker(1.3, kind='loss')
  s = s_jit = tr.init(models[0])
  upd = jax.jit(tr.update)
  for m, loss in zip(models, LOSSES):
    s, s_jit = tr.update(s, m, loss), upd(s_jit, m, loss)
  testing.assert_trees_close(s_jit.merged, s.merged, rtol=1e-6)


def test_penalty_sweep_compiles_once_and_vmaps():
  # Shapes of its own, so no earlier test has compiled this merge.
  _, models = testing.random_models({'sweep/w': (7, 3), 'sweep/b': (3,)}, k=5)
  run = lambda p: mj.merge(M.mwa(LOSSES, kind='loss', penalty=p), None,
                           models)
  with testing.log_compilations() as log:
    a, b = run(0.5), run(3.0)
  assert log.count('_run') == 1
  swept = jax.vmap(run)(jnp.array([0.5, 3.0]))
  testing.assert_trees_close(jax.tree.map(lambda x: x[0], swept), a)
  testing.assert_trees_close(jax.tree.map(lambda x: x[1], swept), b)
  # A traced metric too (e.g. losses computed inside the same program).
  c = jax.jit(lambda m: mj.merge(M.mwa(m, kind='loss', penalty=3.0), None,
                                 models))(jnp.asarray(LOSSES))
  testing.assert_trees_close(c, b)


@pytest.mark.parametrize('kind, metric', [('step', STEPS), ('loss', LOSSES)])
def test_tracker_equals_offline_merge(kind, metric):
  models = _ckpts()
  for p in (0.0, 1.5, 40.0):
    tr = M.mwa_tracker(p, kind=kind)
    s = tr.init(models[0])
    upd = jax.jit(tr.update)
    for m, v in zip(models, metric):
      s = upd(s, m, v)
    assert int(s.count) == len(models)
    want = mj.merge(M.mwa(metric, kind=kind, penalty=p), None, models)
    testing.assert_trees_close(s.merged, want, rtol=1e-5, atol=1e-5)
  # Evenly spaced steps: the default metric (count + 1) gives the same merge.
  if kind == 'step':
    tr = M.mwa_tracker(2.0, kind='step')
    s = tr.init(models[0])
    for m in models:
      s = tr.update(s, m)
    testing.assert_trees_close(
        s.merged, mj.merge(M.mwa(STEPS, kind='step', penalty=2.0), None,
                           models), rtol=1e-5, atol=1e-5)


def test_tracker_vmapped_over_penalties():
  models = _ckpts()
  ps = jnp.array([0.0, 1.0, 4.0])
  params0 = models[0]
  states = jax.vmap(lambda p: M.mwa_tracker(p, kind='loss').init(params0))(ps)
  upd = jax.jit(jax.vmap(M.mwa_tracker(kind='loss').update,
                         in_axes=(0, None, None)))
  for m, loss in zip(models, LOSSES):
    states = upd(states, m, loss)
  for i, p in enumerate(ps):
    testing.assert_trees_close(
        jax.tree.map(lambda x, i=i: x[i], states.merged),
        mj.merge(M.mwa(LOSSES, kind='loss', penalty=p), None, models),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['step', 'loss'])
def test_optax_hook_equals_offline_merge(kind):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  every = 2
  opt = optax.chain(optax.sgd(0.1, momentum=0.9),
                    M.mwa_optax(1.5, kind=kind, every=every))
  state = opt.init(params)
  step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
  ckpts, metrics = [], []
  for t in range(1, 9):
    g = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    loss = jnp.float32(1.0 / t + 0.1)
    upd, state = step(g, state, params, loss)
    params = optax.apply_updates(params, upd)
    if t % every == 0:
      ckpts.append(params)
      metrics.append(float(t) if kind == 'step' else float(loss))
  tracker = optax.tree_utils.tree_get(state, 'tracker')
  assert int(tracker.count) == 4
  want = mj.merge(M.mwa(metrics, kind=kind, penalty=1.5), None, ckpts)
  testing.assert_trees_close(tracker.merged, want, rtol=1e-5, atol=1e-6)


def _adapters(t=4, n_in=5, n_out=3, r=2, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return [{'d': {'kernel': LoRA(f(n_in, r), f(r, n_out)), 'bias': f(n_out)}}
          for _ in range(t)]


def test_lora_delta_is_the_average_of_the_updates():
  ads = _adapters()
  losses = [1.0, 0.8, 0.6, 0.9]
  w = _np_weights(losses, 'loss', 2.0)
  out = mj.transforms.merge_lora(M.mwa(losses, kind='loss', penalty=2.0), ads)
  want = sum(wi * np.asarray(a['d']['kernel'].a)
             @ np.asarray(a['d']['kernel'].b) for wi, a in zip(w, ads))
  np.testing.assert_allclose(out['d']['kernel'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      out['d']['bias'], sum(wi * np.asarray(a['d']['bias'])
                            for wi, a in zip(w, ads)), rtol=1e-5, atol=1e-6)
  # Averaging the factors is a different (cross-term) update.
  fac = mj.merge(M.mwa(losses, kind='loss', penalty=2.0, lora='factors'),
                 None, ads)
  assert isinstance(fac['d']['kernel'], LoRA)
  np.testing.assert_allclose(
      fac['d']['kernel'].a, sum(wi * np.asarray(a['d']['kernel'].a)
                                for wi, a in zip(w, ads)), rtol=1e-5,
      atol=1e-6)
  prod = np.asarray(fac['d']['kernel'].a) @ np.asarray(fac['d']['kernel'].b)
  assert np.max(np.abs(prod - want)) > 1e-2
  # lora_svd with the same weights and rank T r gives the delta back as factors.
  svd = mj.transforms.merge_lora(
      M.lora_svd(M.mwa_weights(losses, kind='loss', penalty=2.0), rank=3), ads)
  np.testing.assert_allclose(mj.transforms.lora_delta(svd)['d']['kernel'],
                             want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('lora', ['delta', 'factors'])
def test_lora_tracker_equals_offline(lora):
  ads = _adapters()
  losses = [1.0, 0.8, 0.6, 0.9]
  tr = M.mwa_tracker(2.0, kind='loss', lora=lora)
  s = tr.init(ads[0])
  for a, loss in zip(ads, losses):
    s = tr.update(s, a, loss)
  tx = M.mwa(losses, kind='loss', penalty=2.0, lora=lora)
  testing.assert_trees_close(s.merged, mj.transforms.merge_lora(tx, ads),
                             rtol=1e-5, atol=1e-5)


def test_low_precision_checkpoints_keep_their_dtype():
  models = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), m)
            for m in _ckpts()]
  out = mj.merge(M.mwa(STEPS, kind='step', penalty=1.0), None, models)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize('kwargs, match', [
    (dict(metric=[1., -0.5], kind='loss'), r'positive.*checkpoint 1 has -0.5:'),
    (dict(metric=[0., 1.], kind='loss'), 'positive'),
    (dict(metric=[0, 10], kind='step'), 'count them from 1'),
    (dict(metric=[1., float('nan')], kind='loss'), 'checkpoint 1'),
    (dict(metric=[[1., 2.]], kind='loss'), r'shape \(T,\)'),
    (dict(metric=[], kind='loss'), r'shape \(T,\)'),
    (dict(metric=[1., 2.], kind='accuracy'), "kind must be 'step'"),
    (dict(metric=[1., 2.], kind='loss', penalty=-1.0), 'penalty'),
    (dict(metric=[1., 2.], kind='loss', penalty=[1., 2.]), 'scalar'),
    (dict(metric=[1., 2.], kind='loss', lora='mean'), 'lora must be'),
])
def test_invalid_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.mwa(**kwargs)


def test_more_errors():
  models = _ckpts(3)
  with pytest.raises(ValueError, match='2 values but 3 checkpoints'):
    mj.merge(M.mwa([1., 2.], kind='loss'), None, models)
  with pytest.raises(TypeError, match='metric'):
    M.mwa_weights(None, kind='loss')
  tr = M.mwa_tracker(1.0, kind='loss')
  with pytest.raises(ValueError, match='needs the checkpoint'):
    tr.update(tr.init(models[0]), models[0])
  with pytest.raises(ValueError, match='positive'):
    tr.update(tr.init(models[0]), models[0], -1.0)
  with pytest.raises(ValueError, match='every'):
    M.mwa_optax(1.0, kind='step', every=0)
  opt = M.mwa_optax(1.0, kind='loss')
  with pytest.raises(ValueError, match='value'):
    opt.update(models[0], opt.init(models[0]), models[0])
  # A traced negative loss stops the computation with the metric's name.
  with pytest.raises(Exception, match='losses'):
    jax.block_until_ready(jax.jit(
        lambda m: M.mwa_weights(m, kind='loss', penalty=1.0))(
            jnp.array([1.0, -2.0])))
