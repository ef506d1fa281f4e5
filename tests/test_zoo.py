"""Tests of the digits zoo: tasks, evaluation and the orbax cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import zoo

TASKS = ('rot90', 'rot180', 'rot270', 'hflip', 'vflip', 'transpose', 'invert',
         'permute', 'shift', 'noise', 'quadrants')


@pytest.fixture(scope='module')
def digits():
  return zoo.load_digits(jax.random.key(0))


def test_splits_are_disjoint_and_cover_the_data(digits):
  sizes = [len(s.y) for s in digits]
  assert sum(sizes) == 1797 and min(sizes) > 100
  # Images are distinct rows of the data set (up to a few exact duplicates);
  # check the splits share no index by hashing rows.
  rows = [set(map(bytes, np.asarray(s.x, np.float32))) for s in digits]
  for a, b in itertools.combinations(rows, 2):
    assert len(a & b) <= 3


def test_tasks_are_distinct_and_keep_labels(digits):
  tasks = zoo.make_tasks(digits, TASKS, jax.random.key(1))
  assert [t.name for t in tasks] == list(TASKS)
  for t in tasks:
    np.testing.assert_array_equal(t.test.y, digits.test.y)
    assert t.train.x.shape == digits.train.x.shape
    assert t.train.x.dtype == np.float32
    assert 0.0 <= t.train.x.min() and t.train.x.max() <= 1.0
  for a, b in itertools.combinations(tasks, 2):
    # Two tasks differ on (almost) every image.
    differ = np.any(np.abs(a.test.x - b.test.x) > 1e-6, axis=1).mean()
    assert differ > 0.95, (a.name, b.name, differ)
  # And none of them is the untransformed data.
  for t in tasks:
    assert np.any(np.abs(t.test.x - digits.test.x) > 1e-6, axis=1).mean() > 0.95


def test_transforms_do_what_they_say():
  x = np.arange(64, dtype=np.float32)[None] / 64
  img = x.reshape(8, 8)
  f = lambda n: zoo.make_transform(n, jax.random.key(0))(x).reshape(8, 8)
  np.testing.assert_array_equal(f('rot180'), img[::-1, ::-1])
  np.testing.assert_array_equal(f('hflip'), img[:, ::-1])
  np.testing.assert_array_equal(f('transpose'), img.T)
  np.testing.assert_array_equal(f('rot90'), np.rot90(img))
  np.testing.assert_allclose(f('invert'), 1 - img)
  np.testing.assert_array_equal(np.sort(f('permute').ravel()), x[0])
  with pytest.raises(ValueError, match='Unknown task transform.*known'):
    zoo.make_transform('rot45', jax.random.key(0))


def test_tasks_are_deterministic(digits):
  a = zoo.make_tasks(digits, ('permute', 'noise'), jax.random.key(3))
  b = zoo.make_tasks(digits, ('permute', 'noise'), jax.random.key(3))
  c = zoo.make_tasks(digits, ('permute', 'noise'), jax.random.key(4))
  for ta, tb, tc in zip(a, b, c):
    np.testing.assert_array_equal(ta.train.x, tb.train.x)
    assert not np.allclose(ta.train.x, tc.train.x)
  assert zoo.load_digits(jax.random.key(0)).test.y.tolist() == zoo.load_digits(
      jax.random.key(0)).test.y.tolist()
  with pytest.raises(ValueError, match='distinct'):
    zoo.make_tasks(digits, ('rot90', 'rot90'), jax.random.key(0))


def test_load_or_train_caches(tmp_path):
  tree = {'a': jnp.arange(3.0), 'b': {'c': jnp.ones((2, 2))}}
  abstract = jax.eval_shape(lambda: tree)
  calls = []

  def train():
    calls.append(1)
    return tree

  path = str(tmp_path / 'zoo' / 'h')
  out, cached = zoo.load_or_train(path, train, abstract)
  assert not cached and calls == [1]
  out, cached = zoo.load_or_train(path, lambda: 1 / 0, abstract)
  assert cached
  jax.tree.map(np.testing.assert_array_equal, out, tree)
  # No temporary directory is left behind next to the checkpoint.
  assert sorted(p.name for p in (tmp_path / 'zoo').iterdir()) == ['h']
