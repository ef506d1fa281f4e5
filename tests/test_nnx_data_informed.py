"""The data-informed merges on a Flax nnx model equal the same merges on linen.

A linen MLP and an nnx MLP with the same layer names have the same
parameter pytree (``{'l1': {'kernel', 'bias'}, 'l2': ...}``), so every
statistic, fit and merge must come out the same through either framework.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import stats
from mergejax import testing

M = mj.methods
KEY = jax.random.key(0)


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jax.nn.tanh(nn.Dense(6, name='l1')(x))
    return nn.Dense(4, name='l2')(h)


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 6, rngs=rngs)
    self.l2 = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.tanh(self.l1(x)))


@pytest.fixture(scope='module')
def setup():
  module = NnxMLP(nnx.Rngs(0))
  nnx_fn, base = stats.nnx_functional(module)
  linen = LinenMLP()
  linen_fn = lambda p, x: linen.apply({'params': p}, x)
  rng = np.random.default_rng(0)
  models = [jax.tree.map(lambda a: a + 0.3 * jnp.asarray(
      rng.normal(size=a.shape), jnp.float32), base) for _ in range(3)]
  xs = jnp.asarray(rng.normal(size=(3, 16, 5)), jnp.float32)
  return dict(module=module, linen=linen, nnx_fn=nnx_fn, linen_fn=linen_fn,
              base=base, models=models, xs=xs)


def test_the_two_frameworks_share_one_parameter_tree(setup):
  s = setup
  assert mj.leaf_paths(s['base']) == mj.leaf_paths(
      s['linen'].init(KEY, s['xs'][0])['params'])
  np.testing.assert_allclose(s['nnx_fn'](s['base'], s['xs'][0]),
                             s['linen_fn'](s['base'], s['xs'][0]), rtol=1e-6)


def test_nnx_linear_inputs_equal_linen_dense_inputs(setup):
  s = setup
  got = stats.nnx_linear_inputs(s['module'])(s['base'], s['xs'][0])
  want = stats.linen_dense_inputs(s['linen'])(s['base'], s['xs'][0])
  assert set(got) == set(want) == {'l1/kernel', 'l2/kernel'}
  testing.assert_trees_close(got, want, rtol=1e-6)
  # The module passed in is never modified.
  assert type(s['module'].l1) is nnx.Linear


def test_fisher_and_regmean_merges_agree(setup):
  s = setup
  data = [[(x, None)] for x in s['xs']]
  for kind in ('exact', 'empirical'):
    y = [jnp.zeros(16, jnp.int32)] * 3
    fis = {f: [stats.fisher_diagonal(fn, m, [(x, yy)], kind=kind)
               for m, x, yy in zip(s['models'], s['xs'], y)]
           for f, fn in (('nnx', s['nnx_fn']), ('linen', s['linen_fn']))}
    testing.assert_trees_close(
        mj.merge(M.fisher_merging(fis['nnx']), None, s['models']),
        mj.merge(M.fisher_merging(fis['linen']), None, s['models']),
        rtol=1e-5, atol=1e-6)
  fns = {'nnx': stats.nnx_linear_inputs(s['module']),
         'linen': stats.linen_dense_inputs(s['linen'])}
  grams = {f: [stats.input_grams(fn, m, d) for m, d in zip(s['models'], data)]
           for f, fn in fns.items()}
  testing.assert_trees_close(
      mj.merge(M.regmean(grams['nnx']), None, s['models']),
      mj.merge(M.regmean(grams['linen']), None, s['models']), rtol=1e-5,
      atol=1e-6)
  pp = {f: mj.merge(M.regmean_plusplus(fn, s['models'], [[x] for x in s['xs']]),
                    None, s['models']) for f, fn in fns.items()}
  testing.assert_trees_close(pp['nnx'], pp['linen'], rtol=1e-5, atol=1e-6)


def test_learned_merges_agree(setup):
  s = setup
  batches = [s['xs'][:, :8], s['xs'][:, 8:]]
  flat = [b.reshape(-1, 5) for b in batches]
  out = {}
  for f in ('nnx', 'linen'):
    fn = s[f + '_fn']
    entropy = lambda p, x, fn=fn: M.prediction_entropy(fn(p, x))
    ada = M.fit_adamerging(entropy, s['base'], s['models'], flat, steps=10,
                           learning_rate=1e-2)
    conc = M.fit_concrete(entropy, s['base'], s['models'], flat, key=KEY,
                          steps=5, learning_rate=1e-2)
    outputs = lambda p, x, t, fn=fn: ({}, fn(p, x))
    expert = M.fit_expert_merging(outputs, s['base'], s['models'], batches,
                                  steps=10, learning_rate=1e-2,
                                  chunks={'l1': {'kernel': 3, 'bias': 1},
                                          'l2': {'kernel': 2, 'bias': 1}})
    merged = mj.merge(M.adamerging(ada.coefficients), s['base'], s['models'])
    surgery = M.fit_surgery(fn, merged, s['models'], batches, key=KEY,
                            steps=10)
    out[f] = (ada.coefficients, conc.logits, expert.coefficients,
              surgery.down, surgery.up)
    # Each fit moved away from its start: the comparison is not vacuous.
    assert ada.losses[-1] < ada.losses[0]
    assert expert.losses[-1] < expert.losses[0]
  testing.assert_trees_close(out['nnx'], out['linen'], rtol=1e-4, atol=1e-6)
