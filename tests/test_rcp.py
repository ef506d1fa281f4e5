"""RCP-Merging: limits in kappa, a NumPy reference, sweeps, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

T = mj.transforms
SHAPES = {'enc': {'kernel': (4, 3), 'bias': (3,)}, 'head': (3, 2)}


def _tree(rng, fn):
  return jax.tree.map(lambda s: jnp.asarray(fn(rng, s), jnp.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))


def _setup(k=1, seed=0):
  """A reasoning model, ``k`` domain models and positive Fishers."""
  rng = np.random.default_rng(seed)
  normal = lambda r, s: r.normal(size=s)
  fisher = lambda r, s: r.uniform(0.1, 2.0, size=s)
  reasoning = _tree(rng, normal)
  domains = [_tree(rng, normal) for _ in range(k)]
  f_r = _tree(rng, fisher)
  f_d = [_tree(rng, fisher) for _ in range(k)]
  return reasoning, domains, f_r, f_d


def _np_rcp(reasoning, domains, f_r, f_d, *, kappa, lambda_, soft, normalize):
  """The method's formula, literally, in float64 with NumPy."""
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x, np.float64)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  r, fr = flat(reasoning), flat(f_r)
  ds, fds = [flat(d) for d in domains], [flat(f) for f in f_d]
  if normalize:
    mean = lambda f: np.concatenate([x.ravel() for x in f.values()]).mean()
    fr = {p: x / mean(fr) for p, x in fr.items()}
    fds = [{p: x / mean(f) for p, x in f.items()} for f in fds]
  out = {}
  for p in r:
    edit = np.zeros_like(r[p])
    for d, fd in zip(ds, fds):
      tau = d[p] - r[p]
      s_d = np.abs(tau) * np.sqrt(fd[p])
      i_r = np.abs(tau) * np.sqrt(fr[p])
      if soft:
        m = np.divide(s_d, s_d + kappa * i_r, out=np.zeros_like(s_d),
                      where=s_d + kappa * i_r > 0)
      else:
        m = (s_d > kappa * i_r).astype(np.float64)
      edit += m * tau
    out[p] = r[p] + lambda_ * edit
  return out


def _flat(tree):
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('soft', [False, True])
def test_kappa_limits_give_the_reasoning_and_the_domain_model(soft):
  reasoning, (domain,), f_r, f_d = _setup(1)
  merge = lambda kappa: mj.merge(
      mj.methods.rcp_merging(f_r, f_d, kappa=kappa, soft=soft), reasoning,
      [domain])
  testing.assert_trees_close(merge(1e30), reasoning, rtol=0, atol=1e-6)
  testing.assert_trees_close(merge(0.0), domain, rtol=0, atol=1e-6)


@pytest.mark.parametrize('soft, normalize', [(False, True), (False, False),
                                             (True, True)])
def test_matches_a_numpy_reference(soft, normalize):
  reasoning, domains, f_r, f_d = _setup(2, seed=1)
  # Some entries unseen by one Fisher or by both (the prior wins the tie).
  f_r = jax.tree.map(lambda f: f.at[0].set(0.0), f_r)
  f_d[0] = jax.tree.map(lambda f: f.at[0].set(0.0), f_d[0])
  kw = dict(kappa=0.8, lambda_=0.5, soft=soft, normalize=normalize)
  out = mj.merge(mj.methods.rcp_merging(f_r, f_d, **kw), reasoning, domains)
  want = _np_rcp(reasoning, domains, f_r, f_d, **kw)
  for p, x in _flat(out).items():
    np.testing.assert_allclose(x, want[p], rtol=1e-5, atol=1e-6, err_msg=p)
  if not soft:  # both hard masks are used somewhere, not all or nothing
    _, state = mj.merge(mj.methods.rcp_merging(f_r, f_d, **kw), reasoning,
                        domains, return_state=True)
    kept = np.asarray(state[1][0].kept)
    assert kept.shape == (2,) and np.all((kept > 0.1) & (kept < 0.9))


def test_edits_that_reasoning_does_not_see_are_always_taken():
  reasoning, (domain,), f_r, f_d = _setup(1, seed=2)
  f_r = jax.tree.map(jnp.zeros_like, f_r)
  out = mj.merge(mj.methods.rcp_merging(f_r, f_d, kappa=1e6), reasoning,
                 [domain])
  testing.assert_trees_close(out, domain, rtol=0, atol=1e-6)


