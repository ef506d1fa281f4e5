"""R-TSVM: TSV-M with outlier reweighting and spectrum-adaptive ranks.

Yang et al. (2025, "Mix Data or Merge Models? Balancing the Helpfulness,
Honesty, and Harmlessness of LLMs via Model Merging", arXiv 2502.06876; called
RESM in its v3) extend TSV-M with two steps aimed at heavy-tailed LLM task
vectors: *outlier-aware parameter weighting* and *sparsity-adaptive rank
selection*. Only the abstract was available, so the two formulas below are
**a design** read from those two phrases (not the paper's text), built to reduce exactly to TSV-M at their
neutral settings:

* `outlier_reweight` (per model, per leaf): entries of ``tau_i`` larger in
  magnitude than its ``quantile`` order statistic ``t_i`` are weighted by
  ``t_i / |tau_i|``, i.e. shrunk onto ``+-t_i`` (winsorisation written as a
  weight ``w = min(1, t_i / |tau_i|)``). ``quantile = 1`` is the identity.
* `tsv_reduce` (the TSV-M reduction with an adaptive rank): per matrix and
  task, of the ``k = int(r / K)`` singular triplets TSV-M keeps, only the
  first ``k_i`` are used, the smallest number whose squared singular values
  reach ``energy * ||tau_i||_F^2`` (a task whose spectrum is concentrated -
  "sparse" - in that layer uses fewer slots); the unused slots stay zero, as
  TSV-M's own empty slots. ``energy = 1`` is TSV-M exactly.

Both knobs are traced (they live in the state), so sweeps ``jax.vmap`` over
them in one compile; the slot size ``k`` is static, as in TSV-M.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax.transforms import _matrix as matrix
from mergejax._src import paths
from mergejax.transforms import _select as select
from mergejax.transforms import _subspace as subspace


class OutlierReweightState(NamedTuple):
  quantile: jax.Array


def outlier_reweight(quantile: float | jax.Array = 0.99, *,
                     include: Any = None,
                     exclude: Any = None) -> base.MergeTransformation:
  """Shrinks each model's outlier entries onto its per-leaf quantile.

  Per model ``i`` and leaf: ``t_i`` is the ``quantile`` order statistic of
  ``|x_i|`` (NumPy ``np.quantile(..., method='lower')``: the ascending sorted
  value at index ``floor(quantile (n - 1))``, found by radix select, no sort),
  and ``x_i <- x_i * min(1, t_i / |x_i|)``. Keeps the model axis; usually run
  on task vectors, before a reduction (R-TSVM's outlier-aware weighting, as
  designed here). ``quantile`` is traced; ``1.0`` leaves the input unchanged.

  Args:
    quantile: in ``[0, 1]``; the fraction of entries per model and leaf that
      keep their value (traced).
    include: path mask of leaves to reweight (None: every leaf).
    exclude: path mask of leaves left unchanged.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.outlier_reweight(0.5)
    >>> tx.update({'w': jnp.array([[1., -2., 3., -10.]])}, tx.init(None))[0]['w']
    Array([[ 1., -2.,  2., -2.]], dtype=float32)
  """
  q = checks.hparam(quantile, 'quantile', low=0.0, high=1.0)
  return base.MergeTransformation(
      lambda params: OutlierReweightState(q),
      base.static_fn.of(_outlier_update, include=matrix.static_mask(include),
                        exclude=matrix.static_mask(exclude)))


def quantile_magnitude(x: jax.Array, quantile: jax.Array) -> jax.Array:
  """``np.quantile(|x|, quantile, method='lower')`` by radix select (traced q)."""
  n = x.size
  i_asc = jnp.floor(jnp.asarray(quantile, jnp.float32) * (n - 1))
  i_asc = jnp.clip(i_asc.astype(jnp.int32), 0, n - 1)
  return select.kth_largest_magnitude(x, n - i_asc)


def _outlier_update(updates, state, params=None, *, key=None, include,
                    exclude):
  del params, key
  flat = paths.flatten_to_dict(updates)
  inc = None if include is None else paths.make_predicate(include)
  exc = None if exclude is None else paths.make_predicate(exclude)
  out = {}
  for p, x in flat.items():
    if (inc is not None and not inc(p)) or (exc is not None and exc(p)):
      out[p] = x
      continue
    xf = x.astype(jnp.float32)
    t = jax.vmap(lambda y: quantile_magnitude(y, state.quantile))(xf)
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    # Winsorising written as a weight; where |x| <= t the weight is exactly 1.
    out[p] = jnp.clip(xf, -t, t)
  return paths.unflatten_like(updates, out), state


class TSVReduceState(NamedTuple):
  energy: jax.Array


def tsv_reduce(energy: float | jax.Array = 1.0, *, exclude: Any = None,
               conv: str = 'none', other: str = 'mean'
               ) -> base.MergeTransformation:
  """TSV-M's reduction ``[K, ...] -> [...]`` with a spectrum-adaptive rank.

  Per matrix: each task keeps at most ``k = int(r / K)`` singular triplets
  (TSV-M's slot); of them only the first ``k_i``, the fewest whose squared
  singular values reach ``energy * ||tau_i||_F^2`` (at least one). Unused
  slots are zero in the concatenated ``U``, ``S``, ``V^T``, which are then
  polar-orthogonalised as in TSV-M. ``energy = 1`` gives TSV-M exactly.
  Non-matrix leaves are reduced by ``other``. Transpose-equivariant.

  Args:
    energy: in ``(0, 1]``, traced.
    exclude: path mask of 2-D leaves not treated as matrices.
    conv: ``'none'`` or ``'reshape'`` (conv kernels as matrices).
    other: ``'mean'`` (FusionBench), ``'sum'`` or ``'zero'``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.tsv_reduce(energy=0.5)
    >>> x = jnp.stack([jnp.diag(jnp.array([3., 1., 0., 0.])),
    ...                jnp.diag(jnp.array([0., 0., 2., 1.]))])
    >>> jnp.diag(tx.update({'w': x}, tx.init(None))[0]['w'])
    Array([3., 0., 2., 0.], dtype=float32)
  """
  e = checks.hparam(energy, 'energy', low=0.0, high=1.0, low_inclusive=False)
  matrix.check_other(other)
  return base.MergeTransformation(
      lambda params: TSVReduceState(e),
      base.static_fn.of(_tsv_reduce_update, exclude=matrix.static_mask(exclude),
                        conv=conv, other=other))


def adaptive_rank_mask(s: jax.Array, total: jax.Array,
                       energy: jax.Array) -> jax.Array:
  """Which of the leading singular values to keep: ``s [..., k] -> bool``.

  Component ``j`` is kept while the energy before it, ``sum_{l<j} s_l^2``, is
  below ``energy * total`` (so at least one is kept, and every one when
  ``energy >= 1``).
  """
  s2 = s.astype(jnp.float32) ** 2
  before = jnp.cumsum(s2, axis=-1) - s2
  keep = before < energy * total[..., None]
  return keep | (energy >= 1.0)


def tsv_reduce_matrix(x: jax.Array, energy: jax.Array,
                      path: str = '<matrix>') -> jax.Array:
  """`tsv_reduce` of stacked matrices ``[K, m, n] -> [m, n]``."""
  k_models, m, n = x.shape
  r = min(m, n)
  k = int(r * (1 / k_models))  # FusionBench's slot size, as in TSV-M
  if k == 0:
    raise ValueError(
        f'tsv_reduce: leaf {path!r} is a {m}x{n} matrix with {r} singular '
        f'values, fewer than the {k_models} tasks, so no task keeps a singular '
        'vector. Add it to `exclude` (it is then merged by `other`).')
  x = x.astype(jnp.float32)
  u, s, vh = subspace.truncated_svd(x, k)
  total = jnp.sum(x * x, axis=(1, 2))
  keep = adaptive_rank_mask(s, total, energy).astype(jnp.float32)  # [K, k]
  u = u * keep[:, None, :]
  s = s * keep
  vh = vh * keep[:, :, None]
  u_cat = jnp.transpose(u, (1, 0, 2)).reshape(m, k_models * k)
  s_cat = s.reshape(k_models * k)
  vh_cat = vh.reshape(k_models * k, n)
  return (subspace.polar(u_cat) * s_cat[None, :]) @ subspace.polar(vh_cat)


def _tsv_reduce_update(updates, state, params=None, *, key=None, exclude, conv,
                       other):
  del params, key
  flat = paths.flatten_to_dict(updates)
  mats = set(subspace.matrix_paths(flat, exclude=exclude, conv=conv,
                                   what='tsv_reduce'))
  out = {}
  for p, x in flat.items():
    if p in mats:
      y = tsv_reduce_matrix(subspace.to_matrix(x, conv), state.energy, p)
      out[p] = y.reshape(x.shape[1:])
    else:
      out[p] = matrix.reduce_other(x, other)
  return paths.unflatten_like(updates, out), state
