"""Expert Merging: the loss against a plain computation, fixed points, sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods


def _outputs(p, x, t):
  del t  # one head for every task
  h = jnp.tanh(x @ p['a'])
  return {'h': h}, h @ p['b']


def _setup(k=2, seed=0):
  rng = np.random.default_rng(seed)
  base = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
  models = [jax.tree.map(lambda x: x + 0.5 * jnp.asarray(
      rng.normal(size=x.shape), jnp.float32), base) for _ in range(k)]
  batches = [jnp.asarray(rng.normal(size=(k, 8, 3)), jnp.float32)
             for _ in range(2)]
  return base, models, batches


def _plain_loss(c, base, models, x, init, temp, hid_w, reg, weights):
  """The documented loss, written out for coefficients ``c``."""
  theta = {n: base[n] + sum(c[n][i] * (m[n] - base[n])
                            for i, m in enumerate(models)) for n in base}
  total = 0.0
  for t, m in enumerate(models):
    h, logits = _outputs(theta, x[t], t)
    th, tl = _outputs(m, x[t], t)
    p = jax.nn.softmax(tl / temp)
    kl = np.mean(np.sum(p * (jax.nn.log_softmax(tl / temp)
                             - jax.nn.log_softmax(logits / temp)), -1))
    mse = np.mean((np.asarray(h['h']) - np.asarray(th['h'])) ** 2)
    l1 = sum(np.sum(np.abs(np.asarray(v) - init)) for v in c.values()) / len(c)
    total += weights[t] * (temp ** 2 * kl + hid_w * mse) + reg * l1
  return total


def _default_loss(theta, x, targets, c, init, reg):
  """The loss at the default T=3 and hidden weight 0.1, written out."""
  total = 0.0
  for t, (th, tl) in enumerate(targets):
    h, logits = _outputs(theta, x[t], t)
    tlp = jax.nn.log_softmax(tl / 3.0)
    kl = jnp.mean(jnp.sum(jnp.exp(tlp) * (tlp - jax.nn.log_softmax(
        logits / 3.0)), -1))
    total += 9.0 * kl + 0.1 * jnp.mean((h['h'] - th['h']) ** 2)
    total += reg * sum(jnp.sum(jnp.abs(v - init)) for v in c.values()) / 2
  return total


def test_first_loss_matches_the_documented_formula():
  base, models, batches = _setup()
  res = M.fit_expert_merging(_outputs, base, models, batches, steps=1,
                             init=0.2, temperature=2.0, hidden_weight=0.5,
                             regularization=0.3, task_weights=[1.0, 2.0])
  c0 = {n: np.full(2, 0.2) for n in base}
  want = _plain_loss(c0, base, models, batches[0], 0.2, 2.0, 0.5, 0.3,
                     [1.0, 2.0])
  np.testing.assert_allclose(res.losses[0], want, rtol=1e-4)


def test_zero_learning_rate_keeps_init_and_merges_as_task_arithmetic():
  base, models, batches = _setup()
  res = M.fit_expert_merging(_outputs, base, models, batches, steps=3,
                             init=0.3, learning_rate=0.0)
  for v in jax.tree.leaves(res.coefficients):
    np.testing.assert_allclose(v, 0.3, rtol=1e-6)
  testing.assert_trees_close(
      mj.merge(M.adamerging(res.coefficients), base, models),
      mj.merge(M.task_arithmetic(lambda_=0.3), base, models), rtol=1e-5,
      atol=1e-6)


def test_one_expert_is_recovered():
  # With one expert the loss vanishes at c = 1 (the sigmoid's limit): the
  # coefficients climb towards it and the loss falls.
  base, models, batches = _setup(k=1)
  res = M.fit_expert_merging(_outputs, base, models, batches, steps=400,
                             learning_rate=0.05, regularization=0.0)
  assert res.losses[-1] < 0.05 * res.losses[0]
  for v in jax.tree.leaves(res.coefficients):
    assert float(v[0]) > 0.9


def test_matches_a_plain_optax_loop_and_compiles_once():
  base, models, batches = _setup()
  kw = dict(init=0.2, steps=5, learning_rate=1e-2)
  with testing.log_compilations() as log:
    res = M.fit_expert_merging(_outputs, base, models, batches, **kw)
  assert log.count('run') == 1
  targets = []
  for x in batches:
    targets.append([_outputs(m, x[t], t) for t, m in enumerate(models)])

  def loss(r, j):
    c = jax.tree.map(jax.nn.sigmoid, r)
    theta = {n: base[n] + sum(c[n][i] * (m[n] - base[n])
                              for i, m in enumerate(models)) for n in base}
    return _default_loss(theta, batches[j], targets[j], c, 0.2, 0.1)

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  r = {n: jnp.full(2, jax.scipy.special.logit(0.2)) for n in base}
  state = opt.init(r)
  with jax.numpy_dtype_promotion('standard'):
    for i in range(5):
      g = jax.grad(loss)(r, i % 2)
      up, state = opt.update(g, state, r)
      r = optax.apply_updates(r, up)
  testing.assert_trees_close(res.coefficients,
                             jax.tree.map(jax.nn.sigmoid, r), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize('change, match', [
    (dict(init=0.0), 'init'), (dict(init=1.0), 'init'), (dict(steps=0), 'steps'),
    (dict(models=[]), 'empty'), (dict(batches=[]), 'no batches'),
    (dict(batches=[jnp.zeros((3, 4, 3))]), 'K=2'),
    (dict(temperature=0.0), 'temperature'),
    (dict(task_weights=[1.0, -1.0]), 'task_weights'),
    (dict(batches=[jnp.full((2, 4, 3), jnp.nan)]), 'NaN')])
def test_bad_inputs_raise(change, match):
  base, models, batches = _setup()
  kw = dict(outputs_fn=_outputs, base_params=base, models=models,
            batches=batches, steps=2)
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    M.fit_expert_merging(**kw)


def test_chunks_of_one_are_the_layer_wise_fit():
  base, models, batches = _setup()
  kw = dict(init=0.2, steps=5, learning_rate=1e-2)
  ones = jax.tree.map(lambda _: 1, base)
  layer = M.fit_expert_merging(_outputs, base, models, batches, **kw)
  with testing.log_compilations() as log:
    chunked = M.fit_expert_merging(_outputs, base, models, batches,
                                   chunks=ones, **kw)
  assert log.count('run') == 1
  testing.assert_trees_close(
      jax.tree.map(lambda v: v[:, 0], chunked.coefficients),
      layer.coefficients, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(chunked.losses, layer.losses, rtol=1e-6)


def test_chunk_wise_fit_matches_a_plain_sgd_loop():
  # Two chunks of 'a' (12 entries: positions 0-5 and 6-11), three of 'b'.
  base, models, batches = _setup()
  chunks = {'a': 2, 'b': 3}
  kw = dict(init=0.3, steps=3, regularization=0.2)
  res = M.fit_expert_merging(_outputs, base, models, batches, chunks=chunks,
                             optimizer=optax.sgd(0.5), **kw)
  assert res.coefficients['a'].shape == (2, 2)
  assert res.coefficients['b'].shape == (2, 3)

  def expand(c, n, shape):
    size = int(np.prod(shape))
    return c[jnp.asarray([i * n // size for i in range(size)])].reshape(shape)

  def loss(r, x):
    c = jax.tree.map(jax.nn.sigmoid, r)
    theta = {n: base[n] + sum(expand(c[n][i], chunks[n], base[n].shape)
                              * (m[n] - base[n])
                              for i, m in enumerate(models)) for n in base}
    # The L1 pull sums over every chunk's coefficient (authors' code).
    targets = [_outputs(m, x[t], t) for t, m in enumerate(models)]
    return _default_loss(theta, x, targets, c, 0.3, 0.2)

  r = {n: jnp.full((2, chunks[n]), jax.scipy.special.logit(0.3))
       for n in base}
  for i in range(3):
    g = jax.grad(loss)(r, batches[i % 2])
    r = jax.tree.map(lambda a, b: a - 0.5 * b, r, g)
  testing.assert_trees_close(res.coefficients,
                             jax.tree.map(jax.nn.sigmoid, r), rtol=1e-4,
                             atol=1e-6)


def test_chunks_let_the_fit_match_what_one_coefficient_cannot():
  # Task 0 reads only the first half of w, task 1 only the second. Each
  # expert's edit helps its own half and is the opposite of the other's, so
  # one coefficient per model cannot serve both tasks; one per half can.
  base = {'w': jnp.zeros(4)}
  experts = [{'w': jnp.array([1.0, 1.0, -1.0, -1.0])},
             {'w': jnp.array([-1.0, -1.0, 1.0, 1.0])}]
  outputs = lambda p, x, t: ({'h': x * p['w'][None]}, x * p['w'][None])
  x = jnp.stack([jnp.tile(jnp.array([1.0, 1.0, 0.0, 0.0]), (8, 1)),
                 jnp.tile(jnp.array([0.0, 0.0, 1.0, 1.0]), (8, 1))])
  kw = dict(steps=300, learning_rate=0.1, regularization=0.0)
  layer = M.fit_expert_merging(outputs, base, experts, [x], **kw)
  chunked = M.fit_expert_merging(outputs, base, experts, [x],
                                 chunks={'w': 2}, **kw)
  assert chunked.losses[-1] < 0.1 * layer.losses[-1]
  c = np.asarray(chunked.coefficients['w'])
  assert c[0, 0] > 0.9 and c[0, 1] < 0.1 and c[1, 0] < 0.1 and c[1, 1] > 0.9


def test_importance_chunks_share_the_budget_by_the_applied_edit():
  base = {'big': jnp.zeros(100), 'mid': jnp.zeros(50), 'off': jnp.zeros(30),
          'tiny': jnp.zeros(2)}
  models = [{'big': jnp.ones(100), 'mid': jnp.full(50, 2.0),
             'off': jnp.ones(30), 'tiny': jnp.ones(2)}]
  c = {'big': jnp.array([0.5]), 'mid': jnp.array([0.5]),
       'off': jnp.array([0.0]), 'tiny': jnp.array([[1.0, 0.0]])}
  # Applied edits |c| ||tau||_1: 50, 50, 0, 1 -> the 10 extras split 5 / 5.
  got = M.importance_chunks(c, base, models, budget=10)
  assert got == {'big': 6, 'mid': 6, 'off': 1, 'tiny': 1}
  # A cap moves what a leaf cannot take to the others; leaf sizes cap too.
  got = M.importance_chunks(c, base, models, budget=10, max_chunks=4)
  assert got == {'big': 4, 'mid': 4, 'off': 1, 'tiny': 2}
  assert M.importance_chunks(c, base, models, budget=0) == jax.tree.map(
      lambda _: 1, base)
  with pytest.raises(ValueError, match='budget'):
    M.importance_chunks(c, base, models, budget=-1)
  with pytest.raises(ValueError, match="'off'.*non-negative"):
    M.importance_chunks(dict(c, off=jnp.array([-1.0])), base, models,
                        budget=3)


def test_bad_chunks_raise():
  base, models, batches = _setup()
  with pytest.raises(ValueError, match=r"chunks\['b'\].*\[1, 20\]"):
    M.fit_expert_merging(_outputs, base, models, batches, steps=1,
                         chunks={'a': 1, 'b': 21})
  with pytest.raises(ValueError, match='chunks'):
    M.fit_expert_merging(_outputs, base, models, batches, steps=1,
                         chunks={'a': 1})