def test_jit_and_no_jit_agree():
  reasoning, domains, f_r, f_d = _setup(2, seed=3)
  tvs = jax.tree.map(lambda *xs: jnp.stack([x - xs[0] for x in xs[1:]]),
                     reasoning, *domains)
  tx = T.rcp_select(f_r, f_d, kappa=[0.5, 2.0], soft=True)
  eager, _ = tx.update(tvs, tx.init(reasoning))
  jitted, _ = jax.jit(tx.update)(tvs, tx.init(reasoning))
  testing.assert_trees_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_kappa_sweep_in_one_compile():
  reasoning, domains, f_r, f_d = _setup(2, seed=4)
  run = lambda kappa, lam: mj.merge(
      mj.methods.rcp_merging(f_r, f_d, kappa=kappa, lambda_=lam), reasoning,
      domains)
  jax.clear_caches()  # earlier tests compiled this configuration already
  with testing.log_compilations() as log:
    a = run(0.5, 0.5)
    b = run(2.0, 1.0)
  assert log.count('_run') == 1
  swept = jax.vmap(run)(jnp.array([0.5, 2.0]), jnp.array([0.5, 1.0]))
  testing.assert_trees_close(jax.tree.map(lambda x: x[0], swept), a)
  testing.assert_trees_close(jax.tree.map(lambda x: x[1], swept), b)
  with pytest.raises(Exception, match='kappa'):
    jax.block_until_ready(jax.jit(run)(jnp.float32(-1.0), 1.0))


def test_accepts_fishers_from_mergejax_stats():
  params = {'w': jnp.array([[1., 0.], [0., 1.], [1., 1.]])}
  domain = {'w': params['w'] + 0.5}
  logits_fn = lambda p, x: x @ p['w']
  x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
  f_r = mj.stats.fisher_diagonal(logits_fn, params, [(x, y)], kind='empirical')
  f_d = mj.stats.fisher_diagonal(logits_fn, domain, [(x, y)], kind='empirical')
  out = mj.merge(mj.methods.rcp_merging(f_r, [f_d], kappa=0.0), params,
                 [domain])
  assert out['w'].shape == (3, 2)


def test_bf16_models_keep_their_dtype():
  reasoning, (domain,), f_r, f_d = _setup(1, seed=5)
  cast = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
  out = mj.merge(mj.methods.rcp_merging(f_r, f_d), cast(reasoning),
                 [cast(domain)])
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_bad_fishers_raise_naming_the_leaf():
  reasoning, (domain,), f_r, f_d = _setup(1)
  bad = {**f_r, 'head': jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"reasoning_fisher leaf 'head'.*\(2, 3\)"):
    mj.merge(mj.methods.rcp_merging(bad, f_d), reasoning, [domain])
  ints = {**f_r, 'head': jnp.ones((3, 2), jnp.int32)}
  with pytest.raises(ValueError, match=r"reasoning_fisher.*'head'.*int32"):
    mj.methods.rcp_merging(ints, f_d)
  neg = [{**f_d[0], 'enc': {**f_d[0]['enc'], 'bias': -jnp.ones(3)}}]
  with pytest.raises(ValueError, match=r"domain_fishers\[0\] leaf 'enc/bias'"):
    mj.methods.rcp_merging(f_r, neg)
  # One domain model's Fisher passed bare: a stacked tree needs the K axis.
  with pytest.raises(ValueError, match=r"domain_fishers leaf 'enc/bias'.*list"):
    mj.merge(mj.methods.rcp_merging(f_r, f_d[0]), reasoning, [domain])
  with pytest.raises(ValueError, match='2 models but 1'):
    mj.merge(mj.methods.rcp_merging(f_r, f_d * 2), reasoning, [domain])
  missing = [{'head': f_d[0]['head']}]
  with pytest.raises(ValueError, match='missing'):
    mj.merge(mj.methods.rcp_merging(f_r, missing), reasoning, [domain])
  with pytest.raises(ValueError, match='kappa'):
    mj.methods.rcp_merging(f_r, f_d, kappa=-1.0)
  with pytest.raises(ValueError, match='empty'):
    mj.methods.rcp_merging(f_r, [])
