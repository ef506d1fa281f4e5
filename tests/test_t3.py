"""T3 test-time merging against a plain NumPy loop over the inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance

import mergejax as mj
from mergejax import testing


def _apply(p, x):
  h = jnp.tanh(x @ p['enc']['kernel'] + p['enc']['bias'][None])
  return h @ p['head']


def _models():
  pt = {'enc': {'kernel': jax.random.normal(jax.random.key(0), (4, 6)),
                'bias': jnp.zeros(6)},
        'head': jax.random.normal(jax.random.key(1), (6, 3))}
  ft = jax.tree.map(
      lambda p, k: p + 0.8 * jax.random.normal(k, p.shape),
      pt, jax.tree.unflatten(jax.tree.structure(pt),
                             list(jax.random.split(jax.random.key(2), 3))))
  x = jax.random.normal(jax.random.key(3), (7, 4)) * 2.0
  return pt, ft, x


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference(pt, ft, x, *, lo, hi, gamma, per, weight_on, centered=False):
  """Per input: the JS divergence, the coefficient, the merged model's logits."""
  lp, lf = _softmax(_apply(pt, x)), _softmax(_apply(ft, x))
  js = np.array([distance.jensenshannon(a, b) ** 2 for a, b in zip(lp, lf)])
  s = np.tanh(gamma * js / 2) if centered else 1 / (1 + np.exp(-gamma * js))
  lam = lo + (hi - lo) * s
  if per == 'batch':
    lam = np.full_like(lam, lam.mean())
  side, other = (pt, ft) if weight_on == 'pretrained' else (ft, pt)
  outs = []
  for li, xi in zip(lam, np.asarray(x)):
    p = jax.tree.map(lambda a, b, li=li: (1 - li) * np.asarray(b)
                     + li * np.asarray(a), side, other)
    outs.append(np.asarray(_apply(p, xi[None]))[0])
  return np.stack(outs), lam


def test_js_divergence_matches_scipy():
  a = jax.random.normal(jax.random.key(0), (5, 4)) * 3
  b = jax.random.normal(jax.random.key(1), (5, 4)) * 3
  want = [distance.jensenshannon(p, q) ** 2
          for p, q in zip(_softmax(a), _softmax(b))]
  np.testing.assert_allclose(mj.methods.js_divergence(a, b), want, rtol=1e-4,
                             atol=1e-7)
  # Symmetric, zero on identical inputs, at most ln 2.
  np.testing.assert_allclose(mj.methods.js_divergence(b, a), want, rtol=1e-4,
                             atol=1e-7)
  assert float(jnp.max(jnp.abs(mj.methods.js_divergence(a, a)))) < 1e-6
  far = jnp.array([[60., 0.]])
  np.testing.assert_allclose(mj.methods.js_divergence(far, far[:, ::-1]),
                             [np.log(2)], rtol=1e-5)


@pytest.mark.parametrize('per', ['sample', 'batch'])
@pytest.mark.parametrize('weight_on', ['pretrained', 'finetuned'])
@pytest.mark.parametrize('centered', [False, True])
def test_t3_matches_a_loop_over_inputs(per, weight_on, centered):
  pt, ft, x = _models()
  kw = dict(lo=0.1, hi=0.9, gamma=6.0)
  want, lam = _reference(pt, ft, x, per=per, weight_on=weight_on,
                         centered=centered, **kw)
  got = mj.methods.t3_apply(_apply, pt, ft, x, lambda_min=0.1,
                            lambda_max=0.9, gamma=6.0, per=per,
                            weight_on=weight_on, centered=centered)
  np.testing.assert_allclose(got.lambdas, lam, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.outputs, want, rtol=1e-4, atol=1e-5)
  # The coefficients really vary per input (else the test proves little).
  if per == 'sample':
    assert np.ptp(lam) > 1e-2


def test_identical_models_give_the_midpoint_and_the_model():
  pt, _, x = _models()
  out = mj.methods.t3_apply(_apply, pt, pt, x, lambda_min=0.2, lambda_max=0.6)
  np.testing.assert_allclose(out.lambdas, np.full(7, 0.4), rtol=1e-6)
  np.testing.assert_allclose(out.outputs, _apply(pt, x), rtol=1e-5, atol=1e-6)
  cen = mj.methods.t3_coefficients(_apply(pt, x), _apply(pt, x),
                                   lambda_min=0.2, lambda_max=0.6,
                                   centered=True)
  np.testing.assert_allclose(cen, np.full(7, 0.2), rtol=1e-5)


def test_chunked_equals_whole_batch_and_jit_equals_eager():
  pt, ft, x = _models()
  whole = mj.methods.t3_apply(_apply, pt, ft, x, gamma=3.0)
  chunked = mj.methods.t3_apply(_apply, pt, ft, x, gamma=3.0, chunk=3)
  np.testing.assert_allclose(chunked.outputs, whole.outputs, rtol=1e-6)
  jitted = jax.jit(lambda g: mj.methods.t3_apply(_apply, pt, ft, x, gamma=g)
                   )(3.0)
  np.testing.assert_allclose(jitted.outputs, whole.outputs, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(jitted.lambdas, whole.lambdas, rtol=1e-6)


def test_one_compile_across_a_sweep():
  pt, ft, x = _models()

  @jax.jit
  def run_t3(gamma, lo, hi):
    return mj.methods.t3_apply(_apply, pt, ft, x, gamma=gamma, lambda_min=lo,
                               lambda_max=hi).outputs

  with testing.log_compilations() as log:
    outs = [run_t3(g, lo, 1.0) for g in (0.5, 2.0, 8.0) for lo in (0., .3)]
  assert log.count('run_t3') == 1
  assert not np.allclose(outs[0], outs[-1])
  # The whole sweep also vmaps into one call.
  swept = jax.vmap(run_t3, in_axes=(0, None, None))(
      jnp.array([0.5, 2.0, 8.0]), 0.0, 1.0)
  np.testing.assert_allclose(swept[1], outs[2], rtol=1e-5, atol=1e-6)


def test_bf16_models_keep_working():
  pt, ft, x = _models()
  half = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  out = mj.methods.t3_apply(_apply, half(pt), half(ft),
                            x.astype(jnp.bfloat16), gamma=3.0)
  assert out.outputs.dtype == jnp.bfloat16
  ref = mj.methods.t3_apply(_apply, pt, ft, x, gamma=3.0)
  np.testing.assert_allclose(np.asarray(out.outputs, np.float32), ref.outputs,
                             rtol=0.1, atol=0.1)


@pytest.mark.parametrize('kwargs, match', [
    (dict(per='token'), "per must be 'sample' or 'batch'"),
    (dict(weight_on='base'), "weight_on must be"),
    (dict(gamma=-1.0), 'gamma must lie in'),
    (dict(chunk=0), 'chunk'),
])
def test_bad_settings_raise(kwargs, match):
  pt, ft, x = _models()
  with pytest.raises(ValueError, match=match):
    mj.methods.t3_apply(_apply, pt, ft, x, **kwargs)


def test_mismatched_models_name_the_leaf():
  pt, ft, x = _models()
  ft = {**ft, 'head': ft['head'][:, :2]}
  with pytest.raises(ValueError, match='head'):
    mj.methods.t3_apply(_apply, pt, ft, x)
