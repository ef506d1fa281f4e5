"""Sharded merges: rules, layouts, and sharded == unsharded for every method."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mergejax as mj
from mergejax import testing
from mergejax.parallel import _sharding as sh

RULES = [(r'embed', P(None, 'fsdp')),   # vocab x hidden: shard the hidden dim
         (r'norm', 'replicate'),
         (r'.*', 'fsdp')]               # largest divisible axis, else replicated

MESHES = [((8,), ('fsdp',)), ((4, 2), ('models', 'fsdp')),
          ((2, 4), ('models', 'fsdp'))]

# Hyperparameters for the methods that need some; every other public factory
# in `mergejax.methods` is called with its defaults. Methods are discovered at
# test time, so methods added later are covered without editing this file.
KWARGS = {
    'linear': dict(weight=[1., 3.]),
    'task_arithmetic': dict(weight=[1., -2.], lambda_=0.7),
    'ties': dict(density=0.3),
    'dare_linear': dict(density=0.5),
    'dare_ties': dict(density=0.5),
    'breadcrumbs': dict(density=0.5, gamma=0.1),
    'breadcrumbs_ties': dict(density=0.5, gamma=0.1),
    'della': dict(density=0.5, epsilon=0.1),
    'della_linear': dict(density=0.5, epsilon=0.1),
    'slerp': dict(t=0.3),
    'nearswap': dict(t=0.5),
    'nuslerp': dict(weight=[1., 2.]),
    'lines': dict(method=mj.methods.task_arithmetic(), beta=0.5),
    'reversible': dict(budget=2),
    'adamerging': dict(coefficients=jnp.array([0.3, 0.6])),
    'concrete': lambda base, models: dict(mask=jax.tree.map(
        lambda x: np.linspace(0., 2., x.size, dtype=np.float32).reshape(x.shape),
        base), lambda_=0.5),
    'concrete_adamerging': lambda base, models: dict(mask=jax.tree.map(
        lambda x: np.linspace(0., 2., x.size, dtype=np.float32).reshape(x.shape),
        base), coefficients=jnp.array([0.3, 0.6])),
    'regmean_plusplus': lambda base, models: dict(
        inputs_fn=lambda p, x: {'model.layers.0.mlp.up_proj.weight': x},
        models=models, batches=[[np.ones((4, 24), np.float32) * (i + 1)]
                                for i in range(len(models))], ridge=0.1),
    # Data-informed methods: statistics built from the test's models (K=2).
    'ota': lambda base, models: dict(second_moments=[
        jax.tree.map(lambda x: np.abs(x) + 0.1, m) for m in models]),
    'fisher_merging': lambda base, models: dict(fishers=[
        jax.tree.map(lambda x: np.abs(x) + 0.1, m) for m in models]),
    'regmean': lambda base, models: dict(grams=[
        {p: x @ x.T + np.eye(x.shape[0], dtype=np.float32)
         for p, x in m.items() if x.ndim == 2 and p.startswith('model.layers')}
        for m in models]),
    'rcp_merging': lambda base, models: dict(
        reasoning_fisher=jax.tree.map(lambda x: np.abs(x) + 0.2, base),
        domain_fishers=[jax.tree.map(lambda x: np.abs(x) + 0.1, m)
                        for m in models]),
    'mwa': lambda base, models: dict(metric=np.arange(1.0, len(models) + 1),
                                     kind='step'),
    'doge_ta': dict(steps=20),
}


# Functions in mergejax.methods that read a merge's state rather than build a
# transformation.
NOT_FACTORIES = {'reconstruct', 'twin_mix', 'twin_apply', 'twin_dense',
                 'twin_route', 'twin_train_router', 'fit_adamerging',
                 'prediction_entropy', 'fit_concrete', 'concrete_mask',
                 'fit_dam', 'fit_surgery', 'surgery_apply',
                 'fit_expert_merging', 'fit_concrete_adamerging',
                 'importance_chunks', 'wemoe_init', 'wemoe_apply',
                 'wemoe_gates', 'wemoe_dense', 'fit_wemoe', 'mwa_weights',
                 'mwa_tracker', 'mwa_optax', 't3_apply',
                 't3_coefficients', 'js_divergence',
                 'fit_fw_merging'}


def _method_names():
  names = []
  for name, fn in sorted(vars(mj.methods).items()):
    if (name.startswith('_') or not inspect.isfunction(fn)
        or name in NOT_FACTORIES):
      continue
    names.append(name)
  return names


def _zoo(k=4, dtype=np.float32, seed=0, small=False):
  """A small model with Llama-like names; dims divisible by 8 and not."""
  if small:  # fewer leaves: top-k methods compile one radix select per leaf
    shapes = {'model.embed_tokens.weight': (40, 16),
              'model.layers.0.mlp.up_proj.weight': (24, 16),
              'model.layers.0.mlp.odd.weight': (5, 3)}
  else:
    shapes = {'model.embed_tokens.weight': (40, 16),
              'model.layers.0.mlp.up_proj.weight': (24, 16),
              'model.layers.0.input_layernorm.weight': (16,),
              'model.layers.0.mlp.odd.weight': (5, 3),   # nothing divisible
              'lm_head.bias': (8,)}
  return testing.random_models(shapes, k, seed=seed, scale=0.5, dtype=dtype,
                               nested=False, as_numpy=True)


def _build(name, base, models):
  """The method's transformation; unknown arguments fail."""
  fn = getattr(mj.methods, name)
  kw = KWARGS.get(name, {})
  try:
    return fn(**(kw(base, models) if callable(kw) else kw))
  except TypeError as e:
    pytest.fail(f'{name}: no default hyperparameters known to this test ({e}); '
                'add them to KWARGS')


