"""Interpolation primitives against NumPy references, identities, compilation."""


import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

SHAPES = [(6,), (2, 3, 2)]
settings = hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
shapes = st.sampled_from(SHAPES)


def _rand(seed, shape, k):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(k)]


def _merge(tx, base, models):
  b = None if base is None else {'w': jnp.asarray(base)}
  out = mj.merge(tx, b, [{'w': jnp.asarray(m)} for m in models])
  return np.asarray(out['w'])


def _close(a, b, tol=2e-5):
  testing.assert_trees_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# NumPy references (float64), written from the mergekit formulas.


def np_slerp(t, a, b, thr=0.9995):
  a, b = a.astype(np.float64), b.astype(np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
  dot = np.clip(np.sum(a / na * b / nb), -1, 1)
  if abs(dot) > thr:
    return (1 - t) * a + t * b
  th = np.arccos(dot)
  return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def np_nuslerp_vec(t, a, b):
  ua = a / max(np.linalg.norm(a), 1e-7)
  ub = b / max(np.linalg.norm(b), 1e-7)
  c = np.clip(ua @ ub, -1, 1)
  if 1 - c * c <= 1e-16:
    return (1 - t) * a + t * b
  th = np.arccos(c)
  return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def np_nuslerp(w, a, b, base=None, flatten=True, axis=-1):
  t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
  a, b = a.astype(np.float64), b.astype(np.float64)
  if base is not None:
    a, b = a - base, b - base
  if flatten or a.ndim < 2:
    out = np_nuslerp_vec(t, a.ravel(), b.ravel()).reshape(a.shape)
  else:
    am, bm = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
    rows = [np_nuslerp_vec(t, x, y) for x, y in
            zip(am.reshape(-1, am.shape[-1]), bm.reshape(-1, bm.shape[-1]))]
    out = np.moveaxis(np.stack(rows).reshape(am.shape), -1, axis)
  return out if base is None else out + base


def np_multislerp(w, xs, base=None, normalize=True, eps=1e-8):
  if len(xs) == 1:
    return xs[0]
  x = np.stack(xs).astype(np.float64)
  if base is not None:
    x = x - base
  xf = x.reshape(len(xs), -1)
  w = np.asarray(w, np.float64)
  if normalize:
    w = w / w.sum()
  norms = np.linalg.norm(xf, axis=1, keepdims=True)
  u = xf / (norms + eps)
  m = (u * w[:, None]).sum(0)
  m = m / np.linalg.norm(m)
  tang = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
  ell = np.linalg.norm(tang) + eps
  y = m * np.cos(ell) + tang * np.sin(ell) / ell
  out = (y * (norms[:, 0] * w).sum()).reshape(x.shape[1:])
  return out if base is None else out + base


def np_karcher(xs, alphas=None, max_iter=10, tol=1e-5):
  x = [np.asarray(v, np.float64).ravel() for v in xs]
  n = len(x)
  if n == 1:
    return xs[0]
  alphas = np.full(n, 1 / n) if alphas is None else np.asarray(alphas) / np.sum(alphas)
  norms = [np.linalg.norm(v) for v in x]
  units = [v / nv if nv > 0 else v * 0 for v, nv in zip(x, norms)]
  valid = [i for i in range(n) if norms[i] > tol]
  if not valid:
    return np.zeros_like(xs[0])
  na = np.array([alphas[i] for i in valid])
  na = na / na.sum()
  vu = [units[i] for i in valid]
  mean = sum(a * u for a, u in zip(na, vu))
  mn = np.linalg.norm(mean)
  mean = vu[0].copy() if mn < tol else mean / mn
  for _ in range(max_iter):
    tang = np.zeros_like(mean)
    for a, u in zip(na, vu):
      dot = np.clip(mean @ u, -1, 1)
      th = np.arccos(dot)
      if th < tol:
        continue
      tang += a * th / np.sin(th) * (u - dot * mean)
    tn = np.linalg.norm(tang)
    if tn < tol:
      break
    mean = np.cos(tn) * mean + np.sin(tn) * tang / tn
    un = np.linalg.norm(mean)
    if un > tol:
      mean = mean / un
  return (sum(a * nv for a, nv in zip(alphas, norms)) * mean).reshape(
      np.shape(xs[0]))


def np_model_stock(base, xs, filter_wise=False, convention='mergekit',
                   axis=-1):
  base = base.astype(np.float64)
  x = np.stack(xs).astype(np.float64)
  k = len(xs)
  if filter_wise and base.ndim >= 2:
    b = np.moveaxis(base, axis, -1)
    shp = b.shape
    b = b.reshape(-1, shp[-1])
    v = np.moveaxis(x, axis % base.ndim + 1, -1).reshape(k, -1, shp[-1])
  else:
    b, v, shp = base.reshape(1, -1), x.reshape(k, 1, -1), None
  tau = v - b[None]
  out = []
  for r in range(b.shape[0]):
    cs = []
    for i in range(k):
      for j in range(i + 1, k):
        ni, nj = np.linalg.norm(tau[i, r]), np.linalg.norm(tau[j, r])
        if convention == 'mergekit':
          cs.append(np.clip(tau[i, r] @ tau[j, r] / max(ni * nj, 1e-6), -1, 1))
        else:
          cs.append(np.arccos(np.clip(tau[i, r] @ tau[j, r] / (ni * nj + 1e-8),
                                      -1, 1)))
    if convention == 'mergekit':
      c = np.mean(cs)
      den = 1 + (k - 1) * c
      t = 0.0 if abs(den) < 1e-6 else k * c / den
    else:
      c = np.cos(np.mean(cs))
      t = k * c / ((k - 1) * c + 1 + 1e-8)
    out.append(t * v[:, r].mean(0) + (1 - t) * b[r])
  out = np.stack(out)
  if shp is None:
    return out.reshape(base.shape)
  return np.moveaxis(out.reshape(shp), -1, axis)


def np_nearswap(t, a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
  return w * b + (1 - w) * a


def np_arcee(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = sm(b) + 1e-8, sm(a) + 1e-8
  kl = np.sum(p * np.log(p / q), -1, keepdims=True)
  imp = np.abs(b - a) * kl
  s = np.sort(imp.ravel())
  q1, med, q3 = (s[int(q * (s.size - 1))] for q in (0.25, 0.5, 0.75))
  return a + (imp >= med + 1.5 * (q3 - q1)) * (b - a)


# ---------------------------------------------------------------------------
# Primitives vs references.


@settings
@hypothesis.given(seed=seeds, t=st.floats(-0.5, 1.5))
def test_lerp_matches_numpy(seed, t):
  a, b = _rand(seed, (3, 4), 2)
  _close(_merge(mj.transforms.lerp_reduce(t), a, [b]), (1 - t) * a + t * b)


@settings
@hypothesis.given(seed=seeds, t=st.floats(0, 1),
                  scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_slerp_matches_numpy(seed, t, scale):
  a, b = _rand(seed, (3, 4), 2)
  _close(_merge(mj.transforms.slerp_reduce(t), a, [b * scale]), np_slerp(t, a, b * scale),
         tol=2e-5 * max(1, scale))


def test_slerp_endpoints_and_collinear_fallback():
  a, b = _rand(1, (3, 4), 2)
  _close(_merge(mj.transforms.slerp_reduce(0.0), a, [b]), a, 1e-6)
  _close(_merge(mj.transforms.slerp_reduce(1.0), a, [b]), b, 1e-6)
  for c in (2.5, -3.0):  # parallel and antiparallel: both fall back to lerp
    _close(_merge(mj.transforms.slerp_reduce(0.3), a, [c * a]), 0.7 * a + 0.3 * c * a)
  # Just inside the threshold (dot ~ 0.9999 > 0.9995) lerp, just outside slerp.
  near = a + 0.01 * np.linalg.norm(a) / np.linalg.norm(b) * b
  _close(_merge(mj.transforms.slerp_reduce(0.5), a, [near]), 0.5 * (a + near))
  _close(_merge(mj.transforms.slerp_reduce(0.5, dot_threshold=1.0), a, [near]),
         np_slerp(0.5, a, near, thr=1.0), 1e-4)
  # A zero base keeps a unit "norm": dot = 0, a quarter circle, so t = 0.25
  # gives sin(pi/8) b (mergekit's behaviour, not lerp's 0.25 b).
  _close(_merge(mj.transforms.slerp_reduce(0.25), np.zeros(4, np.float32), [b[0]]),
         np.sin(np.pi / 8) * b[0])


@settings
@hypothesis.given(seed=seeds, shape=shapes, w0=st.floats(0.1, 3),
                  w1=st.floats(0.1, 3), with_base=st.booleans(),
                  flatten=st.booleans(), axis=st.sampled_from([0, -1]))
def test_nuslerp_matches_numpy(seed, shape, w0, w1, with_base, flatten, axis):
  base, a, b = _rand(seed, shape, 3)
  got = _merge(mj.transforms.nuslerp_reduce([w0, w1], flatten=flatten, axis=axis),
               base if with_base else None, [a, b])
  want = np_nuslerp([w0, w1], a, b, base if with_base else None, flatten, axis)
  _close(got, want, 5e-5)


def test_nuslerp_orientation_torch_vs_flax():
  # mergekit's per-row vectors of a PyTorch (out, in) weight are the rows;
  # the same vectors are the columns (axis=0) of the Flax (in, out) kernel.
  base, a, b = _rand(3, (5, 4), 3)
  torch_layout = _merge(mj.transforms.nuslerp_reduce([1., 2.], flatten=False), base, [a, b])
  flax_layout = _merge(mj.transforms.nuslerp_reduce([1., 2.], flatten=False, axis=0),
                       base.T, [a.T, b.T])
  _close(flax_layout, torch_layout.T, 1e-6)
  row_wise = _merge(mj.transforms.nuslerp_reduce([1., 2.], flatten=False, row_wise=True), base,
                    [a, b])
  _close(row_wise, np_nuslerp([1., 2.], a, b, base, False, 0), 5e-5)
  assert not np.allclose(row_wise, torch_layout)


def test_nuslerp_zero_weight_sum_and_endpoints():
  base, a, b = _rand(4, (6,), 3)
  _close(_merge(mj.transforms.nuslerp_reduce([1., -1.]), None, [a, b]),
         np_nuslerp([1., 1.], a, b), 5e-5)  # t = 0.5
  _close(_merge(mj.transforms.nuslerp_reduce([1., 0.]), base, [a, b]), a, 1e-5)
  _close(_merge(mj.transforms.nuslerp_reduce([0., 1.]), base, [a, b]), b, 1e-5)


def test_use_base_false_composes_with_task_vectors():
  # The "relative to base" forms are the base-less primitives between
  # task_vectors and apply_to_base.
  base, a, b, c = _rand(11, (3, 4), 4)
  for rel, absolute, models in [
      (mj.transforms.nuslerp_reduce([1., 2.], flatten=False), mj.transforms.nuslerp_reduce([1., 2.], flatten=False,
                                                      use_base=False), [a, b]),
      (mj.transforms.multislerp_reduce([1., 2., 3.]), mj.transforms.multislerp_reduce([1., 2., 3.], use_base=False),
       [a, b, c])]:
    chained = mj.chain(mj.transforms.task_vectors(), absolute, mj.transforms.apply_to_base())
    _close(_merge(chained, base, models), _merge(rel, base, models), 1e-5)


@settings
@hypothesis.given(seed=seeds, k=st.integers(2, 3), with_base=st.booleans(),
                  normalize=st.booleans())
def test_multislerp_matches_numpy(seed, k, with_base, normalize):
  base, *xs = _rand(seed, (3, 4), k + 1)
  w = np.random.default_rng(seed).uniform(0.2, 2.0, k)
  got = _merge(mj.transforms.multislerp_reduce(w, normalize_weights=normalize),
               base if with_base else None, xs)
  want = np_multislerp(w, xs, base if with_base else None, normalize)
  _close(got, want, 5e-5)


def test_multislerp_one_model_and_antipodal_fallback():
  base, a = _rand(5, (3, 4), 2)
  _close(_merge(mj.transforms.multislerp_reduce([0.3]), base, [a]), a, 0)
  # a and -a with equal weights: mean direction is zero -> weighted sum.
  _close(_merge(mj.transforms.multislerp_reduce([1., 1.]), None, [a, -a]), np.zeros_like(a), 1e-6)
  # (Exactly representable values: with rounding noise in x_i = theta_i - base
  # the mean direction is not below eps and mergekit, like mergejax, follows
  # the noise.)
  base, a = np.full_like(a, 2.0), np.round(a * 4) / 4
  _close(_merge(mj.transforms.multislerp_reduce([1., 1.]), base, [base + a, base - a]), base, 1e-6)


@settings
@hypothesis.given(seed=seeds, k=st.integers(2, 3), weighted=st.booleans())
def test_karcher_matches_numpy(seed, k, weighted):
  xs = _rand(seed, (3, 4), k)
  w = np.random.default_rng(seed).uniform(0.2, 2.0, k) if weighted else None
  _close(_merge(mj.transforms.karcher_reduce(weights=w), None, xs), np_karcher(xs, w), 1e-4)


def test_karcher_identities():
  a, b, c = _rand(6, (3, 4), 3)
  # Identical directions: the direction itself, times the mean norm.
  got = _merge(mj.transforms.karcher_reduce(), None, [a, 2 * a, 3 * a])
  _close(got, 2 * a, 1e-5)
  # weights=None is mergekit's uniform alphas; uniform weights agree,
  # non-uniform ones do not.
  u = _merge(mj.transforms.karcher_reduce(), None, [a, b, c])
  _close(_merge(mj.transforms.karcher_reduce(weights=[2., 2., 2.]), None, [a, b, c]), u, 1e-6)
  assert not np.allclose(_merge(mj.transforms.karcher_reduce(weights=[5., 1., 1.]), None,
                                [a, b, c]), u, atol=1e-3)
  # Zero-norm inputs drop out of the direction but count in the norm average.
  z = np.zeros_like(a)
  _close(_merge(mj.transforms.karcher_reduce(), None, [a, z]), np_karcher([a, z]), 1e-5)
  _close(_merge(mj.transforms.karcher_reduce(), None, [z, z]), z, 0)
  _close(_merge(mj.transforms.karcher_reduce(), None, [a]), a, 0)
  # max_iter=0 is the normalized mean direction.
  _close(_merge(mj.transforms.karcher_reduce(max_iter=0), None, [a, b]),
         np_karcher([a, b], max_iter=0), 1e-5)


@pytest.mark.parametrize('max_iter', [1, 10])
def test_karcher_batched_leaves_keep_their_own_stopping_rule(max_iter):
  # Same-size leaves share one vmapped while_loop; each must still stop on
  # its own (identical directions converge at once, random ones iterate).
  a, b, c = _rand(9, (3, 4), 3)
  d = _rand(10, (5,), 3)
  models = [{'x': a, 'y': a * s, 'z': d[i], 'v': v}
            for i, (s, v) in enumerate([(1., a), (2., b), (3., c)])]
  got = mj.merge(mj.transforms.karcher_reduce(max_iter=max_iter), None,
                 [jax.tree.map(jnp.asarray, m) for m in models])
  for name in ('x', 'y', 'z', 'v'):
    want = np_karcher([m[name] for m in models], max_iter=max_iter)
    _close(np.asarray(got[name]), want, 1e-4)


@settings
@hypothesis.given(seed=seeds, shape=shapes, k=st.integers(2, 3),
                  filter_wise=st.booleans(),
                  convention=st.sampled_from(['mergekit', 'fusionbench']),
                  axis=st.sampled_from([0, -1]))
def test_model_stock_matches_numpy(seed, shape, k, filter_wise, convention,
                                   axis):
  base, *xs = _rand(seed, shape, k + 1)
  got = _merge(mj.transforms.model_stock_reduce(filter_wise=filter_wise, convention=convention,
                              axis=axis), base, xs)
  want = np_model_stock(base, xs, filter_wise, convention, axis)
  _close(got, want, 5e-5)


def test_model_stock_ratio_formula_and_conventions():
  ratio = jax.jit(mj.transforms.model_stock_ratio, static_argnames='convention')
  rng = np.random.default_rng(7)
  # Two task vectors at a known angle: t = 2 cos / (1 + cos) for both.
  phi = 1.0
  tau = np.array([[1., 0., 0.], [np.cos(phi), np.sin(phi), 0.]], np.float32)
  for conv in ('mergekit', 'fusionbench'):
    t = ratio(jnp.asarray(tau)[:, None], convention=conv)
    _close(np.asarray(t), [[2 * np.cos(phi) / (1 + np.cos(phi))]], 1e-5)
  # K = 3: mean of cosines != cosine of mean angle.
  tau = rng.standard_normal((3, 1, 8)).astype(np.float32)
  a = float(ratio(jnp.asarray(tau))[0, 0])
  b = float(ratio(jnp.asarray(tau), convention='fusionbench')[0, 0])
  assert abs(a - b) > 1e-4
  # Parallel task vectors: t = 1 (the fine-tune average); orthogonal: t = 0.
  base = rng.standard_normal(4).astype(np.float32)
  d = rng.standard_normal(4).astype(np.float32)
  _close(_merge(mj.transforms.model_stock_reduce(), base, [base + d, base + 2 * d]), base + 1.5 * d)


def test_model_stock_orientation_torch_vs_flax():
  base, *xs = _rand(8, (5, 3), 4)
  torch_layout = _merge(mj.transforms.model_stock_reduce(filter_wise=True), base, xs)
  flax_layout = _merge(mj.transforms.model_stock_reduce(filter_wise=True, axis=0), base.T,
                       [x.T for x in xs])
  _close(flax_layout, torch_layout.T, 1e-6)


@settings
@hypothesis.given(seed=seeds, t=st.floats(0, 2))
def test_nearswap_matches_numpy(seed, t):
  a, b = _rand(seed, (3, 4), 2)
  _close(_merge(mj.transforms.nearswap_reduce(t), a, [b]), np_nearswap(t, a, b))


@settings
@hypothesis.given(seed=seeds, shape=st.sampled_from([(4, 9), (3, 2, 5)]),
                  axis=st.sampled_from([0, -1]))
def test_arcee_fusion_matches_numpy(seed, shape, axis):
  a, b = _rand(seed, shape, 2)
  b = a + b * np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32) ** 4
  got = _merge(mj.transforms.arcee_fusion_reduce(axis=axis), a, [b])
  want = np.moveaxis(np_arcee(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)),
                     -1, axis)
  _close(got, want, 1e-5)


# ---------------------------------------------------------------------------
# Methods, dtypes, compilation.


def _zoo(k, seed=0, dtype=jnp.float32):
  shapes = {'dense/kernel': (4, 3), 'dense/bias': (3,), 'scale': ()}
  return testing.random_models(shapes, k, seed=seed, dtype=dtype)


METHODS = [
    (lambda: mj.methods.nuslerp(weight=[1., 2.], nuslerp_flatten=False), 2),
    (lambda: mj.methods.karcher(), 3),  # while_loop vs a Python loop
]


@pytest.mark.parametrize('make, k', METHODS)
def test_jit_equals_eager(make, k):
  tx = make()
  # Eager (op-by-op) execution compiles every op: keep it to one small leaf.
  rng = np.random.default_rng(k)
  base = {'w': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  stacked = {'w': jnp.asarray(rng.standard_normal((k, 4, 3)), jnp.float32)}
  state = tx.init(base)
  with jax.disable_jit():
    eager, _ = tx.update(stacked, state, base)
  jitted, _ = jax.jit(lambda u, s, p: tx.update(u, s, p))(stacked, state, base)
  _close(eager['w'], jitted['w'], 1e-5)


def test_result_keeps_base_structure_and_dtype():
  # (The parity tests check every method's output dtype with bf16 inputs.)
  base16, models16 = _zoo(2, dtype=jnp.bfloat16)
  out = mj.merge(mj.methods.nuslerp(nuslerp_flatten=False), base16, models16)
  assert jax.tree.structure(out) == jax.tree.structure(base16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


SWEEPS = [
    ('slerp', lambda v: mj.methods.slerp(t=v), 1, [0.0, 0.4, 1.0]),
    ('nuslerp', lambda v: mj.methods.nuslerp(weight=jnp.stack([1.0 - v, v])
                                             if isinstance(v, jax.Array)
                                             else [1.0 - v, v]),
     2, [0.1, 0.5, 0.9]),
    ('multislerp', lambda v: mj.methods.multislerp(
        weight=jnp.stack([jnp.asarray(v), jnp.asarray(1.0), jnp.asarray(2.0)])),
     3, [0.5, 1.0, 3.0]),
    ('karcher_tol', lambda v: mj.methods.karcher(tol=v), 3, [1e-5, 1e-3, 1e-1]),
    ('nearswap', lambda v: mj.methods.nearswap(t=v), 1, [0.01, 0.5, 2.0]),
    ('lerp', lambda v: mj.transforms.lerp_reduce(v), 1, [0.0, 0.5, 1.0]),
]


@pytest.mark.parametrize('name, make, k, values', SWEEPS,
                         ids=[s[0] for s in SWEEPS])
def test_vmapped_sweep_equals_loop_without_recompiling(name, make, k, values):
  del name
  rng = np.random.default_rng(k)
  base = {'w': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  models = [{'w': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
            for _ in range(k)]
  loop = [mj.merge(make(v), base, models) for v in values[:1]]
  with testing.log_compilations() as log:
    loop += [mj.merge(make(v), base, models) for v in values[1:]]
  assert log.count('_run') == 0, 'new hyperparameter values recompiled'
  sweep = jax.jit(jax.vmap(lambda v: mj.merge(make(v), base, models)))(
      jnp.asarray(values, jnp.float32))
  for i, single in enumerate(loop):
    jax.tree.map(lambda s, o: _close(s[i], o, 1e-5), sweep, single)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('make, k, base, match', [
    (lambda: mj.transforms.slerp_reduce(0.5), 2, True, 'exactly 1 model'),
    (lambda: mj.transforms.slerp_reduce(0.5), 1, False, 'base'),
    (lambda: mj.transforms.lerp_reduce(0.5), 3, True, 'exactly 1 model'),
    (lambda: mj.transforms.nuslerp_reduce(), 3, True, 'exactly 2 model'),
    (lambda: mj.transforms.nuslerp_reduce(), 1, False, 'exactly 2 model'),
    (lambda: mj.transforms.nuslerp_reduce([1., 2., 3.]), 2, True, 'shape'),
    (lambda: mj.transforms.model_stock_reduce(), 1, True, 'at least 2'),
    (lambda: mj.transforms.model_stock_reduce(), 2, False, 'base'),
    (lambda: mj.transforms.nearswap_reduce(0.1), 2, True, 'exactly 1 model'),
    (lambda: mj.transforms.arcee_fusion_reduce(), 2, True, 'exactly 1 model'),
    (lambda: mj.transforms.multislerp_reduce([1., 2.]), 3, True, 'shape'),
    (lambda: mj.transforms.karcher_reduce(weights=[1., 2.]), 3, True, 'shape'),
    (lambda: mj.transforms.nuslerp_reduce(flatten=False, axis=2), 2, True, 'dense/kernel'),
])
def test_bad_inputs_raise_clear_errors(make, k, base, match):
  b, models = _zoo(k)
  with pytest.raises(ValueError, match=match):
    mj.merge(make(), b if base else None, models)


def test_bad_hyperparameters_raise():
  with pytest.raises(ValueError, match='row_wise'):
    mj.transforms.nuslerp_reduce(row_wise=True, axis=0)
  with pytest.raises(ValueError, match='convention'):
    mj.transforms.model_stock_reduce(convention='paper')
  with pytest.raises(ValueError, match='dot_threshold'):
    mj.transforms.slerp_reduce(0.5, dot_threshold=1.5)
  with pytest.raises(ValueError, match='max_iter'):
    mj.transforms.karcher_reduce(max_iter=-1)
  with pytest.raises(ValueError, match='weights'):
    mj.transforms.karcher_reduce(weights=[1., -1.])
  with pytest.raises(ValueError, match='t must'):
    mj.transforms.slerp_reduce(float('nan'))
  with pytest.raises(ValueError, match='sum to zero'):
    mj.transforms.multislerp_reduce([1., -1.])
  with pytest.raises(ValueError, match='sum to zero'):
    mj.transforms.karcher_reduce(weights=[0., 0.])
  mj.transforms.multislerp_reduce([1., -1.], normalize_weights=False)  # fine unnormalized
