"""Tests of OPCM continual merging (transformation and incremental interface)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import testing
from mergejax.transforms import _continual as continual


def _zoo(k=4, seed=0, width=6):
  shapes = {'enc/kernel': (width, 5), 'enc/bias': (5,), 'head': (5, 3)}
  return testing.random_models(shapes, k, seed=seed, scale=0.1)


def np_opcm(base, models, alpha):
  """FusionBench's OPCM loop with full SVDs (PyTorch layout = transpose)."""
  b = {k: np.asarray(v, np.float64) for k, v in mj.flatten_to_dict(base).items()}
  ms = [{k: np.asarray(v, np.float64) for k, v in mj.flatten_to_dict(m).items()}
        for m in models]
  norm = lambda d: np.sqrt(sum(np.sum(x ** 2) for x in d.values()))
  merged = {k: ms[0][k] - b[k] for k in b}
  norms = [norm(merged)]
  lam_prev = 1.0
  for m in ms[1:]:
    tau = {k: m[k] - b[k] for k in b}
    norms.append(norm(tau))
    avg = np.mean(norms)
    new = {}
    for k in b:
      if b[k].ndim == 2:
        d, t = merged[k].T, tau[k].T  # torch (out, in)
        u, s, vh = np.linalg.svd(d, full_matrices=True)
        v = vh.T
        split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
        p = u.T @ t @ v
        np.fill_diagonal(p, 0)
        p[:split, :split] = 0
        new[k] = (lam_prev * d + u @ p @ v.T).T
      else:
        new[k] = lam_prev * merged[k] + tau[k]
    lam = norm(new) / avg
    merged = {k: x / lam for k, x in new.items()}
    lam_prev = lam
  return {k: b[k] + merged[k] for k in b}


@pytest.mark.parametrize('alpha', [0.3, 0.5])
def test_opcm_matches_numpy_reference(alpha):
  base, models = _zoo()
  want = np_opcm(base, models, alpha)
  out = mj.merge(mj.methods.opcm(alpha), base, models)
  st = mj.transforms.opcm_init(base, alpha)
  for m in models:
    st = mj.transforms.opcm_update(st, base, m)
  inc = mj.transforms.opcm_params(st, base)
  for got in (out, inc):
    for k, v in mj.flatten_to_dict(got).items():
      np.testing.assert_allclose(v, want[k], rtol=1e-4, atol=1e-5)
  # exclude: the head is merged like a bias; both interfaces agree.
  out = mj.merge(mj.methods.opcm(alpha, exclude=r'^head'), base, models)
  st = mj.transforms.opcm_init(base, alpha)
  for m in models:
    st = mj.transforms.opcm_update(st, base, m, exclude=r'^head')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               mj.transforms.opcm_params(st, base), out)


def test_opcm_norm_invariant_and_order_robustness():
  base, models = _zoo(k=4, width=64)
  tv_norm = lambda m: float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree.leaves(m), jax.tree.leaves(base)))))
  mean_norm = np.mean([tv_norm(m) for m in models])
  flat = lambda m: np.concatenate([np.asarray(a - b).reshape(-1) for a, b in zip(
      jax.tree.leaves(m), jax.tree.leaves(base))])
  outs = []
  for order in list(itertools.permutations(range(4)))[:6]:
    out = mj.merge(mj.methods.opcm(0.5), base, [models[i] for i in order])
    # The merged task vector is rescaled to the mean task-vector norm.
    assert tv_norm(out) == pytest.approx(mean_norm, rel=1e-4)
    outs.append(flat(out))
  cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b)
         for a, b in itertools.combinations(outs, 2)]
  # Random task vectors are nearly orthogonal, so the order matters little.
  assert min(cos) > 0.9, cos


def test_incremental_memory_and_compiles_do_not_grow():
  base, models = _zoo(k=6)
  st = mj.transforms.opcm_init(base)
  st = mj.transforms.opcm_update(st, base, models[0])
  n_compiles = continual.update_jit._cache_size()
  size = sum(x.nbytes for x in jax.tree.leaves(st))
  for m in models[1:]:
    st = mj.transforms.opcm_update(st, base, m)
    assert sum(x.nbytes for x in jax.tree.leaves(st)) == size
  assert continual.update_jit._cache_size() == n_compiles
  assert int(st.count) == 6


def test_opcm_rejects_a_model_with_another_tree():
  base, models = _zoo(k=2)
  st = mj.transforms.opcm_update(mj.transforms.opcm_init(base), base, models[0])
  bad = {'enc': {'kernel': models[1]['enc']['kernel']}, 'head': models[1]['head']}
  with pytest.raises(ValueError, match=r"missing leaves \['enc/bias'\]"):
    mj.transforms.opcm_update(st, base, bad)
  bad = jax.tree.map(lambda x: x, models[1])
  bad['head'] = jnp.zeros((5, 4))
  with pytest.raises(ValueError, match=r"leaf 'head' has shape \(5, 4\)"):
    mj.transforms.opcm_update(st, base, bad)
