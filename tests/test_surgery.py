"""Representation surgery: identity at start, fixed points, the fitted gap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods
KEY = jax.random.key(0)


def _linear(p, x):
  return x @ p['w']


def _setup(k=2, d=4, n=32, seed=0):
  rng = np.random.default_rng(seed)
  merged = {'w': jnp.asarray(rng.normal(size=(3, d)), jnp.float32)}
  experts = [{'w': merged['w'] + 0.5 * jnp.asarray(rng.normal(size=(3, d)),
                                                   jnp.float32)}
             for _ in range(k)]
  batches = [jnp.asarray(rng.normal(size=(k, n, 3)), jnp.float32)
             for _ in range(2)]
  return merged, experts, batches


def test_adapters_start_as_the_identity():
  merged, experts, batches = _setup()
  res = M.fit_surgery(_linear, merged, experts, batches, key=KEY, steps=1,
                      learning_rate=0.0)
  assert res.down.shape == (2, 16, 4) and res.up.shape == (2, 4, 16)
  assert res.down.size + res.up.size == 2 * 2 * 16 * 4  # K * 2 * hidden * d
  z = _linear(merged, batches[0][0])
  np.testing.assert_array_equal(res.apply(z, 0), z)
  bound = 1.0 / np.sqrt(4)
  assert float(jnp.max(jnp.abs(res.down))) <= bound and not np.any(res.up)


def test_a_merge_equal_to_its_experts_is_left_alone():
  merged, _, batches = _setup()
  res = M.fit_surgery(_linear, merged, [merged, merged], batches, key=KEY,
                      steps=20, learning_rate=1e-2)
  np.testing.assert_array_equal(res.losses, 0.0)
  start = M.fit_surgery(_linear, merged, [merged, merged], batches, key=KEY,
                        steps=1, learning_rate=0.0)
  np.testing.assert_array_equal(res.down, start.down)
  np.testing.assert_array_equal(res.up, 0.0)


def test_the_gap_shrinks_and_each_task_uses_its_own_adapter():
  merged, experts, batches = _setup(k=3)
  res = M.fit_surgery(_linear, merged, experts, batches, key=KEY, steps=400,
                      learning_rate=1e-2)
  assert res.losses[-1] < 0.6 * res.losses[0]
  x = batches[0]
  for t in range(3):
    before = jnp.mean(jnp.abs(_linear(merged, x[t]) - _linear(experts[t], x[t])))
    after = jnp.mean(jnp.abs(res.apply(_linear(merged, x[t]), t)
                             - _linear(experts[t], x[t])))
    assert float(after) < float(before), t


def test_joint_step_equals_one_adam_step_per_task():
  # FusionBench loops over tasks with one optimizer step each; the adapters
  # share nothing, so the joint step on the summed loss is the same.
  merged, experts, batches = _setup(k=2)
  steps, lr = 6, 1e-2
  res = M.fit_surgery(_linear, merged, experts, batches, key=KEY, steps=steps,
                      learning_rate=lr)
  start = M.fit_surgery(_linear, merged, experts, batches, key=KEY, steps=1,
                        learning_rate=0.0)
  opt = optax.adam(lr)
  for t in range(2):
    p = (start.down[t], start.up[t])
    state = opt.init(p)
    for i in range(steps):
      x = batches[i % len(batches)][t]

      def loss(p, x=x):
        d = M.surgery_apply(*p, _linear(merged, x)) - _linear(experts[t], x)
        return jnp.mean(jnp.abs(d))

      with jax.numpy_dtype_promotion('standard'):
        g = jax.grad(loss)(p)
        up, state = opt.update(g, state, p)
        p = optax.apply_updates(p, up)
    testing.assert_trees_close((res.down[t], res.up[t]), p, rtol=1e-4,
                               atol=1e-6)


def test_one_compilation_of_the_training_loop():
  merged, experts, batches = _setup()
  with testing.log_compilations() as log:
    M.fit_surgery(_linear, merged, experts, batches, key=KEY, steps=50)
  assert log.count('run') == 1


@pytest.mark.parametrize('change, match', [
    (dict(hidden=0), 'hidden'), (dict(steps=0), 'steps'),
    (dict(batches=[]), 'no batches'), (dict(expert_params=[]), 'empty'),
    (dict(batches=[jnp.zeros((3, 4, 3))]), r'\[K=2, n'),
    (dict(batches=[jnp.full((2, 4, 3), jnp.nan)]), 'NaN')])
def test_bad_inputs_raise(change, match):
  merged, experts, batches = _setup()
  kw = dict(features_fn=_linear, merged_params=merged, expert_params=experts,
            batches=batches, key=KEY, steps=2)
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    M.fit_surgery(**kw)
