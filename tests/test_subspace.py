"""Tests of the subspace primitives and the subspace / mask merge methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing

M = mj.methods


def _zoo(k=3, seed=0, scale=0.1):
  shapes = {'layers_0/kernel': (7, 5), 'layers_0/bias': (5,),
            'layers_1/kernel': (5, 9), 'head': (9, 3)}
  return testing.random_models(shapes, k, seed=seed, scale=scale)


def _tvs(base, models, path):
  get = lambda t: np.asarray(eval('t' + path), np.float64)  # pylint: disable=eval-used
  return [get(m) - get(base) for m in models]


def _close(a, b, tol=1e-4):
  testing.assert_trees_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ NumPy refs


def _polar(x):
  p, _, qh = np.linalg.svd(x, full_matrices=False)
  return p @ qh


def np_tsv(tvs):
  k = len(tvs)
  m, n = tvs[0].shape
  r = min(m, n)
  kk = int(r * (1 / k))
  u_cat = np.zeros((m, r)); s_cat = np.zeros(r); vh_cat = np.zeros((r, n))
  for i, t in enumerate(tvs):
    u, s, vh = np.linalg.svd(t, full_matrices=False)
    u_cat[:, i * kk:(i + 1) * kk] = u[:, :kk]
    s_cat[i * kk:(i + 1) * kk] = s[:kk]
    vh_cat[i * kk:(i + 1) * kk] = vh[:kk]
  return _polar(u_cat) @ np.diag(s_cat) @ _polar(vh_cat)


def np_iso_c(tvs):
  u, s, vh = np.linalg.svd(sum(tvs), full_matrices=False)
  return u @ np.diag(np.full_like(s, s.mean())) @ vh


def np_iso_cts(tvs, f=0.8):
  """Torch orientation (out, in), FusionBench iso_cts."""
  k = len(tvs)
  m, n = tvs[0].shape
  r = min(m, n)
  kc = int(r * f)
  kc = r - round((r - kc) / k) * k
  d = int((r - kc) / k)
  u, s, vh = np.linalg.svd(sum(tvs), full_matrices=False)
  uc, sc, vhc = u[:, :kc], s[:kc], vh[:kc]
  cu = np.zeros((m, r)); cs = np.zeros(r); cv = np.zeros((r, n))
  for i, t in enumerate(tvs):
    ut, st, vht = np.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
    cu[:, i * d:(i + 1) * d] = ut[:, :d]
    cs[i * d:(i + 1) * d] = st[:d]
    cv[i * d:(i + 1) * d] = vht[:d]
  cu[:, k * d:] = uc; cs[k * d:] = sc; cv[k * d:] = vhc
  return _polar(cu) @ np.diag(np.full(r, cs.mean())) @ _polar(cv)


# ------------------------------------------------------------------ primitives


def test_svd_basis_shapes_and_reconstruction():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 4)), jnp.float32)
  conv = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 2, 3, 5)),
                     jnp.float32)
  tx = mj.chain(mj.transforms.svd_basis(None, conv='reshape'), mj.transforms.from_basis(conv='reshape'))
  params = {'w': x[0], 'c': conv[0]}
  out, _ = tx.update({'w': x, 'c': conv}, tx.init(params), params)
  _close(out['w'], np.asarray(x), 1e-4)
  _close(out['c'], np.asarray(conv), 1e-4)
  tx = mj.transforms.svd_basis(2)
  b = tx.update({'w': x}, tx.init(None))[0]['w']
  assert b.u.shape == (3, 6, 2) and b.s.shape == (3, 2) and b.vh.shape == (3, 2, 4)
  s_ref = np.linalg.svd(np.asarray(x), compute_uv=False)[:, :2]
  _close(b.s, s_ref)


@pytest.mark.parametrize('tx, match', [
    (lambda: mj.transforms.svd_basis(5, non_matrix='keep'), r"rank 5 is impossible for leaf 'w'"),
    (lambda: mj.transforms.svd_basis(2), r"leaf 'b' .* not a matrix"),
    (lambda: mj.transforms.svd_basis(2, include=r'b$'), r"leaf 'b' has shape \(4,\)"),
    (lambda: mj.transforms.project(9, non_matrix='keep'), r"rank 9 is impossible for leaf 'w'"),
])
def test_primitive_errors_name_the_leaf(tx, match):
  u = {'w': jnp.ones((2, 4, 3)), 'b': jnp.ones((2, 4))}
  t = tx()
  with pytest.raises(ValueError, match=match):
    t.update(u, t.init(None))


@pytest.mark.parametrize('side, layout', [('output', 'in_out'), ('input', 'in_out'),
                                          ('output', 'out_in'), ('input', 'out_in')])
@pytest.mark.parametrize('mode', ['onto', 'orthogonal'])
def test_project_matches_numpy(side, layout, mode):
  x = np.random.default_rng(0).standard_normal((3, 6, 4))
  tx = mj.transforms.project(2, side=side, mode=mode, layout=layout)
  out = tx.update({'w': jnp.asarray(x, jnp.float32)}, tx.init(None))[0]['w']
  u, _, vh = np.linalg.svd(x.sum(0), full_matrices=False)
  # The output space is the column space of (out, in) = the row space of (in, out).
  left = (side == 'output') == (layout == 'out_in')
  ref = (u[:, :2] @ u[:, :2].T @ x) if left else (x @ vh[:2].T @ vh[:2])
  if mode == 'orthogonal':
    ref = x - ref
  _close(out, ref)


def test_layer_scale_matches_formula_and_errors():
  u = {'blocks': {'0': {'w': jnp.ones(2)}, '3': {'w': jnp.ones(2)}},
       'embed': jnp.ones(2)}
  tx = mj.transforms.layer_scale(0.2, 0.6, pattern=r'blocks/(\d+)/', num_layers=4)
  out = tx.update(u, tx.init(u))[0]
  _close(out['blocks']['0']['w'], 0.2)
  _close(out['blocks']['3']['w'], 0.8)
  _close(out['embed'], 0.2)
  tx = mj.transforms.layer_scale(0.2, 0.6, pattern=r'nothing_(\d+)')
  with pytest.raises(ValueError, match='no parameter path has a layer index'):
    tx.update(u, tx.init(u))


def test_mask_builders_match_numpy():
  rng = np.random.default_rng(0)
  tv = {'a': rng.standard_normal((3, 10)), 'b': rng.standard_normal((3, 4, 5))}
  tvj = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tv)
  m = jax.jit(lambda t: mj.transforms.magnitude_mask(t, 0.3))({'a': tvj['a']})
  for key, x in [('a', tv['a'])]:
    flat = np.abs(x.reshape(3, -1))
    k = round(0.3 * flat.shape[1])
    thr = -np.sort(-flat, axis=1)[:, k - 1:k]
    np.testing.assert_array_equal(np.asarray(m[key]).reshape(3, -1), flat >= thr)
  g = jax.jit(lambda t: mj.transforms.magnitude_mask(t, 0.3, scope='global'))(tvj)
  allv = np.concatenate([np.abs(x.reshape(3, -1)) for x in tv.values()], 1)
  thr = -np.sort(-allv, axis=1)[:, round(0.3 * allv.shape[1]) - 1][:, None]
  for key, x in tv.items():
    np.testing.assert_array_equal(np.asarray(g[key]).reshape(3, -1),
                                  np.abs(x.reshape(3, -1)) >= thr)
  mtl = jax.tree.map(lambda x: x.sum(0), tvj)
  tm = mj.transforms.compute_tall_masks(tvj, mtl, jnp.array([0.2, 0.4, 0.6]))
  for key, x in tv.items():
    lam = np.array([0.2, 0.4, 0.6]).reshape((3,) + (1,) * (x.ndim - 1))
    np.testing.assert_array_equal(tm[key], np.abs(x) > lam * np.abs(x.sum(0) - x))
  c = mj.transforms.consensus_mask(tm, 2)
  np.testing.assert_array_equal(c['a'], np.asarray(tm['a']).sum(0) >= 2)


# ------------------------------------------------------------------ methods


def test_tsv_iso_match_numpy():
  base, models = _zoo(k=3)
  for tx, ref in [(M.tsv(alpha=0.7), np_tsv), (M.iso_c(alpha=0.7), np_iso_c)]:
    out = mj.merge(tx, base, models)
    for path in ["['layers_0']['kernel']", "['layers_1']['kernel']", "['head']"]:
      tvs = _tvs(base, models, path)
      want = np.asarray(eval('base' + path)) + 0.7 * ref(tvs)  # pylint: disable=eval-used
      _close(eval('out' + path), want)  # pylint: disable=eval-used
    # Non-matrix leaves: mean of the task vectors (FusionBench's rule).
    tvs = _tvs(base, models, "['layers_0']['bias']")
    _close(out['layers_0']['bias'], np.asarray(base['layers_0']['bias']) + 0.7 * np.mean(tvs, 0))


def test_iso_cts_layouts_match_numpy():
  base, models = _zoo(k=3)
  out = mj.merge(M.iso_cts(), base, models)
  for path in ["['layers_0']['kernel']", "['layers_1']['kernel']", "['head']"]:
    tvs = _tvs(base, models, path)  # Flax (in, out): torch view is the transpose.
    want = np.asarray(eval('base' + path)) + np_iso_cts([t.T for t in tvs]).T  # pylint: disable=eval-used
    _close(eval('out' + path), want)  # pylint: disable=eval-used
  # layout='out_in' on transposed leaves is the same merge, transposed.
  tr = lambda t: jax.tree.map(lambda x: x.T if x.ndim == 2 else x, t)
  out_t = mj.merge(M.iso_cts(layout='out_in'), tr(base), [tr(m) for m in models])
  jax.tree.map(lambda a, b: _close(a, np.asarray(b)), tr(out_t), out)


def test_tsv_is_transpose_equivariant_and_errors_on_tiny_matrices():
  base, models = _zoo(k=3)
  tr = lambda t: jax.tree.map(lambda x: x.T if x.ndim == 2 else x, t)
  a = mj.merge(M.tsv(), base, models)
  b = mj.merge(M.tsv(), tr(base), [tr(m) for m in models])
  jax.tree.map(lambda x, y: _close(x, np.asarray(y)), a, tr(b))
  base, models = _zoo(k=4)
  with pytest.raises(ValueError, match=r"leaf 'head' is a 9x3 matrix"):
    mj.merge(M.tsv(), base, models)
  out = mj.merge(M.tsv(exclude=r'^head'), base, models)  # excluded: averaged
  _close(out['head'], np.mean([np.asarray(m['head']) for m in models], 0))


def test_no_recompile_and_vmap_sweep():
  base, models = _zoo()
  mj.merge(M.iso_c(alpha=0.5), base, models)
  mj.merge(M.pcb(0.1), base, models)
  with testing.log_compilations() as log:
    for v in (0.2, 0.9):
      mj.merge(M.iso_c(alpha=v), base, models)
      mj.merge(M.pcb(v, lambda_=v), base, models)
  assert log.count('_run') == 0
  lams = jnp.array([0.3, 1.0])
  sweep = jax.jit(jax.vmap(lambda l: mj.merge(M.tsv(alpha=l), base, models)))(lams)
  for i, lam in enumerate(lams):
    single = mj.merge(M.tsv(alpha=float(lam)), base, models)
    jax.tree.map(lambda s, o: _close(s[i], np.asarray(o)), sweep, single)


def np_pcb(v, ratio):
  n, d = v.shape
  def clamp(x, lo_r, hi_r):
    sx = np.sort(x, axis=1)
    return np.clip(x, sx[:, int(d * lo_r)][:, None], sx[:, int(d * (1 - hi_r) - 1)][:, None])
  def normalize(x):
    mn, mx = x.min(1, keepdims=True), x.max(1, keepdims=True)
    return (x - mn) / (mx - mn)
  a = clamp(np.abs(v), 1e-4, 1e-4)
  vb = np.sign(v) * a
  score = np.exp(n * normalize(a) ** 2) * np.tanh(v * v.sum(0))
  beta = normalize(clamp(score, 1 - ratio, 0))
  return (beta * vb).sum(0) / np.maximum(beta.sum(0), 1e-12)


def test_pcb_matches_numpy():
  base, models = _zoo(k=3)
  out = mj.merge(M.pcb(0.2, lambda_=0.8), base, models)
  paths = mj.leaf_paths(base)
  flat = lambda t: np.concatenate([np.asarray(x, np.float64).reshape(-1)
                                   for x in jax.tree.leaves(t)])
  v = np.stack([flat(m) - flat(base) for m in models])
  _close(flat(out), flat(base) + 0.8 * np_pcb(v, 0.2), 2e-4)
  assert paths  # leaf order is jax's flattening order on both sides


def test_emr_matches_numpy_and_reconstructs():
  base, models = _zoo(k=3)
  out, st = mj.merge(M.emr(), base, models, return_state=True)
  keys = mj.leaf_paths(base)
  tv = [[np.asarray(x, np.float64) - np.asarray(b, np.float64)
         for x, b in zip(jax.tree.leaves(m), jax.tree.leaves(base))] for m in models]
  flags = [np.where(sum(t[j] for t in tv) > 0, 1., -1.) for j in range(len(keys))]
  masks = [[t[j] * flags[j] > 0 for j in range(len(keys))] for t in tv]
  uni = [flags[j] * np.max([np.abs(masks[i][j] * tv[i][j]) for i in range(3)], 0)
         for j in range(len(keys))]
  r = [sum(np.mean(np.abs(tv[i][j])) for j in range(len(keys)))
       / sum(np.mean(np.abs(masks[i][j] * uni[j])) for j in range(len(keys)))
       for i in range(3)]
  _close(st['emr'].rescalers, np.array(r))
  for i in range(3):
    rec = jax.tree.leaves(M.reconstruct(st, base, i))
    for j, b in enumerate(jax.tree.leaves(base)):
      _close(rec[j], np.asarray(b) + r[i] * masks[i][j] * uni[j])
  # The returned model is the mean of the task models.
  mean_rec = jax.tree.map(lambda *xs: sum(xs) / 3,
                          *[M.reconstruct(st, base, i) for i in range(3)])
  jax.tree.map(lambda a, b: _close(a, np.asarray(b)), out, mean_rec)


def test_tall_and_consensus():
  base, models = _zoo(k=3)
  _, st = mj.merge(M.tall_masks([0.2, 0.4, 0.6]), base, models, return_state=True)
  tv = _tvs(base, models, "['head']")
  mtl = sum(tv)
  for i, lam in enumerate([0.2, 0.4, 0.6]):
    m = np.abs(tv[i]) > lam * np.abs(mtl - tv[i])
    _close(M.reconstruct(st, base, i)['head'], np.asarray(base['head']) + m * mtl)
  out, st = mj.merge(M.consensus(0.5, k=2, tall_lambda=0.4), base, models,
                     return_state=True)
  ms = [np.abs(t) > 0.4 * np.abs(mtl - t) for t in tv]
  c = np.sum(ms, 0) >= 2
  _close(out['head'], np.asarray(base['head']) + 0.5 * c * mtl)
  # k = 0 is task arithmetic.
  ta = mj.merge(M.task_arithmetic(lambda_=0.5), base, models)
  out0 = mj.merge(M.consensus(0.5, k=0), base, models)
  jax.tree.map(lambda a, b: _close(a, np.asarray(b)), out0, ta)


def test_lines_matches_formula():
  base, models = _zoo(k=2)
  tx = M.lines(M.task_arithmetic(), beta=0.6)
  out = mj.merge(tx, base, models)
  # For task arithmetic at scale 1 the automatic alpha is 1/K.
  for path, lam in [("['layers_0']['kernel']", 0.5), ("['layers_1']['kernel']", 1.1),
                    ("['head']", 0.5)]:
    tvs = _tvs(base, models, path)
    _close(eval('out' + path), np.asarray(eval('base' + path)) + lam * sum(tvs))  # pylint: disable=eval-used
  out = mj.merge(M.lines(M.task_arithmetic(), alpha=0.1, beta=0.6), base, models)
  _close(out['head'], np.asarray(base['head']) + 0.1 * sum(_tvs(base, models, "['head']")))


def test_knots_task_arithmetic_is_task_arithmetic():
  base, models = _zoo(k=3)
  a = mj.merge(M.knots(other='sum'), base, models)
  b = mj.merge(M.task_arithmetic(), base, models)
  jax.tree.map(lambda x, y: _close(x, np.asarray(y)), a, b)
  # A non-linear inner merge on the aligned blocks changes the result.
  c = mj.merge(M.knots(mj.chain(mj.transforms.trim(0.3, scope='global'), mj.transforms.elect_sign(),
                                mj.transforms.disjoint_merge())), base, models)
  assert not np.allclose(c['head'], b['head'], atol=1e-3)


def np_widen(w0, ws, t=1.0, s=1.0):
  """Flax (in, out): units are rows."""
  def sig(x):
    return np.argsort(np.argsort(x, axis=-1, kind='stable'), axis=-1,
                      kind='stable') / x.shape[-1]
  def score(sg):
    e = np.exp(sg - sg.max(0)); sc = e / e.sum(0)
    return np.where(sg > t * sg.mean(1, keepdims=True), s, sc)
  mu0 = np.linalg.norm(w0, axis=1); mu = np.linalg.norm(ws, axis=2)
  d0 = w0 / mu0[:, None]; d = ws / mu[..., None]
  om = 0.5 * (score(sig(np.abs(mu - mu0))) + score(sig(1 - (d * d0).sum(-1))))
  return w0 + (om[..., None] * (ws - w0)).sum(0)


def test_widen_matches_numpy():
  base, models = _zoo(k=3)
  out = mj.merge(M.widen(), base, models)
  w0 = np.asarray(base['head'], np.float64)
  ws = np.stack([np.asarray(m['head'], np.float64) for m in models])
  _close(out['head'], np_widen(w0, ws))
  b0 = np.asarray(base['layers_0']['bias']); bs = np.stack(
      [np.asarray(m['layers_0']['bias']) for m in models])
  dl = bs - b0
  sg = np.abs(dl); e = np.exp(sg - sg.max(0)); sc = e / e.sum(0)
  sc = np.where(sg > sg.mean(1, keepdims=True), 1.0, sc)
  _close(out['layers_0']['bias'], b0 + (sc * dl).sum(0))


def _rec_error(st, base, models):
  rec = jax.vmap(lambda i: M.reconstruct(st, base, i))(jnp.arange(len(models)))
  return sum(float(jnp.sum((r - jnp.stack(ms)) ** 2)) for r, *ms in zip(
      jax.tree.leaves(rec), *[jax.tree.leaves(m) for m in models]))


def test_reversible_exact_at_full_budget_and_monotone():
  rng = np.random.default_rng(0)
  base = {'w': jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
          'b': jnp.asarray(rng.standard_normal(5), jnp.float32)}
  models = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), base) for _ in range(4)]
  errs = []
  for b in range(1, 5):
    _, st = mj.merge(M.reversible(b), base, models, return_state=True)
    errs.append(_rec_error(st, base, models))
    # Eckart-Young: the error is the sum of the discarded squared singular values.
    s2 = sum((np.linalg.svd(np.stack([np.asarray(m[k] - base[k], np.float64).reshape(-1)
                                      for m in models]), compute_uv=False) ** 2)[b:].sum()
             for k in base)
    assert errs[-1] == pytest.approx(s2, rel=1e-3, abs=1e-6)
  assert errs[-1] < 1e-8 and all(a > b for a, b in zip(errs, errs[1:])), errs
  for scope, centred in [('global', False), ('leaf', True), ('global', True)]:
    e = [_rec_error(mj.merge(M.reversible(b, scope=scope, centred=centred), base,
                             models, return_state=True)[1], base, models)
         for b in (2, 3, 4)]
    assert e[-1] < 1e-8 and e[0] >= e[1] >= e[2], (scope, centred, e)
  with pytest.raises(ValueError, match='budget 5 exceeds the number of models'):
    mj.merge(M.reversible(5), base, models)


def test_twin_reconstructs_and_mixes():
  base, models = _zoo(k=3)
  out, st = mj.merge(M.twin(density=1.0), base, models, return_state=True)
  ta = mj.merge(M.task_arithmetic(lambda_=0.29), base, models)
  jax.tree.map(lambda a, b: _close(a, np.asarray(b)), out, ta)
  for i in range(3):  # full rank: exclusive vectors rebuild each model
    jax.tree.map(lambda a, b: _close(a, np.asarray(b)), M.reconstruct(st, base, i),
                 models[i])
  mix = M.twin_mix(st, jnp.array([[0., 1., 0.], [0.5, 0., 0.5]]))
  jax.tree.map(lambda a, b: _close(a[0], np.asarray(b)), mix, models[1])
  _, st = mj.merge(M.twin(density=0.2), base, models, return_state=True)
  v = st.twins['layers_1']['kernel']  # factorised: SVDBasis of rank 1
  assert v.u.shape == (3, 5, 1) and v.vh.shape == (3, 1, 9)  # int(0.2 * 5) = 1


def test_reconstruct_error_without_method_state():
  base, models = _zoo()
  _, st = mj.merge(M.task_arithmetic(), base, models, return_state=True)
  with pytest.raises(ValueError, match='holds no EMRState'):
    M.reconstruct(st, base, 0)


def test_lapack_calls_take_one_matrix_even_when_batched_or_vmapped():
  # jaxlib splits a batched LAPACK call over XLA's intra-op pool and blocks
  # a pool thread on it; two such calls side by side hung the default
  # experiment. Every SVD/QR/eigh must reach LAPACK one matrix at a time.
  from mergejax.transforms import _subspace as subspace  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
  fns = {'svd': subspace.svd, 'qr': subspace.qr,
         'eigh': lambda m: subspace.eigh(m @ jnp.swapaxes(m, -1, -2))}
  for name, fn in fns.items():
    for f in (fn, jax.vmap(fn), jax.vmap(jax.vmap(fn))):
      text = jax.jit(f).lower(x).as_text()
      calls = re.findall(r'stablehlo.custom_call @(\w+)\(([^)]*)\) .*?: '
                         r'\((tensor<[^>]*>)', text)
      assert calls, (name, 'no LAPACK call found')
      for target, _, operand in calls:
        dims = operand[len('tensor<'):].split('x')[:-1]
        assert len(dims) == 2, (name, target, operand)
  u, s, vh = jax.vmap(subspace.svd)(x)
  np.testing.assert_allclose(np.asarray((u * s[..., None, :]) @ vh), x,
                             atol=1e-5)


@pytest.mark.parametrize('make', [M.emr, M.opcm], ids=['emr', 'opcm'])
def test_models_equal_to_the_base_give_the_base(make):
  base, _ = _zoo()
  out = mj.merge(make(), base, [base] * 3)
  _close(out, base, 0)


def test_emr_stays_finite_when_a_task_disagrees_with_every_elected_sign():
  base, _ = _zoo(k=1)
  up = jax.tree.map(lambda x: x + 0.1, base)
  down = jax.tree.map(lambda x: x - 0.05, base)  # loses every sign election
  out, st = mj.merge(M.emr(), base, [up, up, down], return_state=True)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  rec = M.reconstruct(st, base, 2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(rec))


def test_auto_layout_follows_the_leaf_names_that_travel_with_the_tensors():
  # The same task vectors as a Flax tree (``kernel``, (in, out)) and as a
  # Hugging Face tree (``…weight``, (out, in), what mergejax.io loads): the
  # default layout gives the transposed result, where one fixed layout would
  # silently use the wrong axis for one of them.
  rng = np.random.default_rng(0)
  base = rng.normal(size=(6, 4)).astype(np.float32)
  fts = [base + rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
  flax = lambda w: {'layer': {'kernel': jnp.asarray(w)}}
  hf = lambda w: {'model.layers.0.mlp.up_proj.weight': jnp.asarray(w.T)}
  name = 'model.layers.0.mlp.up_proj.weight'
  flax_out = {}
  for method, make in (
      ('iso_cts', lambda **kw: mj.methods.iso_cts(common_space_fraction=0.5, **kw)),
      ('knots', mj.methods.knots), ('widen', mj.methods.widen)):
    a = mj.merge(make(), flax(base), [flax(w) for w in fts])['layer']['kernel']
    b = mj.merge(make(), hf(base), [hf(w) for w in fts])[name]
    np.testing.assert_allclose(a, b.T, atol=1e-5, err_msg=method)
    flax_out[method] = a
  wrong = mj.merge(mj.methods.iso_cts(common_space_fraction=0.5, layout='in_out'),
                   hf(base), [hf(w) for w in fts])[name]
  assert np.abs(np.asarray(wrong).T - np.asarray(flax_out['iso_cts'])).max() > 1e-3
