"""Evolutionary search: convergence, determinism, kill-and-resume, sharding."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing

pytest.importorskip('evosax', reason='pip install "mergejax[search]"')

S = mj.search
TARGET = {'task': jnp.array([0.3, -0.2, 0.5]), 'layer': jnp.ones((2, 3)) * 0.1}
X0 = jax.tree.map(jnp.zeros_like, TARGET)


def _fitness(c):
  return -sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(c),
                                                     jax.tree.leaves(TARGET)))


GA = dict(strategy='SimpleGA', params=None, init_std=0.2,
          strategy_kwargs={'std_schedule': optax.exponential_decay(0.1, 10, 0.5)})


def _run(**kw):
  kw = dict(dict(key=jax.random.key(3), generations=6, population_size=8,
                 params={'std_init': 0.2}, progress=False), **kw)
  return S.evolve(_fitness, X0, **kw)


def _same(a, b):
  testing.assert_trees_close(a.best, b.best, rtol=0, atol=0)
  assert a.best_fitness == b.best_fitness and a.evaluations == b.evaluations
  for name in ('generation', 'best', 'mean', 'best_so_far', 'evaluations'):
    np.testing.assert_array_equal(a.history[name], b.history[name])
  la, lb = jax.tree.leaves(a.state), jax.tree.leaves(b.state)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('kw', [dict(strategy='CMA_ES'),
                                dict(strategy='Sep_CMA_ES'), GA],
                         ids=['CMA_ES', 'Sep_CMA_ES', 'SimpleGA'])
def test_strategies_find_a_quadratics_optimum(kw):
  r = _run(generations=60, population_size=16, **kw)
  assert r.best_fitness > -2e-3, (kw, r.best_fitness)
  assert r.best['layer'].shape == (2, 3)
  assert np.all(np.diff(r.history['best_so_far']) >= 0)
  assert r.history['evaluations'][-1] == r.evaluations
  # The best reported is the fitness of the candidate returned.
  np.testing.assert_allclose(float(_fitness(r.best)), r.best_fitness,
                             rtol=1e-6)


def test_minimize_is_maximize_of_the_negation():
  up = _run()
  down = S.evolve(lambda c: -_fitness(c), X0, key=jax.random.key(3),
                  generations=6, population_size=8, params={'std_init': 0.2},
                  progress=False, maximize=False)
  testing.assert_trees_close(up.best, down.best, rtol=0, atol=0)
  assert up.best_fitness == -down.best_fitness


def test_fixed_seed_is_reproducible_and_seeds_differ():
  _same(_run(), _run())
  assert not np.array_equal(_run().history['best'],
                            _run(key=jax.random.key(4)).history['best'])


@pytest.mark.parametrize('every, stop_after', [(1, 3), (2, 3), (4, 1)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, every,
                                                       stop_after):
  full = _run()

  def interrupt(g, row):
    if g == stop_after:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _run(checkpoint_dir=str(tmp_path), checkpoint_every=every,
         callback=interrupt)
  resumed = _run(checkpoint_dir=str(tmp_path), checkpoint_every=every)
  _same(resumed, full)
  # Running again after the end resumes at the end: nothing more to do.
  _same(_run(checkpoint_dir=str(tmp_path)), full)


def test_killed_process_resumes_to_the_same_result(tmp_path):
  """SIGKILL mid-search (no cleanup at all), then resume in this process."""
  marker = tmp_path / 'gen'
  script = textwrap.dedent(f'''
      import time, jax, jax.numpy as jnp, mergejax as mj
      import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
      from test_evolve import _fitness, X0
      def slow(g, row):
        open({str(marker)!r}, 'w').write(str(g))
        if g >= 2:
          time.sleep(60)
      mj.search.evolve(_fitness, X0, key=jax.random.key(3), generations=6,
                       population_size=8, params={{'std_init': 0.2}},
                       progress=False, checkpoint_dir={str(tmp_path / 'ck')!r},
                       callback=slow)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', script])
  try:
    for _ in range(1200):
      if marker.exists() and marker.read_text() == '2':
        break
      if proc.poll() is not None:
        pytest.fail(f'the search process exited early ({proc.returncode})')
      jax.numpy.zeros(()).block_until_ready()
      import time  # pylint: disable=g-import-not-at-top
      time.sleep(0.1)
    else:
      pytest.fail('the search process never reached generation 2')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed = _run(checkpoint_dir=str(tmp_path / 'ck'))
  _same(resumed, _run())


def test_population_based_start_counts_its_evaluations():
  r = _run(generations=3, **GA)
  assert r.evaluations == 8 * 4 and r.history['evaluations'][0] == 16


def test_population_based_resume(tmp_path):
  def interrupt(g, row):
    if g == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _run(checkpoint_dir=str(tmp_path), callback=interrupt, **GA)
  _same(_run(checkpoint_dir=str(tmp_path), **GA), _run(**GA))


def test_one_compile_across_generations():
  with testing.log_compilations() as log:
    _run(generations=5)
  assert log.count('run') == 1


def test_sharded_search_equals_unsharded():
  mesh = mj.parallel.make_mesh((2, 4))
  _same(_run(mesh=mesh, chunk_size=1), _run())


def test_non_finite_fitness_counts_as_worst():
  def fitness(c):
    f = _fitness(c)
    return jnp.where(c['task'][0] > 0.35, jnp.nan, f)

  r = S.evolve(fitness, X0, key=jax.random.key(0), generations=30,
               population_size=8, params={'std_init': 0.2}, progress=False)
  assert np.isfinite(r.best_fitness) and float(r.best['task'][0]) <= 0.35


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match='unknown strategy'):
    _run(strategy='NoSuchES')
  with pytest.raises(ValueError, match=r"no parameters \['sigma'\]"):
    _run(params={'sigma': 1.0})
  with pytest.raises(ValueError, match=r"non-float leaves: \{'n': 'int32'\}"):
    S.evolve(_fitness, {'n': jnp.arange(3)}, key=jax.random.key(0),
             generations=1, population_size=4, progress=False)
  with pytest.raises(ValueError, match='population_size must be an int >= 2'):
    _run(population_size=1)
  with pytest.raises(ValueError, match='key must be'):
    _run(key=jnp.zeros(2, jnp.float32))
  with pytest.raises(ValueError, match='must return a scalar'):
    S.evolve(lambda c: c['task'], X0, key=jax.random.key(0), generations=1,
             population_size=4, progress=False)
  _run(checkpoint_dir=str(tmp_path), generations=2)
  with pytest.raises(ValueError, match='another search'):
    _run(checkpoint_dir=str(tmp_path), population_size=6)
