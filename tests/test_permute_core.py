"""Tests of permutation specs, builders, infer_spec, solvers, weight matching and permute_align."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mergejax as mj
from mergejax import permute
from mergejax.permute import models as M

KEY = jax.random.key(0)
IMG = jax.random.normal(KEY, (2, 8, 8, 3))
SEQ = jax.random.normal(KEY, (2, 8, 5))

# (name, module, hand-written spec, spec for infer_spec comparison, inputs)
CASES = {
    'mlp': (M.MLP((16, 12)), permute.mlp_spec(2), None, (jnp.ones((3, 5)),)),
    'cnn': (M.CNN(), permute.cnn_spec(2, 2), None, (IMG,)),
    'cnn_bn': (M.CNN(norm='batch'), permute.cnn_spec(2, 2, norm='batch'), None, (IMG,)),
    'resnet_ln': (M.ResNet(), permute.resnet_spec((2, 2)), None, (IMG,)),
    'resnet_bn': (M.ResNet(norm='batch'), permute.resnet_spec((2, 2), norm='batch'), None,
                  (IMG,)),
    'resnet_gn': (M.ResNet(norm='group'), permute.resnet_spec((2, 2), norm='group'), None,
                  (IMG,)),
    'transformer': (M.Transformer(num_heads=4), permute.transformer_spec(2),
                    permute.transformer_spec(2, per_head=False), (SEQ,)),
}


def _variables(name, noise=0.1):
  module, _, _, inputs = CASES[name]
  v = module.init(KEY, *inputs)
  # Perturb so that norms and BatchNorm statistics are not at their init values.
  rng = np.random.default_rng(7)  # host noise: no per-shape compiles
  return jax.tree.map(lambda x: x + noise * jnp.asarray(
      rng.standard_normal(x.shape), x.dtype), v)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('name', list(CASES))
def test_permuted_model_computes_same_outputs(name):
  module, spec, _, inputs = CASES[name]
  permute.check_spec(spec, module.apply, _variables(name), *inputs, key=KEY)


def test_check_spec_detects_wrong_spec():
  # Giving every ResNet block its own stream permutation breaks the residual adds.
  module, spec, _, inputs = CASES['resnet_ln']
  axes = spec.axes
  axes['stage0_block1/conv2/kernel'] = (None, None, 'P_stage0_block1', 'P_wrong')
  axes['stage0_block1/norm2/scale'] = ('P_wrong',)
  axes['stage0_block1/norm2/bias'] = ('P_wrong',)
  with pytest.raises(AssertionError, match='changed the outputs'):
    permute.check_spec(permute.PermutationSpec(axes), module.apply, _variables('resnet_ln'),
                       *inputs, key=KEY)


@pytest.mark.parametrize('name', ['mlp', 'cnn', 'resnet_bn', 'transformer'])
def test_planted_permutation_recovered(name):
  _, spec, _, _ = CASES[name]
  a = _variables(name)
  planted = permute.random_permutations(spec, a, jax.random.key(3))
  rng = np.random.default_rng(5)
  noisy = jax.tree.map(lambda x: x + 1e-3 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), a)
  b = permute.apply_permutation(spec, planted, noisy)
  res = permute.weight_matching(spec, a, b, key=jax.random.key(2), return_costs=True)
  back = permute.apply_permutation(spec, res.permutations, b)
  assert _max_diff(back, noisy) == 0.0  # exactly the planted units
  assert int(res.sweeps) <= 3
  inv = permute.inverse({g: p for g, p in planted.items() if g not in spec.nested})
  for g, p in inv.items():
    np.testing.assert_array_equal(res.permutations[g], p)


def test_planted_recovery_jax_solver_mlp():
  _, spec, _, _ = CASES['mlp']
  a = _variables('mlp')
  b = permute.apply_permutation(spec, permute.random_permutations(spec, a, KEY), a)
  perms = jax.jit(lambda a, b: permute.weight_matching(spec, a, b, key=KEY,
                                                       solver='hungarian'))(a, b)
  assert _max_diff(permute.apply_permutation(spec, perms, b), a) == 0.0


@pytest.mark.parametrize('name', list(CASES))
def test_infer_spec_equals_hand_written(name):
  module, spec, infer_ref, inputs = CASES[name]
  inferred = permute.infer_spec(module, *inputs)
  ref = infer_ref or spec
  assert permute.same_groups(inferred, ref), permute.describe_difference(inferred, ref)


def test_infer_spec_nnx():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  spec = permute.infer_spec(Net(nnx.Rngs(0)), jnp.ones((2, 4)), strip_collection=False)
  (group,) = spec.groups.values()
  assert set(group) == {('l1/kernel', 1), ('l1/bias', 0), ('l2/kernel', 0)}


def test_spec_errors():
  spec = permute.mlp_spec(1)
  p = M.MLP((6,)).init(KEY, jnp.ones((1, 4)))['params']
  with pytest.raises(ValueError, match='does not cover.*extra'):
    permute.apply_permutation(spec, {}, {**p, 'extra': jnp.ones(3)})
  bad = dict(p, Dense_1=dict(p['Dense_1'], kernel=jnp.ones((5, 10))))
  with pytest.raises(ValueError, match="inconsistent axis sizes.*'Dense_1/kernel' axis 0 has size 5"):
    permute.weight_matching(spec, bad, bad)
  with pytest.raises(ValueError, match="group 'P_0' has shape \\(5,\\) but the group has size"):
    permute.apply_permutation(spec, {'P_0': jnp.arange(5)}, p)
  with pytest.raises(ValueError, match='unknown group'):
    permute.apply_permutation(spec, {'P_9': jnp.arange(6)}, p)
  with pytest.raises(ValueError, match='has 1 axes'):
    permute.apply_permutation(permute.PermutationSpec(
        {**spec.axes, 'Dense_0/kernel': (None,)}), {}, p)


def test_spec_covers_variables_with_batch_stats():
  spec = permute.cnn_spec(2, 2, norm='batch')
  v = _variables('cnn_bn')
  assert set(v) == {'params', 'batch_stats'}
  resolved = spec.resolve(v)
  assert resolved['batch_stats/Norm_0/mean'] == ('P_Conv_0',)


@pytest.mark.parametrize('solver', ['hungarian', 'sinkhorn'])
def test_solvers_agree_with_scipy(solver):
  rng = np.random.default_rng(0)
  costs = rng.standard_normal((6, 12, 12)).astype(np.float32)
  perms = np.asarray(jax.jit(lambda c: permute.solve_assignment(c, solver))(costs))
  for c, p in zip(costs, perms):
    assert sorted(p.tolist()) == list(range(12))
    r, col = optimize.linear_sum_assignment(c, maximize=True)
    best = c[r, col].sum()
    if solver == 'hungarian':
      np.testing.assert_allclose(c[np.arange(12), p].sum(), best, rtol=1e-5)
    else:  # entropic: near-optimal
      assert c[np.arange(12), p].sum() >= best - 0.05 * abs(best)


def test_scipy_solver_inside_jit_via_callback():
  c = np.asarray(jax.random.normal(KEY, (3, 7, 7)))
  want = np.stack([optimize.linear_sum_assignment(x, maximize=True)[1] for x in c])
  np.testing.assert_array_equal(
      jax.jit(lambda c: permute.solve_assignment(c, 'scipy'))(c), want)


def test_sinkhorn_is_doubly_stochastic_and_differentiable():
  c = jax.random.normal(KEY, (5, 5))
  p = permute.sinkhorn(c, tau=0.5, n_iter=200)
  np.testing.assert_allclose(p.sum(0), 1, atol=1e-4)
  np.testing.assert_allclose(p.sum(1), 1, atol=1e-4)
  g = jax.grad(lambda c: jnp.sum(permute.sinkhorn(c, tau=0.5) * c))(c)
  assert jnp.all(jnp.isfinite(g))


def test_incremental_host_matching_equals_plain():
  # Independently initialised wide-ish MLPs: many sweeps, many partial updates.
  spec = permute.mlp_spec(3)
  m = M.MLP((48, 48, 48))
  a = m.init(jax.random.key(1), jnp.ones((1, 20)))['params']
  b = m.init(jax.random.key(2), jnp.ones((1, 20)))['params']
  fast = permute.weight_matching(spec, a, b, key=KEY, return_costs=True)
  slow = permute.weight_matching(spec, a, b, key=KEY, return_costs=True, incremental=False)
  np.testing.assert_allclose(fast.objective, slow.objective, rtol=1e-5)
  assert float(fast.objective) > float(permute.objective(spec, a, b))
  for g in fast.costs:  # the cost matrices are the true ones at the end
    np.testing.assert_allclose(fast.costs[g], slow.costs[g], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('solver', ['scipy', 'auto', 'hungarian'])
def test_permute_align_in_merge(solver):
  spec = permute.mlp_spec(2)
  base = _variables('mlp')['params']
  models = [permute.apply_permutation(spec, permute.random_permutations(
      spec, base, jax.random.key(i)), base) for i in range(3)]
  tx = mj.chain(permute.permute_align(spec, solver=solver), mj.transforms.mean())
  out, state = mj.merge(tx, base, models, key=KEY, return_state=True)
  assert _max_diff(out, base) < 1e-5
  assert state[0].permutations['P_0'].shape == (3, 16)
  # Without alignment the average is far from the base.
  assert _max_diff(mj.merge(mj.transforms.mean(), None, models), base) > 0.1


def test_permute_align_first_reference_no_base():
  spec = permute.mlp_spec(2)
  a = _variables('mlp')['params']
  b = permute.apply_permutation(spec, permute.random_permutations(spec, a, KEY), a)
  out = mj.merge(mj.chain(permute.permute_align(spec, reference='first'), mj.transforms.mean()),
                 None, [a, b])
  assert _max_diff(out, a) < 1e-5


def test_merge_many_aligns_three_permuted_copies():
  spec = permute.mlp_spec(2)
  a = _variables('mlp')['params']
  models = [a] + [permute.apply_permutation(
      spec, permute.random_permutations(spec, a, jax.random.key(i)), a) for i in (1, 2)]
  perms = permute.merge_many(spec, models, key=KEY)
  aligned = [permute.apply_permutation(spec, p, m) for p, m in zip(perms, models)]
  for m in aligned[1:]:  # all in one common frame (up to a shared permutation)
    assert _max_diff(m, aligned[0]) == 0.0


# --- a spec that does not match the tree is an error at every entry point ---

def _two_hidden_mlps():
  m = M.MLP((6, 5))
  x = jnp.ones((2, 4))
  return (m.init(jax.random.key(1), x)['params'],
          m.init(jax.random.key(2), x)['params'])


_ENTRY_POINTS = {
    'weight_matching': lambda s, a, b: permute.weight_matching(s, a, b),
    'merge_many': lambda s, a, b: permute.merge_many(s, [a, b]),
    'sinkhorn_matching': lambda s, a, b: permute.sinkhorn_matching(
        s, a, b, key=KEY, steps=1),
    'ste_matching': lambda s, a, b: permute.ste_matching(
        s, a, b, lambda p, x: jnp.float32(0.0), [jnp.ones((2, 4))], steps=1),
    'permute_align': lambda s, a, b: mj.merge(
        mj.chain(permute.permute_align(s), mj.transforms.mean()), a, [a, b]),
    'apply_permutation': lambda s, a, b: permute.apply_permutation(
        s, {'P_0': jnp.arange(6), 'P_1': jnp.arange(5), 'P_2': jnp.arange(3)},
        b),
    'identity_permutations': lambda s, a, b: permute.identity_permutations(
        s, a),
    'random_permutations': lambda s, a, b: permute.random_permutations(
        s, a, KEY),
    'soft_apply_permutation': lambda s, a, b: permute.soft_apply_permutation(
        s, {'P_0': jnp.eye(6), 'P_1': jnp.eye(5), 'P_2': jnp.eye(3)}, b),
}


@pytest.mark.parametrize('entry', list(_ENTRY_POINTS))
def test_spec_for_a_deeper_mlp_is_refused_naming_the_extra_layer(entry):
  # mlp_spec(3) on a 2-hidden-layer MLP would make 'P_2' permute the output
  # logits (Dense_2's outputs) with nothing undoing it.
  a, b = _two_hidden_mlps()
  with pytest.raises(ValueError, match=r"Dense_3/kernel"):
    _ENTRY_POINTS[entry](permute.mlp_spec(3), a, b)


@pytest.mark.parametrize('entry', list(_ENTRY_POINTS))
def test_spec_for_a_shallower_mlp_is_refused_naming_the_missing_layer(entry):
  a, b = _two_hidden_mlps()
  with pytest.raises(ValueError, match=r'Dense_2/(kernel|bias)'):
    _ENTRY_POINTS[entry](permute.mlp_spec(1), a, b)


def test_group_on_output_units_is_refused():
  # The layers match, but the last layer's output axis carries a group.
  a, _ = _two_hidden_mlps()
  axes = permute.mlp_spec(2).axes
  axes['Dense_2/kernel'] = ('P_1', 'P_out')
  axes['Dense_2/bias'] = ('P_out',)
  with pytest.raises(ValueError, match=r"P_out.*one layer only"):
    permute.weight_matching(permute.PermutationSpec(axes), a, a)


def test_matching_spec_keeps_the_function():
  a, b = _two_hidden_mlps()
  res = permute.weight_matching(permute.mlp_spec(2), a, b)
  x = jax.random.normal(KEY, (3, 4))
  m = M.MLP((6, 5))
  np.testing.assert_allclose(
      m.apply({'params': permute.apply_permutation(
          permute.mlp_spec(2), res, b)}, x),
      m.apply({'params': b}, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('perm, match', [
    ([0, 0, 1, 2, 3, 4], r'repeated indices \[0\]'),
    ([0, 1, 2, 3, 4, 6], r'out-of-range indices \[6\]'),
    ([0., 1., 2., 3., 4., 5.], 'dtype float'),
])
def test_apply_permutation_rejects_malformed_permutations(perm, match):
  spec = permute.mlp_spec(1)
  a = {'Dense_0': {'kernel': jnp.ones((4, 6)), 'bias': jnp.zeros(6)},
       'Dense_1': {'kernel': jnp.ones((6, 2)), 'bias': jnp.zeros(2)}}
  with pytest.raises(ValueError, match=match):
    permute.apply_permutation(spec, {'P_0': np.asarray(perm)}, a)


def test_weight_matching_rejects_a_non_permutation_start():
  spec = permute.mlp_spec(1)
  a = {'Dense_0': {'kernel': jnp.ones((4, 6)), 'bias': jnp.zeros(6)},
       'Dense_1': {'kernel': jnp.ones((6, 2)), 'bias': jnp.zeros(2)}}
  with pytest.raises(ValueError, match='repeated indices'):
    permute.weight_matching(spec, a, a, init_permutations={
        'P_0': np.array([0, 1, 1, 2, 3, 4])})


@pytest.mark.parametrize('build, match', [
    (lambda: permute.mlp_spec(-1), 'num_hidden'),
    (lambda: permute.cnn_spec(-1), 'num_convs'),
    (lambda: permute.cnn_spec(2, num_dense=0), 'num_dense'),
    (lambda: permute.cnn_spec(2, norm='layernorm'), 'norm must be one of'),
    (lambda: permute.resnet_spec(()), 'stage_sizes is empty'),
    (lambda: permute.resnet_spec((2, 0)), 'stage size'),
    (lambda: permute.transformer_spec(-2), 'num_layers'),
    (lambda: permute.mlp_network(-1), 'num_hidden'),
    (lambda: permute.cnn_network(1, 0), 'num_dense'),
    (lambda: permute.resnet_network((1, -1)), 'stage size'),
])
def test_spec_builders_reject_invalid_sizes(build, match):
  # Before, negative counts built an empty spec: merges then silently
  # permuted nothing.
  with pytest.raises(ValueError, match=match):
    build()
