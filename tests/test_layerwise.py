"""Layer-wise merge spaces against a plain per-block merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

S = mj.search


def _models(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  shapes = {'Dense_0': {'kernel': (3, 4), 'bias': (4,)},
            'Dense_1': {'kernel': (4, 2), 'bias': (2,)}, 'scale': (2,)}
  make = lambda: jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes,
      is_leaf=lambda s: isinstance(s, tuple))
  base = make()
  fts = [make() for _ in range(3)]
  merged = {'ta': mj.merge(mj.methods.task_arithmetic(), base, fts),
            'ties': mj.merge(mj.methods.ties(density=0.5), base, fts),
            'avg': mj.merge(mj.methods.linear(), None, fts)}
  return base, merged


def test_blocks_follow_the_layer_index():
  base, merged = _models()
  space = S.layerwise_space(base, merged)
  assert space.methods == ('ta', 'ties', 'avg') and space.num_blocks == 3
  blocks = dict(zip(mj.leaf_paths(base), space.blocks))
  assert blocks['Dense_0/kernel'] == blocks['Dense_0/bias'] == 0
  assert blocks['Dense_1/kernel'] == blocks['Dense_1/bias'] == 1
  assert blocks['scale'] == 2  # no index: the extra block
  one = S.layerwise_space(base, merged, block_of=lambda p: 0)
  assert one.num_blocks == 1


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_merge_is_the_plain_per_block_choice(dtype):
  base, merged = _models(dtype)
  space = S.layerwise_space(base, merged)
  rng = np.random.default_rng(1)
  pop = {'logits': jnp.asarray(rng.normal(size=(5, 3, 3)), jnp.float32),
         'weight': jnp.asarray(rng.uniform(size=(5, 3)), jnp.float32)}
  got = jax.jit(jax.vmap(lambda c: S.layerwise_merge(space, c)))(pop)
  names = list(merged)
  for i in range(5):
    for path, b in zip(mj.leaf_paths(base), space.blocks):
      m = names[int(np.argmax(pop['logits'][i, b]))]
      w = float(pop['weight'][i, b])
      x0 = np.asarray(mj.flatten_to_dict(base)[path], np.float32)
      xm = np.asarray(mj.flatten_to_dict(merged[m])[path], np.float32)
      want = (x0 + w * (xm - x0))
      leaf = mj.flatten_to_dict(got)[path][i]
      assert leaf.dtype == dtype
      np.testing.assert_allclose(np.asarray(leaf, np.float32), want,
                                 rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                                 atol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
  # Weight 1 with one method everywhere is that method's merge.
  c = S.layerwise_candidate(space, 1.0, method=1)
  mj.testing.assert_trees_close(S.layerwise_merge(space, c), merged['ties'],
                                rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                                atol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_a_search_finds_the_grid_argmax_of_a_one_block_space():
  base = {'w': jnp.zeros(3)}
  merged = {'good': {'w': jnp.array([1., 2., 3.])},
            'bad': {'w': jnp.array([-1., 0., 5.])}}
  space = S.layerwise_space(base, merged, block_of=lambda p: 0)
  target = jnp.array([0.5, 1.0, 1.5])  # 'good' at weight 0.5
  score = lambda c: -jnp.sum((S.layerwise_merge(space, c)['w'] - target) ** 2)
  grid = [{'logits': jnp.zeros((1, 2)).at[0, m].set(1.0),
           'weight': jnp.array([w])} for m in range(2)
          for w in np.linspace(0, 1, 21)]
  best_grid = max(grid, key=lambda c: float(score(c)))
  r = S.evolve(score, S.layerwise_candidate(space, 0.2, method=1),
               key=jax.random.key(0), generations=40, population_size=16,
               params={'std_init': 0.5}, progress=False)
  assert int(jnp.argmax(r.best['logits'][0])) == int(
      jnp.argmax(best_grid['logits'][0])) == 0
  np.testing.assert_allclose(r.best['weight'], best_grid['weight'], atol=0.03)


def test_bad_spaces_and_candidates_raise():
  base, merged = _models()
  with pytest.raises(ValueError, match='at least one'):
    S.layerwise_space(base, {})
  broken = dict(merged, ta={'Dense_0': merged['ta']['Dense_0']})
  with pytest.raises(ValueError, match="merged\\['ta'\\]"):
    S.layerwise_space(base, broken)
  space = S.layerwise_space(base, merged)
  with pytest.raises(ValueError, match='logits \\[3, 3\\]'):
    S.layerwise_merge(space, {'logits': jnp.zeros((2, 3)),
                              'weight': jnp.zeros(3)})
  with pytest.raises(ValueError, match='not an index'):
    S.layerwise_candidate(space, method=3)