def _reference(tx, base, models, key):
  """The unsharded merge; tries with and without base, then 2 models."""
  errors = []
  for b, ms in ((base, models), (None, models), (base, models[:1]),
                (None, models[:2])):
    try:
      return b, ms, mj.merge(tx, b, ms, key=key)
    except (ValueError, TypeError) as e:
      errors.append(str(e).splitlines()[0][:200])
  pytest.fail(f'unsharded merge fails for every input form: {errors}')


def _assert_close(out, ref, atol=2e-5):
  testing.assert_trees_close(out, ref, rtol=2e-5, atol=atol)


_REFS = {}


def _case(name):
  """(transformation, base, models, key, unsharded result), cached per method."""
  if name not in _REFS:
    base, models = _zoo(k=2, small=True)
    tx = _build(name, base, models)
    key = jax.random.key(0)
    b, ms, ref = _reference(tx, base, models, key)
    _REFS[name] = (tx, b, ms, key, ref)
  return _REFS[name]


def _check_sharded(name, shape, names):
  tx, b, ms, key, ref = _case(name)
  mesh = sh.make_mesh(shape, names)
  out = mj.parallel.sharded_merge(tx, b, ms, key=key, mesh=mesh, rules=RULES)
  _assert_close(out, ref)
  for p, x in out.items():
    assert x.dtype == (ms[0] if b is None else b)[p].dtype, p


@pytest.mark.parametrize('name', _method_names())
def test_sharded_equals_unsharded_every_method(name):
  _check_sharded(name, *MESHES[2])   # (2, 4): K=2 models x fsdp


# One method per kind of step (reduction, top-k threshold, SVD, interpolation)
# on the other mesh shapes ((4, 2) with K=2: the stack is replicated along
# 'models' and the leaves sharded over 'fsdp').
@pytest.mark.parametrize('mesh', [MESHES[0], MESHES[1]], ids=['8', '4x2'])
@pytest.mark.parametrize('name', ['task_arithmetic', 'ties', 'tsv', 'slerp'])
def test_sharded_equals_unsharded_mesh_shapes(name, mesh):
  if not hasattr(mj.methods, name):
    pytest.fail(f'mergejax.methods.{name} does not exist')
  _check_sharded(name, *mesh)


# Methods whose state rebuilds every task model: the sharded state (masks,
# bases, factorised twin parts) must rebuild the same task models.
@pytest.mark.parametrize('name', ['emr', 'tall_masks', 'reversible', 'twin'])
def test_sharded_state_reconstructs_task_models(name):
  base, models = _zoo(k=2, small=True)
  tx = _build(name, base, models)
  _, ref_state = mj.merge(tx, base, models, return_state=True)
  _, state = mj.parallel.sharded_merge(tx, base, models, mesh=sh.make_mesh((2, 4)),
                              rules=RULES, return_state=True)
  for i in range(2):
    want = mj.methods.reconstruct(ref_state, base, i)
    _assert_close(mj.methods.reconstruct(state, base, i), want, atol=1e-4)
  if name == 'twin':
    w = jnp.array([0.3, 0.7])
    _assert_close(mj.methods.twin_mix(state, w),
                  mj.methods.twin_mix(ref_state, w), atol=1e-4)


