"""The model-axis reductions against NumPy, unrolled and looped."""

import jax.numpy as jnp
import numpy as np
import pytest

from mergejax._src import modelaxis


@pytest.mark.parametrize('k', [1, 3, 17])
def test_model_axis_helpers_match_numpy(k, monkeypatch):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(k, 5, 3)).astype(np.float32)
  w = rng.normal(size=k).astype(np.float32)
  for limit in (16, 1):  # unrolled and fori_loop paths
    monkeypatch.setattr(modelaxis, 'UNROLL_MAX', limit)
    np.testing.assert_allclose(modelaxis.model_sum(x, w),
                               np.tensordot(w, x, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(modelaxis.model_mean(x), x.mean(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(modelaxis.model_max(x), x.max(0))
    np.testing.assert_array_equal(modelaxis.model_count(x > 0),
                                  (x > 0).sum(0))
    np.testing.assert_allclose(modelaxis.model_map(lambda v: jnp.cumsum(v, 0), x),
                               np.cumsum(x, axis=1), rtol=1e-5, atol=1e-6)
