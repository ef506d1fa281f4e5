"""Population evaluation: a loop's results, one compile, chunks and shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

S = mj.search


def _problem(k=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {'a': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  fts = [jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape),
                                                jnp.float32), base)
         for _ in range(k)]
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, size=16), jnp.int32)

  def score(c):  # layer-wise coefficients -> accuracy and loss of the merge
    p = mj.merge(mj.methods.adamerging(c), base, fts)
    logits = x @ p['a'] + p['b'][None]
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])
    return {'acc': jnp.mean(jnp.argmax(logits, -1) == y).astype(jnp.float32),
            'loss': loss}

  pop = {'a': jnp.asarray(rng.uniform(size=(10, k)), jnp.float32),
         'b': jnp.asarray(rng.uniform(size=(10, k)), jnp.float32)}
  return score, pop


def _loop(score, pop):
  n = jax.tree.leaves(pop)[0].shape[0]
  outs = [score(jax.tree.map(lambda v, i=i: v[i], pop)) for i in range(n)]
  return jax.tree.map(lambda *v: jnp.stack(v), *outs)


@pytest.mark.parametrize('chunk_size', [None, 1, 3, 10, 64])
def test_equals_a_loop_of_merges(chunk_size):
  score, pop = _problem()
  testing.assert_trees_close(
      S.evaluate_population(score, pop, chunk_size=chunk_size),
      _loop(score, pop), rtol=1e-5, atol=1e-6)


def test_compiles_once_per_population_shape():
  score, pop = _problem()
  evaluate = S.population_evaluator(score, chunk_size=4)
  with testing.log_compilations() as log:
    first = evaluate(pop)
    again = evaluate(jax.tree.map(lambda v: v * 0.5, pop))
  assert log.count('run') == 1
  testing.assert_trees_close(again, _loop(score, jax.tree.map(
      lambda v: v * 0.5, pop)), rtol=1e-5, atol=1e-6)
  assert first['acc'].shape == (10,)


@pytest.mark.parametrize('shape, axis, chunk', [((1, 8), None, None),
                                                ((2, 4), 'fsdp', 3),
                                                ((2, 4), ('models', 'fsdp'), 1)])
def test_sharded_equals_unsharded(shape, axis, chunk):
  score, pop = _problem()
  mesh = mj.parallel.make_mesh(shape)
  got = S.evaluate_population(score, pop, chunk_size=chunk, mesh=mesh,
                              axis=axis)
  testing.assert_trees_close(got, S.evaluate_population(score, pop),
                             rtol=1e-5, atol=1e-6)


def test_bad_populations_raise_naming_the_leaf():
  score, pop = _problem()
  with pytest.raises(ValueError, match=r"'b': 9"):
    S.evaluate_population(score, dict(pop, b=pop['b'][:9]))
  with pytest.raises(ValueError, match=r"'b' is a scalar"):
    S.evaluate_population(score, dict(pop, b=jnp.float32(1.0)))
  with pytest.raises(ValueError, match='empty'):
    S.evaluate_population(score, jax.tree.map(lambda v: v[:0], pop))
  with pytest.raises(ValueError, match='chunk_size'):
    S.population_evaluator(score, chunk_size=0)
  with pytest.raises(ValueError, match='axis'):
    S.population_evaluator(score, mesh=mj.parallel.make_mesh((1, 8)),
                           axis='nope')
