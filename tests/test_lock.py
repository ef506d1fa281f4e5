"""MergeLock: function-preserving locks, their recovery and detection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import permute
from mergejax.permute import models as M
from mergejax import testing

X = jax.random.normal(jax.random.key(0), (32, 5))
XT = jax.random.normal(jax.random.key(1), (4, 8, 6))
ATTN = ('block0/attn', 'block1/attn')
SCALED = ('P_0', 'P_1')


def _mlp(key=1, dtype=jnp.float32):
  m = M.MLP((24, 16), num_outputs=4)
  p = m.init(jax.random.key(key), X)['params']
  return m, jax.tree.map(lambda x: x.astype(dtype), p)


def _transformer():
  m = M.Transformer()
  return m, m.init(jax.random.key(2), XT)['params']


def test_locked_mlp_computes_the_same_function_far_from_the_original():
  m, p = _mlp()
  r = permute.merge_lock(jax.random.key(3), p, permute.mlp_spec(2), scaled=SCALED)
  np.testing.assert_allclose(m.apply({'params': r.params}, X),
                             m.apply({'params': p}, X), atol=1e-5)
  # Scales within the range, not all 1; every group permuted.
  for g in SCALED:
    d = np.asarray(r.scales[g])
    assert np.all((d >= 1 / 8) & (d <= 8)) and np.std(np.log(d)) > 0.3
    assert np.mean(np.asarray(r.perms[g]) != np.arange(len(d))) > 0.5
  k0 = np.asarray(p['Dense_0']['kernel'])
  assert np.linalg.norm(np.asarray(r.params['Dense_0']['kernel']) - k0) > np.linalg.norm(k0)


def test_merging_a_locked_model_breaks_interpolation():
  # The midpoint of a model and its locked copy is no longer that model.
  m, p = _mlp()
  locked = permute.merge_lock(jax.random.key(3), p, permute.mlp_spec(2),
                              scaled=SCALED).params
  mid = jax.tree.map(lambda a, b: (a + b) / 2, p, locked)
  ref = m.apply({'params': p}, X)
  err = float(jnp.mean((m.apply({'params': mid}, X) - ref) ** 2))
  assert err > 0.1 * float(jnp.mean(ref ** 2))


def test_unlock_recovers_a_locked_copy_exactly():
  _, p = _mlp()
  spec = permute.mlp_spec(2)
  locked = permute.merge_lock(jax.random.key(4), p, spec, scaled=SCALED).params
  testing.assert_trees_close(permute.unlock(locked, p, spec, scaled=SCALED), p,
                             atol=1e-5)
  # Re-basin by permutation alone cannot undo the scales.
  perms = permute.weight_matching(spec, p, locked)
  rebased = permute.apply_permutation(spec, perms, locked)
  k = lambda t: np.asarray(t['Dense_0']['kernel'])
  assert np.abs(k(rebased) - k(p)).max() > 0.1


def test_transformer_attention_maps_keep_the_function_and_unlock_inverts_them():
  m, p = _transformer()
  spec = permute.transformer_spec(2)
  r = permute.merge_lock(jax.random.key(5), p, spec, attention=ATTN)
  np.testing.assert_allclose(m.apply({'params': r.params}, XT),
                             m.apply({'params': p}, XT), atol=1e-4)
  a, b = r.maps['block0/attn']
  assert a.shape == b.shape == (2, 8, 8)
  s = np.linalg.svd(np.asarray(a), compute_uv=False)
  assert np.all(s.max(-1) / s.min(-1) <= 8 + 1e-3)  # well conditioned
  q0 = p['block0']['attn']['query']['kernel']
  assert jnp.abs(r.params['block0']['attn']['query']['kernel'] - q0).max() > 0.1
  testing.assert_trees_close(permute.unlock(r.params, p, spec, attention=ATTN), p,
                             atol=1e-4)


def test_lock_keeps_dtypes():
  m, p = _mlp(dtype=jnp.bfloat16)
  r = permute.merge_lock(jax.random.key(3), p, permute.mlp_spec(2), scaled=SCALED)
  assert {x.dtype for x in jax.tree.leaves(r.params)} == {jnp.dtype(jnp.bfloat16)}
  f = lambda q: m.apply({'params': jax.tree.map(lambda x: x.astype(jnp.float32), q)}, X)
  np.testing.assert_allclose(f(r.params), f(p), atol=0.1)


def test_lock_report_detects_a_locked_model():
  _, p = _mlp()
  _, other = _mlp(key=7)
  spec = permute.mlp_spec(2)
  near = jax.tree.map(lambda a, b: a + 0.05 * (b - a), p, other)  # a "fine-tune"
  clean = permute.lock_report(near, p, spec, scaled=SCALED)
  assert not clean.transformed and clean.moved == {'P_0': 0.0, 'P_1': 0.0}
  locked = permute.merge_lock(jax.random.key(8), near, spec, scaled=SCALED).params
  rep = permute.lock_report(locked, p, spec, scaled=SCALED)
  assert rep.transformed and rep.distance > 1.0
  # As close as the model before locking (the fitted scales may bring it
  # closer still: they are least squares onto the reference).
  assert rep.unlocked_distance <= clean.distance * 1.001
  assert min(rep.moved.values()) > 0.5 and min(rep.scale_spread.values()) > 0.3


def test_lock_errors_are_clear():
  _, p = _mlp()
  spec = permute.mlp_spec(2)
  with pytest.raises(ValueError, match=r"scaled groups \['P_9'\] are not in"):
    permute.merge_lock(jax.random.key(0), p, spec, scaled=('P_9',))
  with pytest.raises(ValueError, match='must be >= 1'):
    permute.merge_lock(jax.random.key(0), p, spec, scale_range=0.5)
  with pytest.raises(ValueError, match='Dense_2'):  # spec for a deeper MLP
    permute.merge_lock(jax.random.key(0), p, permute.mlp_spec(3))
  _, pt = _transformer()
  tspec = permute.transformer_spec(2)
  with pytest.raises(ValueError, match="cannot scale group 'P_res'"):
    permute.merge_lock(jax.random.key(0), pt, tspec, scaled=('P_res',))
  with pytest.raises(ValueError, match="attention 'block0/mlp_in'"):
    permute.merge_lock(jax.random.key(0), pt, tspec, attention=('block0/mlp_in',))


def test_lock_experiment_smoke(tmp_path):
  from experiments import lock as lock_experiment  # pylint: disable=g-import-not-at-top
  from experiments.tools import config_files  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_files.load_sibling(os.path.join(root, 'configs', 'x.py'),
                                     'lock.py').get_config('smoke')
  result = lock_experiment.main(config, str(tmp_path))
  assert result['max_logit_difference'] < 1e-4
  settings = {r['setting'] for r in result['rows']}
  assert settings == {'plain', 'locked', 'rebasin', 'unlocked'}
  assert result['reports']['locked']['transformed']
  assert not result['reports']['finetuned']['transformed']
  assert os.path.exists(tmp_path / 'lock' / 'results.json')
