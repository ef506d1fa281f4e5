"""Tests of the transformation contract, combinators, checks and `merge`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing


def _zoo(k=3, dtype=jnp.float32, seed=0):
  return testing.random_models(k=k, dtype=dtype, seed=seed)


def test_task_arithmetic_matches_numpy():
  base, models = _zoo()
  out = mj.merge(mj.methods.task_arithmetic(weight=[1., 2., 3.], lambda_=0.3), base, models)
  ref = jax.tree.map(lambda b, *ms: b + 0.3 * sum(w * (m - b) for w, m in zip([1, 2, 3], ms)),
                     base, *models)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, ref)


def test_result_has_base_dtype_and_structure():
  base, models = _zoo(dtype=jnp.bfloat16)
  out = mj.merge(mj.methods.task_arithmetic(), base, models)
  assert jax.tree.structure(out) == jax.tree.structure(base)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_no_recompile_across_hyperparameters():
  base, models = _zoo()
  mj.merge(mj.methods.task_arithmetic(lambda_=0.1), base, models)
  with testing.log_compilations() as log:
    for lam in (0.2, 0.5, 1.5):
      mj.merge(mj.methods.task_arithmetic(lambda_=lam, weight=[lam, 1., 1.]), base, models)
  assert log.count('_run') == 0


def test_vmapped_sweep_equals_loop():
  base, models = _zoo()
  lams = jnp.array([0.0, 0.3, 1.0])
  sweep = jax.jit(jax.vmap(
      lambda l: mj.merge(mj.methods.task_arithmetic(lambda_=l), base, models)))(lams)
  for i, lam in enumerate(lams):
    single = mj.merge(mj.methods.task_arithmetic(lambda_=float(lam)), base, models)
    jax.tree.map(lambda s, o: np.testing.assert_allclose(s[i], o, rtol=1e-6, atol=1e-6),
                 sweep, single)


def test_named_chain_state_and_partition():
  base, models = _zoo()
  tx = mj.named_chain(('tv', mj.transforms.task_vectors()), ('sum', mj.transforms.weighted_sum()),
                      ('scale', mj.transforms.scale(0.5)), ('add', mj.transforms.apply_to_base()))
  _, state = mj.merge(tx, base, models, return_state=True)
  assert float(state['scale'].factor) == 0.5
  tx = mj.partition({'ta': mj.methods.task_arithmetic(), 'avg': mj.methods.average()},
                    [(r'^head', 'avg'), (r'.*', 'ta')])
  out = mj.merge(tx, base, models)
  np.testing.assert_allclose(out['head'], np.mean([m['head'] for m in models], 0), rtol=1e-5)
  with pytest.raises(ValueError, match='enc/bias'):
    mj.merge(mj.partition({'avg': mj.methods.average()}, [(r'kernel', 'avg'), (r'head', 'avg')]),
             base, models)


def test_masked_leaves_other_leaves_alone():
  base, models = _zoo()
  tx = mj.chain(mj.transforms.task_vectors(), mj.masked(mj.transforms.scale(0.0), r'kernel$'), mj.transforms.mean(),
                mj.transforms.apply_to_base())
  out = mj.merge(tx, base, models)
  np.testing.assert_allclose(out['enc']['kernel'], base['enc']['kernel'])
  np.testing.assert_allclose(out['head'], np.mean([m['head'] for m in models], 0), rtol=1e-5)


@pytest.mark.parametrize('mutate, match', [
    (lambda m: {**m, 'head': m['head'][:3]}, r"models\[1\] leaf 'head' has shape"),
    (lambda m: {**m, 'head': m['head'].astype(jnp.int32)}, r"'head' has dtype int32"),
    (lambda m: {**m, 'head': m['head'][:0]}, r"'head' has zero-size shape \(0, 2\)"),
    (lambda m: {'enc': m['enc']}, 'different tree structure'),
    (lambda m: {**m, 'head': m['head'].at[0, 0].set(jnp.inf)}, r"'head'.*NaN/Inf"),
])
def test_bad_input_names_the_leaf(mutate, match):
  base, models = _zoo()
  models[1] = mutate(models[1])
  with pytest.raises(ValueError, match=match):
    mj.merge(mj.methods.task_arithmetic(), base, models)


def test_mixed_precision_models_are_cast_to_the_base_dtype_with_a_warning():
  base, models = _zoo()
  mixed = [models[0], {**models[1], 'head': models[1]['head'].astype(
      jnp.bfloat16)}, models[2]]
  with pytest.warns(UserWarning, match=r"models\[1\] leaf 'head' is bfloat16"):
    out = mj.merge(mj.methods.task_arithmetic(), base, mixed)
  cast = [models[0], {**models[1], 'head': models[1]['head'].astype(
      jnp.bfloat16).astype(jnp.float32)}, models[2]]
  testing.assert_trees_close(out, mj.merge(mj.methods.task_arithmetic(), base,
                                           cast), rtol=0, atol=0)
  assert out['head'].dtype == jnp.float32


@pytest.mark.parametrize('make, k, bad', [
    (lambda v: mj.methods.ties(density=v), 3, (float('nan'), -0.5, 1.5)),
    (lambda v: mj.methods.task_arithmetic(lambda_=v), 3, (float('nan'),
                                                          float('inf'))),
    (lambda v: mj.methods.breadcrumbs(density=0.5, gamma=v), 3,
     (float('nan'),)),
    (lambda v: mj.methods.slerp(t=v), 1, (float('nan'),)),
])
def test_traced_hyperparameters_out_of_range_stop_the_merge(make, k, bad):
  base, models = _zoo()
  run = jax.jit(lambda v: mj.merge(make(v), base, models[:k]))
  jax.block_until_ready(run(0.5))  # in range: runs
  for v in bad:
    with pytest.raises(Exception, match='must (lie in|be finite).*traced'):
      jax.block_until_ready(run(v))
    with pytest.raises(ValueError, match='must (lie in|be finite)'):
      make(v)  # concrete: raises at once


def test_empty_hyperparameter_lists_are_rejected():
  with pytest.raises(ValueError, match='density is empty'):
    mj.methods.ties(density=[])


def test_empty_models_and_bad_weights():
  base, models = _zoo()
  with pytest.raises(ValueError, match='models is empty'):
    mj.merge(mj.methods.task_arithmetic(), base, [])
  with pytest.raises(ValueError, match=r'weights has shape \(2,\) but there are 3 models'):
    mj.merge(mj.methods.task_arithmetic(weight=[1., 2.]), base, models)
  with pytest.raises(ValueError, match='sum to zero'):
    mj.methods.linear(weight=[1., -1.])


def test_unreduced_chain_is_an_error():
  base, models = _zoo()
  with pytest.raises(ValueError, match='remove the model axis'):
    mj.merge(mj.transforms.task_vectors(), base, models)


@pytest.mark.parametrize('value', [None, 'high', [1.0, [2.0]]])
def test_check_hparam_rejects_non_numbers_naming_them(value):
  with pytest.raises(TypeError, match="density must be a number"):
    mj.check_hparam(value, 'density', low=0.0, high=1.0)


def test_partition_label_that_selects_nothing_is_skipped():
  base = {'a': {'kernel': jnp.zeros((2, 2))}, 'b': {'bias': jnp.zeros(2)}}
  models = [jax.tree.map(lambda x, i=i: x + i + 1.0, base) for i in range(2)]
  # Every leaf is labelled 'avg': the 'ta' transformation has no leaves and
  # must not be initialised or run on an empty tree.
  tx = mj.partition({'ta': mj.methods.task_arithmetic(), 'avg': mj.methods.average()},
                    [(r'.*', 'avg')])
  testing.assert_trees_close(mj.merge(tx, base, models),
                             mj.merge(mj.methods.average(), None, models))
