"""M2N2 against plain definitions: fitness, attraction, crossover, archive."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

S = mj.search


def _plain_fitness(s, alpha):
  z = s.sum(axis=0) ** alpha
  z[s.sum(axis=0) == 0] = 1.0
  return np.array([sum(s[i, j] / z[j] for j in range(s.shape[1]))
                   for i in range(s.shape[0])])


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0, 2.0])
def test_fitness_and_attraction_are_the_plain_sums(alpha):
  rng = np.random.default_rng(int(alpha * 10))
  s = (rng.uniform(size=(6, 9)) > 0.5).astype(np.float32)
  s[:, 3] = 0  # a point nobody solves
  np.testing.assert_allclose(S.niche_fitness(s, alpha), _plain_fitness(s,
                                                                       alpha),
                             rtol=1e-5)
  z = s.sum(axis=0) ** alpha
  z[s.sum(axis=0) == 0] = 1.0
  for a in range(6):
    want = [sum(max(0.0, s[b, j] / z[j] - s[a, j] / z[j])
                for j in range(9)) for b in range(6)]
    np.testing.assert_allclose(S.attraction(s, a, alpha), want, rtol=1e-5,
                               atol=1e-6)


def _plain_slerp(a, b, t):
  omega = np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                            -1, 1))
  return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_crossover_is_slerp_with_a_split():
  rng = np.random.default_rng(0)
  a = rng.normal(size=7).astype(np.float32)
  b = rng.normal(size=7).astype(np.float32)
  key = jax.random.key(3)
  w = float(jax.random.uniform(jax.random.split(key)[1], ()))
  # No split (s = n): every coordinate at w, i.e. SLERP(a, b; w).
  np.testing.assert_allclose(S.crossover(a, b, key, split_point=False),
                             _plain_slerp(a, b, w), rtol=1e-5, atol=1e-6)
  # With a split: a prefix at w, the rest at 1 - w.
  s = int(jax.random.randint(jax.random.split(key)[0], (), 0, 7))
  want = np.where(np.arange(7) < s, _plain_slerp(a, b, w),
                  _plain_slerp(a, b, 1 - w))
  np.testing.assert_allclose(S.crossover(a, b, key), want, rtol=1e-5,
                             atol=1e-6)
  # A pytree orders its coordinates leaf by leaf, like the flat vector.
  tree = lambda v: {'p': v[:3], 'q': v[3:].reshape(2, 2)}
  got = S.crossover(tree(a), tree(b), key)
  np.testing.assert_allclose(np.concatenate([got['p'], got['q'].ravel()]),
                             want, rtol=1e-5, atol=1e-6)
  # Parallel parents: the linear fallback, and a child equal to them.
  np.testing.assert_allclose(S.crossover(a, a, key), a, rtol=1e-6)


def test_a_child_better_on_every_point_enters_the_archive():
  # Member (1, 0) solves point 0, member (0, 1) point 1; each attracts the
  # other, and any child strictly between them solves every point.
  pop = {'v': jnp.array([[1.0, 0.0], [0.0, 1.0]])}

  def score(m):
    v = m['v'] > 1e-6
    both = jnp.all(v)
    return jnp.stack([v[0], v[1], both, both, both]).astype(jnp.float32)

  for seed in range(5):
    r = S.m2n2(score, pop, jax.random.key(seed), steps=1)
    assert bool(r.history['accepted'][0])
    row = int(np.argmax(np.asarray(r.scores).sum(axis=1)))
    np.testing.assert_array_equal(r.scores[row], np.ones(5))
    assert np.all(np.asarray(r.archive['v'][row]) > 0)


def test_deterministic_and_compiled_once_across_alphas():
  target = jnp.array([1., -1., 1., -1., 1., 1.])
  score = lambda m: (jnp.sign(m['w']) == target).astype(jnp.float32)
  pop = {'w': jax.random.normal(jax.random.key(0), (6, 6))}
  kw = dict(steps=40, mutation_std=0.1)
  r1 = S.m2n2(score, pop, jax.random.key(1), **kw)
  r2 = S.m2n2(score, pop, jax.random.key(1), **kw)
  np.testing.assert_array_equal(r1.archive['w'], r2.archive['w'])
  r3 = S.m2n2(score, pop, jax.random.key(2), **kw)
  assert not np.array_equal(r1.archive['w'], r3.archive['w'])
  with mj.testing.log_compilations() as log:
    for alpha in (0.0, 0.5, 2.0):
      S.m2n2(score, pop, jax.random.key(1), alpha=alpha, **kw)
  assert log.count('_run') == 0  # alpha and mutation_std are traced
  assert r1.history['best'].shape == (40,)


def test_best_member_never_gets_worse_without_niches():
  # With alpha = 0 the fitness is the total score, so the best member can
  # only be replaced by a better child: the best score is monotone.
  target = jnp.linspace(-1, 1, 12)
  score = lambda m: (jnp.abs(m['w'] - target) < 0.3).astype(jnp.float32)
  pop = {'w': jax.random.normal(jax.random.key(0), (8, 12))}
  r = S.m2n2(score, pop, jax.random.key(4), steps=150, alpha=0.0,
             mutation_std=0.05)
  assert np.all(np.diff(r.history['best']) >= 0)
  assert r.history['best'][-1] > r.history['best'][0]


def test_bad_archives_raise():
  score = lambda m: jnp.ones(3)
  with pytest.raises(ValueError, match='P >= 2'):
    S.m2n2(score, {'w': jnp.zeros((1, 3))}, jax.random.key(0), steps=1)
  with pytest.raises(ValueError, match='float'):
    S.m2n2(score, {'w': jnp.zeros((4, 3), jnp.int32)}, jax.random.key(0),
           steps=1)
  with pytest.raises(ValueError, match=r'scores \[J\]'):
    S.m2n2(lambda m: jnp.ones((2, 2)), {'w': jnp.zeros((4, 3))},
           jax.random.key(0), steps=1)
  with pytest.raises(ValueError, match='steps'):
    S.m2n2(score, {'w': jnp.zeros((4, 3))}, jax.random.key(0), steps=0)


def _sign_problem():
  target = jnp.array([1., -1., 1., -1., 1., 1., -1., 1.])
  score = lambda m: (jnp.sign(m['w']) == target).astype(jnp.float32)
  return score, {'w': jax.random.normal(jax.random.key(5), (6, 8))}


_SCORE, _POP = _sign_problem()


def _same(a, b):
  np.testing.assert_array_equal(a.archive['w'], b.archive['w'])
  np.testing.assert_array_equal(a.scores, b.scores)
  for k in a.history:
    np.testing.assert_array_equal(a.history[k], b.history[k])


@pytest.mark.parametrize('every', [1, 7, 30])
def test_segments_and_resume_equal_one_run(tmp_path, every):
  kw = dict(steps=30, mutation_std=0.1)
  full = S.m2n2(_SCORE, _POP, jax.random.key(1), **kw)
  _same(S.m2n2(_SCORE, _POP, jax.random.key(1), checkpoint_every=every, **kw),
        full)
  # Interrupted after the first segment (a shorter run into the directory),
  # then resumed with the full length: the uninterrupted result.
  part = S.m2n2(_SCORE, _POP, jax.random.key(1), checkpoint_dir=str(tmp_path),
                checkpoint_every=every, **dict(kw, steps=min(every, 29)))
  assert len(part.history['best']) == min(every, 29)
  resumed = S.m2n2(_SCORE, _POP, jax.random.key(1),
                   checkpoint_dir=str(tmp_path), checkpoint_every=every,
                   progress=True, **kw)
  _same(resumed, full)
  with pytest.raises(ValueError, match='another key'):
    S.m2n2(_SCORE, _POP, jax.random.key(2), checkpoint_dir=str(tmp_path),
           **kw)
  with pytest.raises(ValueError, match='another search'):
    S.m2n2(_SCORE, _POP, jax.random.key(1), checkpoint_dir=str(tmp_path),
           matchmaker=False, **kw)


def test_killed_process_resumes_to_the_same_result(tmp_path):
  script = textwrap.dedent(f'''
      import os, jax, jax.numpy as jnp
      import mergejax as mj
      target = jnp.array([1., -1., 1., -1., 1., 1., -1., 1.])
      score = lambda m: (jnp.sign(m['w']) == target).astype(jnp.float32)
      pop = {{'w': jax.random.normal(jax.random.key(5), (6, 8))}}
      import mergejax.search._evolve as E
      save = E.Checkpoints.save
      def save_then_die(self, *a, **k):
        save(self, *a, **k)
        os._exit(9)
      E.Checkpoints.save = save_then_die
      mj.search.m2n2(score, pop, jax.random.key(1), steps=30,
                     mutation_std=0.1, checkpoint_dir={str(tmp_path)!r},
                     checkpoint_every=10)
      ''')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 9, proc.stderr[-2000:]
  kw = dict(steps=30, mutation_std=0.1)
  resumed = S.m2n2(_SCORE, _POP, jax.random.key(1),
                   checkpoint_dir=str(tmp_path), checkpoint_every=10, **kw)
  _same(resumed, S.m2n2(_SCORE, _POP, jax.random.key(1), **kw))


def test_static_settings_reject_booleans_and_floats():
  with pytest.raises(ValueError, match=r'm2n2: steps must be an int >= 1, '
                     r'got True'):
    S.m2n2(_SCORE, _POP, jax.random.key(0), steps=True)
  with pytest.raises(ValueError, match='checkpoint_every must be an int'):
    S.m2n2(_SCORE, _POP, jax.random.key(0), steps=4, checkpoint_every=2.5)
  with pytest.raises(ValueError, match='map_search: dimension must be'):
    S.map_search(lambda c: c, True, jax.random.key(0))
  with pytest.raises(ValueError, match='nested_map: evaluate must be'):
    S.nested_map(None, 2, jax.random.key(0))