def test_out_shardings_follow_rules():
  base, models = _zoo()
  mesh = sh.make_mesh((4, 2))
  out = mj.parallel.sharded_merge(mj.methods.task_arithmetic(), base, models, mesh=mesh,
                         rules=RULES)
  specs = sh.param_specs(base, mesh, RULES)
  assert specs['model.embed_tokens.weight'] == P(None, 'fsdp')
  assert specs['model.layers.0.mlp.up_proj.weight'] == P('fsdp', None)
  assert specs['model.layers.0.input_layernorm.weight'] == P()
  assert specs['model.layers.0.mlp.odd.weight'] == P()   # 5, 3: not divisible
  for p, x in out.items():
    assert x.sharding == NamedSharding(mesh, specs[p]), p


def test_stack_goes_on_models_axis_and_blocks_are_read_lazily():
  base, models = _zoo()
  reads = []

  class Lazy:
    """A lazily read tensor (like a safetensors slice) that logs its reads."""

    def __init__(self, x):
      self.x, self.shape, self.dtype = x, x.shape, x.dtype

    def __getitem__(self, idx):
      reads.append(np.asarray(self.x[idx]).size)
      return self.x[idx]

  lazy = [{p: Lazy(x) for p, x in m.items()} for m in models]
  mesh = sh.make_mesh((2, 4))
  specs = sh.param_specs(base, mesh, RULES)
  sspecs = jax.tree.map(lambda s: sh.stacked_spec(s, 4, mesh), specs,
                        is_leaf=lambda s: isinstance(s, P))
  stacked = sh.stack_sharded(lazy, mesh, sspecs)
  up = stacked['model.layers.0.mlp.up_proj.weight']
  assert up.sharding.spec == P('models', 'fsdp', None)
  np.testing.assert_array_equal(
      np.asarray(up), np.stack([m['model.layers.0.mlp.up_proj.weight']
                                for m in models]))
  # Every read of the fsdp-sharded leaf is a quarter of it.
  reads.clear()
  sh.stack_sharded([{'w': Lazy(m['model.layers.0.mlp.up_proj.weight'])}
                    for m in models], mesh, {'w': P('models', 'fsdp', None)})
  assert set(reads) == {24 * 16 // 4}
  # And the merge itself takes lazy inputs.
  out = mj.parallel.sharded_merge(mj.methods.task_arithmetic(), base, lazy, mesh=mesh,
                         rules=RULES)
  _assert_close(out, mj.merge(mj.methods.task_arithmetic(), base, models))


def test_model_axis_not_dividing_k_is_replicated():
  base, models = _zoo(k=3)
  mesh = sh.make_mesh((2, 4))
  assert sh.stacked_spec(P('fsdp'), 3, mesh) == P(None, 'fsdp')
  tx = mj.methods.task_arithmetic(weight=[1., -2., 3.])
  _assert_close(mj.parallel.sharded_merge(tx, base, models, mesh=mesh, rules=RULES),
                mj.merge(tx, base, models))


def test_bf16_inputs_keep_dtype_and_match():
  base, models = _zoo(dtype=jnp.bfloat16)
  tx = mj.methods.task_arithmetic(lambda_=0.5)
  out = mj.parallel.sharded_merge(tx, base, models, mesh=sh.make_mesh((4, 2)),
                         rules=RULES)
  ref = mj.merge(tx, base, models)
  for p in base:
    assert out[p].dtype == jnp.bfloat16
    # One bf16 ulp: the fp32 sums may round differently before the cast.
    np.testing.assert_allclose(np.asarray(out[p], np.float32),
                               np.asarray(ref[p], np.float32), rtol=8e-3,
                               atol=1e-6)


def test_no_recompile_across_hyperparameters():
  base, models = _zoo()
  mesh = sh.make_mesh((4, 2))
  run = lambda lam: mj.parallel.sharded_merge(  # pylint: disable=g-long-lambda
      mj.methods.task_arithmetic(weight=[lam, 1., 1., 2.], lambda_=lam), base,
      models, mesh=mesh, rules=RULES)
  run(0.1)
  n = sh._cache_size()
  outs = [run(lam) for lam in (0.2, 0.9)]
  assert sh._cache_size() == n
  assert not np.allclose(np.asarray(outs[0]['lm_head.bias']),
                         np.asarray(outs[1]['lm_head.bias']))


def test_explicit_axis_mesh_runs_as_auto():
  base, models = _zoo()
  mesh = jax.make_mesh((4, 2), ('models', 'fsdp'),
                       axis_types=(AxisType.Explicit,) * 2)
  tx = mj.methods.task_arithmetic()
  _assert_close(mj.parallel.sharded_merge(tx, base, models, mesh=mesh, rules=RULES),
                mj.merge(tx, base, models))


def test_radix_select_on_sharded_leaves_matches_unsharded():
  # The scatter-add histograms of a sharded leaf are partial per shard; XLA
  # must all-reduce them. Check thresholds, exact top-k masks with ties, and
  # a global threshold over two differently sharded leaves.
  rng = np.random.default_rng(1)
  x = np.round(rng.standard_normal((4, 64, 32)), 1).astype(np.float32)  # ties
  y = rng.standard_normal((4, 48)).astype(np.float32)
  mesh = sh.make_mesh((4, 2))
  xs = jax.device_put(x, NamedSharding(mesh, P('models', 'fsdp', None)))
  ys = jax.device_put(y, NamedSharding(mesh, P('models', 'fsdp')))

  def fn(a, b):
    mask = jax.vmap(lambda t: mj.transforms.topk_mask(t, 300))(a)
    kth = jax.vmap(lambda t: mj.transforms.kth_largest_magnitude(t, 77))(a)
    glob = mj.transforms.kth_largest_magnitude([a, b], 1000)
    return mask, kth, glob

  compiled = jax.jit(fn, out_shardings=(NamedSharding(mesh, P('models')),
                                        None, None)).lower(xs, ys).compile()
  sharded = compiled(xs, ys)
  plain = jax.jit(fn)(jnp.asarray(x), jnp.asarray(y))
  for s, p in zip(sharded, plain):
    np.testing.assert_array_equal(np.asarray(s), np.asarray(p))
  assert np.asarray(sharded[0]).sum(axis=(1, 2)).tolist() == [300] * 4
  assert 'all-reduce' in compiled.as_text()


def test_rule_errors_name_the_parameter():
  base, _ = _zoo()
  mesh = sh.make_mesh((4, 2))
  with pytest.raises(ValueError, match=r"odd.*does not divide"):
    sh.param_specs(base, mesh, [(r'odd', P('fsdp')), (r'.*', 'fsdp')])
  with pytest.raises(ValueError, match=r"mesh axis 'data'"):
    sh.param_specs(base, mesh, [(r'.*', P('data'))])
  with pytest.raises(ValueError, match=r"not known"):
    sh.param_specs(base, mesh, [(r'.*', 'shard_everything')])
  with pytest.raises(ValueError, match=r"No sharding rule matches"):
    sh.param_specs(base, mesh, [(r'embed', 'fsdp')])
  with pytest.raises(ValueError, match=r"2 axes"):
    sh.param_specs({'b': np.zeros(8)}, mesh, [(r'.*', P(None, 'fsdp'))])
  specs = sh.param_specs(base, mesh, [(r'.*', 'fsdp(axis="models")')])
  assert specs['model.layers.0.mlp.up_proj.weight'] == P('models', None)


def test_nonfinite_input_names_leaf_and_model():
  base, models = _zoo()
  models[2]['lm_head.bias'][3] = np.nan
  with pytest.raises(ValueError, match=r"models\[2\] leaf 'lm_head.bias'.*1 NaN"):
    mj.parallel.sharded_merge(mj.methods.task_arithmetic(), base, models,
                     mesh=sh.make_mesh((4, 2)), rules=RULES)


def test_make_mesh_validates_shape():
  with pytest.raises(ValueError, match='needs 6 devices'):
    sh.make_mesh((3, 2))
  assert dict(sh.make_mesh().shape) == {'models': 1, 'fsdp': 8}
