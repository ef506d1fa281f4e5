"""Concrete masks and DAM (backdoor-aware merging) against their references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing
from mergejax import transforms as T

M = mj.methods


def _linear_zoo(k=3, d=6, c=3, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  base = {'w': f32(rng.standard_normal((d, c))), 'b': f32(np.zeros(c))}
  models = [jax.tree.map(lambda p: p + f32(0.5 * rng.standard_normal(p.shape)),
                         base) for _ in range(k)]
  x = f32(rng.standard_normal((32, d)))
  return base, models, x


def _logits(p, x):
  return x @ p['w'] + jnp.expand_dims(p['b'], tuple(range(x.ndim - 1)))


def test_concrete_with_an_all_ones_mask_is_task_arithmetic():
  base, models, _ = _linear_zoo()
  ones = jax.tree.map(jnp.ones_like, base)
  got = mj.merge(M.concrete(ones, lambda_=0.4), base, models)
  want = mj.merge(M.task_arithmetic(lambda_=0.4), base, models)
  testing.assert_trees_close(got, want, atol=1e-6)
  # The mask multiplies every task vector entry by entry.
  m = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(1).uniform(size=p.shape), jnp.float32), base)
  got = mj.merge(M.concrete(m, lambda_=1.0), base, models)
  want = jax.tree.map(lambda b, mm, *f: b + mm * sum(x - b for x in f),
                      base, m, *models)
  testing.assert_trees_close(got, want, atol=1e-5)


def test_shared_mask_checks_its_mask():
  u = {'w': jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"mask\['w'\] has shape \(2,\)"):
    T.shared_mask({'w': jnp.ones(2)}).update(u, T.shared_mask(
        {'w': jnp.ones(2)}).init(None))
  with pytest.raises(ValueError, match='non-finite'):
    T.shared_mask({'w': jnp.array([1., jnp.nan, 1.])})
  with pytest.raises(ValueError, match=r"missing \['w'\], extra \['v'\]"):
    m = {'v': jnp.ones(3)}
    T.shared_mask(m).update(u, T.shared_mask(m).init(None))


def test_concrete_mask_sample_normalisation_and_gradient():
  s = {'a': jnp.linspace(-2., 2., 7), 'b': jnp.full((2, 2), 30.)}
  key = jax.random.key(0)
  m = M.concrete_mask(s, key)
  for leaf in jax.tree.leaves(m):
    np.testing.assert_allclose(float(jnp.mean(leaf)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(m['b'], np.ones((2, 2)), atol=1e-6)
  # The sample is the sigmoid of logistic noise around the logits.
  u = jax.random.uniform(jax.random.split(key, 2)[0], (7,), minval=1e-6,
                         maxval=1 - 1e-6)
  raw = jax.nn.sigmoid((s['a'] + jnp.log(u) - jnp.log1p(-u)) / 0.5)
  np.testing.assert_allclose(M.concrete_mask(s, key, normalize=False)['a'],
                             raw, rtol=1e-5)
  # Reparameterised: the gradient at fixed noise matches finite differences.
  f = lambda a: jnp.sum(M.concrete_mask({'a': a}, key)['a'] * jnp.arange(7.))
  g = jax.grad(f)(s['a'])
  h = 1e-3
  for i in (0, 3, 6):
    e = jnp.zeros(7).at[i].set(h)
    fd = (f(s['a'] + e) - f(s['a'] - e)) / (2 * h)
    np.testing.assert_allclose(g[i], fd, rtol=2e-2, atol=1e-3)
  with pytest.raises(ValueError, match='temperature'):
    M.concrete_mask(s, temperature=0.0)


def test_fit_concrete_with_saturated_frozen_logits_is_task_arithmetic():
  base, models, x = _linear_zoo()
  loss = lambda p, xb: M.prediction_entropy(_logits(p, xb))
  res = M.fit_concrete(loss, base, models, [x], key=jax.random.key(0),
                       init_logit=30.0, steps=3, optimizer=optax.sgd(0.0),
                       lambda_=0.3)
  got = mj.merge(M.concrete(res.mask(), 0.3), base, models)
  testing.assert_trees_close(got, mj.merge(M.task_arithmetic(lambda_=0.3),
                                           base, models), atol=1e-5)


def test_fit_concrete_lowers_the_entropy_in_one_compile():
  base, models, x = _linear_zoo()
  loss = lambda p, xb: M.prediction_entropy(_logits(p, xb))
  with testing.log_compilations() as log:
    res = M.fit_concrete(loss, base, models, [x[:16], x[16:]],
                         key=jax.random.key(0), steps=60, learning_rate=5e-2)
  assert log.count('run') == 1
  assert res.losses[-10:].mean() < res.losses[:10].mean()
  assert jax.tree.structure(res.logits) == jax.tree.structure(base)


def test_fit_dam_without_the_adversarial_term_is_fit_concrete():
  base, models, x = _linear_zoo()
  key = jax.random.key(4)
  loss = lambda p, xb: M.prediction_entropy(_logits(p, xb))
  want = M.fit_concrete(loss, base, models, [x], key=key, steps=20,
                        learning_rate=1e-2)
  got = M.fit_dam(_logits, base, models, [x], key=key, epsilon=1.0,
                  input_range=None, adversarial_weight=0.0, steps=20,
                  learning_rate=1e-2)
  testing.assert_trees_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)


def _backdoored_zoo():
  """Clean data never use feature 5; the poisoned task vector wires it to class 0."""
  base, models, x = _linear_zoo()
  x = x.at[:, 5].set(0.0)
  trigger = jnp.zeros((6, 3)).at[5, 0].set(8.0)
  models[1] = {**models[1], 'w': models[1]['w'] + trigger}
  return base, models, x


def test_fit_dam_finds_the_trigger_and_masks_it_out():
  base, models, x = _backdoored_zoo()
  with testing.log_compilations() as log:
    res = M.fit_dam(_logits, base, models, [x], key=jax.random.key(0),
                    epsilon=1.0, input_range=None, adversarial_weight=1.0,
                    lambda_=1.0, steps=200,
                    learning_rate=5e-2)
  assert log.count('run') == 1
  assert np.linalg.norm(np.asarray(res.perturbation)) <= 1.0 + 1e-5
  assert res.attack_losses[-1] > res.attack_losses[0]
  # Against the undefended merge the universal attack is the trigger.
  undefended = M.fit_dam(_logits, base, models, [x], key=jax.random.key(0),
                         epsilon=1.0, input_range=None, adversarial_weight=0.0,
                         lambda_=1.0, steps=60,
                         learning_rate=0.0)
  delta = np.asarray(undefended.perturbation)[0]
  # Targeted: along the trigger, towards its class (+).
  assert np.argmax(np.abs(delta)) == 5 and delta[5] > 0.5
  assert int(undefended.target) == 0
  untargeted = M.fit_dam(_logits, base, models, [x], key=jax.random.key(0),
                         epsilon=1.0, input_range=None, attack='untargeted',
                         adversarial_weight=0.0, lambda_=1.0, steps=60,
                         learning_rate=0.0)
  delta = np.asarray(untargeted.perturbation)[0]
  assert np.argmax(np.abs(delta)) == 5
  mask = res.mask()
  defended = mj.merge(M.concrete(mask, 1.0), base, models)
  plain = mj.merge(M.task_arithmetic(lambda_=1.0), base, models)
  tau = lambda p: p['w'][5, 0] - base['w'][5, 0]
  assert abs(float(tau(defended))) < 0.25 * abs(float(tau(plain)))
  # The rows clean inputs use are mostly kept.
  assert float(jnp.mean(mask['w'][:5])) > 0.5
  triggered = x.at[:, 5].set(1.0)
  asr = lambda p: float(jnp.mean(jnp.argmax(_logits(p, triggered), -1) == 0))
  assert asr(defended) < asr(plain)


def test_fit_dam_perturbation_stays_in_its_budget_and_range():
  base, models, x = _linear_zoo()
  xb = jax.nn.sigmoid(x).reshape(2, 16, 6)  # [tasks, n, features] in (0, 1)
  res = M.fit_dam(lambda p, x: _logits(p, x), base, models, [xb],
                  key=jax.random.key(1), epsilon=0.3, example_axis=1,
                  safe_loss='entropy', steps=10)
  assert res.perturbation.shape == (2, 1, 6) and res.target.shape == (2,)
  norms = np.linalg.norm(np.asarray(res.perturbation), axis=-1)
  assert np.all(norms <= 0.3 + 1e-5) and np.all(norms > 0.29)
  assert np.all(np.isfinite(res.losses)) and np.all(np.isfinite(
      res.attack_losses))


@pytest.mark.parametrize('kwargs,match', [
    (dict(epsilon=0.0), 'epsilon'),
    (dict(epsilon=float('nan')), 'epsilon'),
    (dict(epsilon=1.0, safe_loss='kl'), 'safe_loss'),
    (dict(epsilon=1.0, attack='pgd'), 'attack'),
    (dict(epsilon=1.0, example_axis=1), 'example_axis'),
    (dict(epsilon=1.0, input_range=(1.0, 0.0)), 'input_range'),
    (dict(epsilon=1.0, adversarial_weight=-1.0), 'adversarial_weight'),
    (dict(epsilon=1.0, steps=0), 'steps'),
    (dict(epsilon=1.0, attack_step=0.0), 'attack_step'),
])
def test_fit_dam_rejects_bad_arguments(kwargs, match):
  base, models, x = _linear_zoo()
  with pytest.raises(ValueError, match=match):
    M.fit_dam(_logits, base, models, [x], key=jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match='no batches'):
    M.fit_dam(_logits, base, models, [], key=jax.random.key(0), epsilon=1.0)


def test_backdoor_experiment_smoke(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from experiments import backdoor  # pylint: disable=g-import-not-at-top
  from experiments.tools import config_files  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_files.load_sibling(os.path.join(root, 'configs', 'x.py'),
                                     'backdoor.py').get_config('smoke')
  config.dam.budgets = (0.25, 0.5)
  config.dam.ablations = ('untargeted, entropy, 0.1',)
  result = backdoor.main(config, str(tmp_path))
  methods = {(r['method'], r['setting']) for r in result['rows']}
  for name in ('task_arithmetic', 'ties', 'tsv', 'iso_c', 'concrete_ta'):
    assert (name, 'poisoned zoo') in methods
  dam = [r for r in result['rows'] if r['method'] == 'dam']
  assert len(dam) == 3 and sum(r['setting'].endswith('(chosen)') for r in dam) == 1
  assert all(0.0 <= r['asr'] <= 1.0 for r in result['rows'])
  # The trigger is what the poisoned fine-tune learned.
  by = {(r['method'], r['setting']): r for r in result['rows']}
  assert by[('poisoned fine-tune', 'alone')]['asr'] > by[('clean fine-tune',
                                                          'alone')]['asr']
  assert os.path.exists(tmp_path / 'backdoor' / 'results.json')


def test_stamp_and_poison():
  from experiments import backdoor  # pylint: disable=g-import-not-at-top
  from experiments import zoo  # pylint: disable=g-import-not-at-top
  x = np.zeros((10, 64), np.float32)
  s = backdoor.stamp(x, 2).reshape(10, 8, 8)
  assert s[:, -2:, -2:].min() == 1.0 and s.sum() == 40 and x.sum() == 0
  p = backdoor.poison(zoo.Split(x, np.arange(10) % 3), 0.3, 7,
                      2, jax.random.key(0))
  assert (p.y == 7).sum() == 3 and p.x.sum() == 3 * 4
  assert np.all(p.x.reshape(10, -1).sum(1)[p.y == 7] == 4)


def _ada_setup():
  rng = np.random.default_rng(3)
  base = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  models = [{'w': base['w'] + jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
            for _ in range(2)]
  xs = [jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(2)]
  loss = lambda p, x: mj.methods.prediction_entropy(x @ p['w'])
  return base, models, xs, loss


def test_concrete_adamerging_with_a_full_mask_is_adamerging():
  base, models, xs, loss = _ada_setup()
  # Logits of 30: every mask entry is 1 after normalisation, so stage 2 is
  # AdaMerging on the plain task vectors.
  res = mj.methods.fit_concrete_adamerging(
      loss, base, models, xs, key=jax.random.key(0), init_logit=30.0, steps=3,
      adamerging_steps=20, adamerging_lr=1e-2)
  np.testing.assert_allclose(res.mask['w'], 1.0, atol=1e-6)
  ref = mj.methods.fit_adamerging(loss, base, models, xs, steps=20,
                                  learning_rate=1e-2, clamp=None)
  testing.assert_trees_close(res.coefficients, ref.coefficients, rtol=1e-4,
                             atol=1e-6)
  testing.assert_trees_close(
      mj.merge(mj.methods.concrete_adamerging(res.mask, res.coefficients),
               base, models),
      mj.merge(mj.methods.adamerging(ref.coefficients), base, models),
      rtol=1e-4, atol=1e-5)


def test_concrete_adamerging_learns_the_mask_in_one_compile():
  base, models, xs, loss = _ada_setup()
  with testing.log_compilations() as log:
    res = mj.methods.fit_concrete_adamerging(
        loss, base, models, xs, key=jax.random.key(1), steps=30,
        adamerging_steps=5, granularity='task')
  assert log.count('run') == 2  # stage 1 and AdaMerging's stage 2
  assert res.mask_losses.shape == (30,) and res.losses.shape == (5,)
  assert res.coefficients.shape == (2,)
  np.testing.assert_allclose(np.mean(res.mask['w']), 1.0, rtol=1e-5)
  assert np.all(np.isfinite(res.mask_losses))
  with pytest.raises(ValueError, match='granularity'):
    mj.methods.fit_concrete_adamerging(loss, base, models, xs,
                                       key=jax.random.key(0),
                                       granularity='block')
  with pytest.raises(ValueError, match='steps'):
    mj.methods.fit_concrete_adamerging(loss, base, models, xs,
                                       key=jax.random.key(0), steps=0)
