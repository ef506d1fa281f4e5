"""Fisher merging and RegMean, and the statistics they use, against references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import stats
from mergejax import testing

M = mj.methods


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


def _zoo(k=3, seed=0):
  rng = np.random.default_rng(seed)
  model = _MLP()
  x = jnp.asarray(rng.standard_normal((24, 5)), jnp.float32)
  base = model.init(jax.random.key(seed), x[:1])['params']
  models = [jax.tree.map(lambda p: p + 0.3 * jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), base) for _ in range(k)]
  y = jnp.asarray(rng.integers(0, 3, 24), jnp.int32)
  return model, base, models, x, y


def _logits_fn(model):
  return lambda p, x: model.apply({'params': p}, x)


@pytest.mark.parametrize('kind', ['empirical', 'exact', 'sampled'])
def test_per_example_fisher_equals_a_loop_over_single_examples(kind):
  model, base, _, x, y = _zoo()
  f = _logits_fn(model)
  key = jax.random.key(3)
  batches = [(x[:16], y[:16]), (x[16:], y[16:])]
  got = stats.fisher_diagonal(f, base, batches, kind=kind, key=key)
  want = jax.tree.map(lambda p: np.zeros(p.shape), base)
  for b, (xb, yb) in enumerate(batches):
    if kind == 'sampled':  # the same draws as the library: one per batch key
      logp = jax.nn.log_softmax(f(base, xb))
      yb = jax.random.categorical(jax.random.fold_in(key, b), logp)
    for i in range(xb.shape[0]):
      lp = lambda p, c, i=i: jax.nn.log_softmax(f(p, xb[i:i + 1])[0])[c]
      if kind == 'exact':
        probs = np.exp(np.asarray(jax.nn.log_softmax(f(base, xb[i:i + 1])[0])))
        for c in range(3):
          g = jax.grad(lp)(base, c)
          want = jax.tree.map(lambda w, gg, c=c: w + probs[c] * np.square(gg),
                              want, g)
      else:
        g = jax.grad(lp)(base, int(yb[i]))
        want = jax.tree.map(lambda w, gg: w + np.square(gg), want, g)
  want = jax.tree.map(lambda w: w / x.shape[0], want)
  testing.assert_trees_close(got, want, rtol=1e-4, atol=1e-7)


def test_batch_sqrt_fisher_is_fusionbench_s_batch_surrogate():
  model, base, _, x, _ = _zoo()
  f = _logits_fn(model)
  got = stats.fisher_diagonal(f, base, [x[:8], x[8:16]], kind='batch_sqrt')

  def surrogate(p, xb):
    lp = jax.nn.log_softmax(f(p, xb))
    return jnp.sum(jax.lax.stop_gradient(jnp.sqrt(jnp.exp(lp))) * lp)

  want = jax.tree.map(lambda a, b: (a ** 2 + b ** 2) / 16,
                      jax.grad(surrogate)(base, x[:8]),
                      jax.grad(surrogate)(base, x[8:16]))
  testing.assert_trees_close(got, want, rtol=1e-4, atol=1e-8)


def test_fisher_statistics_compile_once_per_batch_shape():
  model, base, _, x, y = _zoo()
  f = _logits_fn(model)
  stats.fisher_diagonal(f, base, [(x[:8], y[:8])], kind='empirical')
  with testing.log_compilations() as log:
    stats.fisher_diagonal(f, base, [(x[8:16], y[8:16]), (x[16:], y[16:])],
                          kind='empirical')
  assert log.count('step') == 0


def test_fisher_merging_matches_the_formula():
  _, _, models, _, _ = _zoo()
  rng = np.random.default_rng(1)
  fishers = [jax.tree.map(lambda p: jnp.asarray(
      rng.random(p.shape), jnp.float32), m) for m in models]
  eps = 1e-6
  out = mj.merge(M.fisher_merging(fishers), None, models)
  f = [jax.tree.map(lambda a: np.asarray(a, np.float64) + eps, t)
       for t in fishers]
  norms = [np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(t))) for t in f]
  u = 1 / (np.asarray(norms) + eps)
  c = u / u.sum()
  want = jax.tree.map(
      lambda *leaves: sum(ci * fi * np.asarray(xi, np.float64) for ci, fi, xi in
                          zip(c, leaves[:3], leaves[3:])) /
      sum(ci * fi for ci, fi in zip(c, leaves[:3])), *f, *models)
  testing.assert_trees_close(out, want, rtol=1e-5, atol=1e-6)
  # Equal Fishers give the plain average.
  same = [jax.tree.map(jnp.ones_like, m) for m in models]
  testing.assert_trees_close(mj.merge(M.fisher_merging(same), None, models),
                             mj.merge(M.average(), None, models), atol=1e-6)


def test_linen_dense_inputs_records_what_each_dense_reads():
  model, base, _, x, _ = _zoo()
  ins = stats.linen_dense_inputs(model)(base, x)
  assert set(ins) == {'Dense_0/kernel', 'Dense_1/kernel'}
  np.testing.assert_array_equal(ins['Dense_0/kernel'], x)
  h = jax.nn.relu(x @ base['Dense_0']['kernel'] + base['Dense_0']['bias'][None])
  np.testing.assert_allclose(ins['Dense_1/kernel'], h, rtol=1e-6, atol=1e-6)


def test_regmean_equals_least_squares_on_the_stacked_inputs_and_outputs():
  model, _, models, x, _ = _zoo()
  fn = stats.linen_dense_inputs(model)
  data = [x[8 * i:8 * i + 8] for i in range(3)]  # one task's data per model
  grams = [stats.input_grams(fn, m, [d]) for m, d in zip(models, data)]
  out = mj.merge(M.regmean(grams, alpha=1.0), None, models)
  for layer in ('Dense_0', 'Dense_1'):
    path = f'{layer}/kernel'
    xs = [np.asarray(fn(m, d)[path], np.float64) for m, d in zip(models, data)]
    ys = [xi @ np.asarray(m[layer]['kernel'], np.float64)
          for xi, m in zip(xs, models)]
    w, *_ = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)
    np.testing.assert_allclose(out[layer]['kernel'], w, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(  # biases: the plain mean (FusionBench's rule)
        out[layer]['bias'], np.mean([m[layer]['bias'] for m in models], 0),
        rtol=1e-6, atol=1e-6)


def test_regmean_shrink_sweeps_in_one_compile_and_alpha_zero_is_diagonal():
  model, _, models, x, _ = _zoo()
  fn = stats.linen_dense_inputs(model)
  grams = [stats.input_grams(fn, m, [x]) for m in models]
  alphas = jnp.array([0.0, 0.5, 0.95])
  sweep = jax.jit(jax.vmap(lambda a: mj.merge(M.regmean(grams, alpha=a), None,
                                               models)))(alphas)
  for i, a in enumerate([0.0, 0.5, 0.95]):
    single = mj.merge(M.regmean(grams, alpha=a), None, models)
    testing.assert_trees_close(jax.tree.map(lambda s: s[i], sweep), single,
                               rtol=1e-4, atol=1e-5)
  # alpha = 0: each output column is the diag(G)-weighted mean of the rows.
  d = np.stack([np.diag(np.asarray(g['Dense_0/kernel'])) for g in grams])
  ks = np.stack([np.asarray(m['Dense_0']['kernel']) for m in models])
  want = (d[:, :, None] * ks).sum(0) / d.sum(0)[:, None]
  out = mj.merge(M.regmean(grams, alpha=0.0), None, models)
  np.testing.assert_allclose(out['Dense_0']['kernel'], want, rtol=1e-4,
                             atol=1e-5)


def test_bad_statistics_name_the_layer():
  _, base, models, _, _ = _zoo()
  with pytest.raises(ValueError, match="layer 'Dense_9/kernel'"):
    mj.merge(M.regmean([{'Dense_9/kernel': jnp.eye(5)}] * 3), base, models)
  with pytest.raises(ValueError, match=r"grams\[1\] has layers"):
    M.regmean([{'a': jnp.eye(2)}, {'b': jnp.eye(2)}])
  with pytest.raises(ValueError, match='fishers must have the parameters'):
    mj.merge(M.fisher_merging([{'x': jnp.ones(2)}] * 3), base, models)
  with pytest.raises(ValueError, match="kind='sampled' draws labels"):
    stats.fisher_diagonal(lambda p, x: x, base, [jnp.ones((2, 3))],
                          kind='sampled')


def test_regmean_plusplus_takes_each_layer_s_grams_through_the_merged_layers():
  model, _, models, x, _ = _zoo()
  fn = stats.linen_dense_inputs(model)
  data = [[x[8 * i:8 * i + 8]] for i in range(3)]
  out = mj.merge(M.regmean_plusplus(fn, models, data, alpha=0.9), None, models)
  # By hand: layer 0 is RegMean's (its inputs are the data itself) ...
  g0 = [np.asarray(d[0], np.float64).T @ np.asarray(d[0], np.float64) / 8
        for d in data]
  shrink = lambda g: 0.9 * g + 0.1 * np.diag(np.diag(g))
  k0 = np.linalg.solve(sum(shrink(g) for g in g0), sum(
      shrink(g) @ np.asarray(m['Dense_0']['kernel'], np.float64)
      for g, m in zip(g0, models)))
  b0 = np.mean([np.asarray(m['Dense_0']['bias'], np.float64) for m in models], 0)
  np.testing.assert_allclose(out['Dense_0']['kernel'], k0, rtol=1e-4, atol=1e-5)
  # ... layer 1's Grams come from the merged layer 0's outputs.
  hs = [np.maximum(np.asarray(d[0], np.float64) @ k0 + b0, 0) for d in data]
  g1 = [h.T @ h / 8 for h in hs]
  k1 = np.linalg.solve(sum(shrink(g) for g in g1), sum(
      shrink(g) @ np.asarray(m['Dense_1']['kernel'], np.float64)
      for g, m in zip(g1, models)))
  np.testing.assert_allclose(out['Dense_1']['kernel'], k1, rtol=1e-3, atol=1e-4)
  # RegMean (each model's own layer 0) differs in layer 1 only.
  plain = mj.merge(M.regmean([stats.input_grams(fn, m, d) for m, d in
                              zip(models, data)], alpha=0.9), None, models)
  np.testing.assert_allclose(plain['Dense_0']['kernel'], k0, rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(plain['Dense_1']['kernel'], k1, atol=1e-4)


def test_regmean_plusplus_of_one_model_is_that_model():
  model, _, models, x, _ = _zoo(k=1)
  fn = stats.linen_dense_inputs(model)
  out = mj.merge(M.regmean_plusplus(fn, models, [[x]], alpha=1.0), None,
                 models)
  testing.assert_trees_close(out, models[0], rtol=1e-3, atol=1e-4)


def test_adamerging_with_frozen_coefficients_is_task_arithmetic():
  _, base, models, _, _ = _zoo()
  lam = 0.4
  ta = mj.merge(M.task_arithmetic(lambda_=lam), base, models)
  task = mj.merge(M.adamerging(jnp.full(3, lam)), base, models)
  layer = mj.merge(M.adamerging(jax.tree.map(lambda _: jnp.full(3, lam), base)),
                   base, models)
  testing.assert_trees_close(task, ta, atol=1e-6)
  testing.assert_trees_close(layer, ta, atol=1e-6)
  # Layer-wise coefficients act leaf by leaf.
  c = jax.tree.map(lambda _: jnp.zeros(3), base)
  c['Dense_1']['kernel'] = jnp.array([1., 0., 0.])
  out = mj.merge(M.adamerging(c), base, models)
  np.testing.assert_allclose(out['Dense_1']['kernel'],
                             models[0]['Dense_1']['kernel'], atol=1e-6)
  np.testing.assert_allclose(out['Dense_0']['kernel'],
                             base['Dense_0']['kernel'], atol=1e-6)


def test_chunk_wise_coefficients_follow_the_documented_chunks():
  # Chunk j of a leaf with `size` entries holds the flat positions i with
  # floor(i n / size) == j; written out plainly with explicit masks.
  rng = np.random.default_rng(3)
  base = {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  models = [jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape),
                                                   jnp.float32), base)
            for _ in range(2)]
  c = {'w': jnp.asarray(rng.uniform(size=(2, 5)), jnp.float32),
       'b': jnp.asarray(rng.uniform(size=(2,)), jnp.float32)}
  out = mj.merge(M.adamerging(c), base, models)
  size, n = 12, 5
  chunk = np.array([i * n // size for i in range(size)])
  assert sorted(np.bincount(chunk)) == [2, 2, 2, 3, 3]  # sizes within one
  want = np.asarray(base['w']).ravel().copy()
  for i, m in enumerate(models):
    tau = (np.asarray(m['w']) - np.asarray(base['w'])).ravel()
    want += np.asarray(c['w'])[i][chunk] * tau
  np.testing.assert_allclose(out['w'], want.reshape(3, 4), rtol=1e-5,
                             atol=1e-6)
  # Equal chunk coefficients are the layer-wise merge; [K, 1] is layer-wise.
  flat = {'w': jnp.tile(c['b'][:, None], (1, 5)), 'b': c['b'][:, None]}
  same = {'w': c['b'], 'b': c['b']}
  testing.assert_trees_close(mj.merge(M.adamerging(flat), base, models),
                             mj.merge(M.adamerging(same), base, models),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"coefficients\['w'\].*\(2, 13\).*"
                     r"1 <= n <= 12"):
    mj.merge(M.adamerging({'w': jnp.ones((2, 13)), 'b': c['b']}), base,
             models)


@pytest.mark.parametrize('granularity', ['task', 'layer'])
def test_fit_adamerging_lowers_the_entropy_in_one_compile(granularity):
  model, base, models, x, _ = _zoo()
  f = _logits_fn(model)
  loss = lambda p, xb: M.prediction_entropy(f(p, xb))
  batches = [x[:12], x[12:]]
  with testing.log_compilations() as log:
    res = M.fit_adamerging(loss, base, models, batches,
                           granularity=granularity, steps=40,
                           learning_rate=1e-2)
  assert log.count('run') == 1
  assert res.losses[-1] < res.losses[0]
  leaves = jax.tree.leaves(res.coefficients)
  assert all(l.shape == (3,) and bool(jnp.all((l >= 0) & (l <= 1)))
             for l in leaves)
  # The merge it reports is the one the coefficients give.
  merged = mj.merge(M.adamerging(res.coefficients), base, models)
  assert float(loss(merged, x[:12])) <= float(res.losses[0]) + 1e-6


def test_statistics_skip_empty_batches_and_reject_nan_inputs():
  w = {'w': jnp.asarray([[1.0, -1.0], [0.5, 2.0]])}
  logits = lambda p, x: x @ p['w']
  x = jnp.asarray([[1.0, 2.0], [0.0, 1.0]])
  empty = jnp.zeros((0, 2))
  # An empty batch first (a ragged split) is skipped, not the end of the data.
  testing.assert_trees_close(
      stats.fisher_diagonal(logits, w, [empty, x]),
      stats.fisher_diagonal(logits, w, [x]))
  inputs = lambda p, x: {'w': x}
  testing.assert_trees_close(stats.input_grams(inputs, w, [empty, x]),
                             stats.input_grams(inputs, w, [x]))
  bad = x.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"Fisher diagonal at 'w'.*NaN/Inf"):
    stats.fisher_diagonal(logits, w, [bad])
  with pytest.raises(ValueError, match=r"Gram matrix at 'w'.*NaN/Inf"):
    stats.input_grams(inputs, w, [bad])
