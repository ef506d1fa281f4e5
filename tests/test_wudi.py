"""WUDI: identities of its loss, the closed form, Adam, layouts, sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

T = mj.transforms


def _loss(tau, tvs):
  """The paper's loss, literally, on ``(out, in)`` task matrices."""
  return sum(jnp.sum(jnp.square((tau - t) @ t.T)) / jnp.sum(t * t) for t in tvs)


def _tvs(k=3, shape=(5, 4), seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(k)]


def _wudi(tvs, **kw):
  """WUDI of ``(out, in)`` matrices through the public merge."""
  base = {'x': {'weight': jnp.zeros(tvs[0].shape)}}
  models = [{'x': {'weight': t}} for t in tvs]
  return mj.merge(mj.methods.wudi(**kw), base, models)['x']['weight']


@pytest.mark.parametrize('solver', ['adam', 'closed_form'])
def test_one_task_is_returned_exactly(solver):
  (t,) = _tvs(1)
  testing.assert_trees_close(_wudi([t], solver=solver), t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('solver', ['adam', 'closed_form'])
def test_disjoint_input_supports_give_the_sum(solver):
  # tau_i non-zero only in its own input columns: the sum has zero loss.
  rng = np.random.default_rng(1)
  tvs = []
  for i in range(3):
    t = np.zeros((4, 6), np.float32)
    t[:, 2 * i:2 * i + 2] = rng.normal(size=(4, 2))
    tvs.append(jnp.asarray(t))
  total = sum(tvs)
  assert float(_loss(total, tvs)) < 1e-10
  testing.assert_trees_close(_wudi(tvs, solver=solver), total, rtol=1e-5,
                             atol=1e-5)


def test_closed_form_minimises_the_loss_and_adam_converges_to_it():
  tvs = _tvs(3, (4, 6))  # in > rank: the Gram sum is singular
  closed = _wudi(tvs, solver='closed_form')
  g = jax.grad(_loss)(closed, tvs)
  assert float(jnp.max(jnp.abs(g))) < 1e-3
  for eps in (1e-2, -1e-2):  # a local minimum along random directions
    d = jnp.asarray(np.random.default_rng(2).normal(size=closed.shape))
    assert float(_loss(closed + eps * d, tvs)) > float(_loss(closed, tvs))
  adam = _wudi(tvs, steps=4000, learning_rate=1e-2)
  testing.assert_trees_close(adam, closed, rtol=1e-2, atol=1e-2)


def test_adam_matches_a_plain_adam_loop_on_the_literal_loss():
  # FusionBench's procedure written plainly: start at the sum, Adam
  # (0.9, 0.999, eps 1e-8) on autograd of the loss, here with jax.grad.
  tvs = _tvs(3, (5, 4), seed=3)
  lr, steps = 1e-3, 50
  tau = sum(tvs)
  m = v = jnp.zeros_like(tau)
  for t in range(1, steps + 1):
    g = jax.grad(_loss)(tau, tvs)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    tau = tau - lr * (m / (1 - 0.9 ** t)) / (jnp.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  testing.assert_trees_close(_wudi(tvs, steps=steps, learning_rate=lr), tau,
                             rtol=1e-4, atol=1e-5)


def test_layout_auto_follows_the_leaf_name():
  tvs = _tvs(2, (5, 3))
  torch_style = _wudi(tvs, solver='closed_form')  # '…weight': (out, in)
  base = {'x': {'kernel': jnp.zeros((3, 5))}}
  flax = mj.merge(mj.methods.wudi(solver='closed_form'), base,
                  [{'x': {'kernel': t.T}} for t in tvs])['x']['kernel']
  testing.assert_trees_close(flax, torch_style.T, rtol=1e-5, atol=1e-5)
  # The other orientation is a different (wrong-axis) merge.
  wrong = mj.merge(mj.methods.wudi(solver='closed_form', layout='out_in'),
                   base, [{'x': {'kernel': t.T}} for t in tvs])['x']['kernel']
  assert float(jnp.max(jnp.abs(wrong - flax))) > 1e-3


def test_zero_task_vectors_and_other_leaves():
  tvs = _tvs(2, (4, 4))
  zero = jnp.zeros((4, 4))
  # A task that changed nothing constrains nothing (FusionBench divides by 0).
  with_zero = _wudi(tvs + [zero], solver='closed_form')
  testing.assert_trees_close(with_zero, _wudi(tvs, solver='closed_form'),
                             rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(_wudi([zero, zero]))))
  base = {'d': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)}}
  fts = [{'d': {'kernel': jnp.ones((3, 2)) * i, 'bias': jnp.ones(2) * i}}
         for i in (1.0, 3.0)]
  out = mj.merge(mj.methods.wudi(), base, fts)
  np.testing.assert_allclose(out['d']['bias'], 2.0)  # the mean


def test_learning_rate_and_lambda_sweep_in_one_compile():
  tvs = _tvs(3, (6, 5))
  base = {'x': {'weight': jnp.zeros((6, 5))}}
  models = [{'x': {'weight': t}} for t in tvs]
  run = lambda lr, lam: mj.merge(mj.methods.wudi(lam, steps=20,
                                                 learning_rate=lr), base, models)
  with testing.log_compilations() as log:
    a = run(1e-3, 1.0)
    b = run(1e-2, 0.5)
  assert log.count('_run') == 1
  lrs, lams = jnp.array([1e-3, 1e-2]), jnp.array([1.0, 0.5])
  swept = jax.vmap(run)(lrs, lams)['x']['weight']
  testing.assert_trees_close(swept[0], a['x']['weight'], rtol=1e-5, atol=1e-6)
  testing.assert_trees_close(swept[1], b['x']['weight'], rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match='learning_rate'):
    jax.block_until_ready(jax.jit(run)(jnp.float32(-1.0), 1.0))


@pytest.mark.parametrize('kwargs, match', [
    (dict(solver='lbfgs'), 'solver'), (dict(steps=-1), 'steps'),
    (dict(steps=1.5), 'steps'), (dict(learning_rate=float('nan')),
                                  'learning_rate'),
    (dict(layout='rows'), 'layout'), (dict(other='median'), 'other')])
def test_invalid_settings_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    T.wudi_reduce(**kwargs)


def test_bf16_inputs_keep_their_dtype():
  tvs = [t.astype(jnp.bfloat16) for t in _tvs(2, (4, 4))]
  base = {'x': {'weight': jnp.zeros((4, 4), jnp.bfloat16)}}
  out = mj.merge(mj.methods.wudi(solver='closed_form'), base,
                 [{'x': {'weight': t}} for t in tvs])['x']['weight']
  assert out.dtype == jnp.bfloat16
  want = _wudi([t.astype(jnp.float32) for t in tvs], solver='closed_form')
  testing.assert_trees_close(out.astype(jnp.float32), want, rtol=2e-2,
                             atol=2e-2)
