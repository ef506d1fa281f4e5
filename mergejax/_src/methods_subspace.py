"""Subspace, SVD-basis and mask merges.

Per-matrix methods (TSV-M, Iso-C, Iso-CTS, KnOTS, WIDEN) follow FusionBench's
rule for which leaves are matrices: every leaf whose per-model shape is 2-D,
minus ``exclude``; other leaves (biases, norms, conv kernels unless
``conv='reshape'``) are reduced by the explicit ``other`` rule, ``'mean'`` by
default as in FusionBench (``'sum'`` and ``'zero'`` — keep the base — are the
alternatives). Conv kernels are averaged by default (FusionBench parity);
``conv='reshape'`` merges them as ``(kh*kw*in, out)`` matrices.

Methods that do not produce one merged model keep what rebuilds every task
model in their state: EMR (`EMRState`), TALL masks (`TallMaskState`),
Reversible merging (`ReversibleState`) and Twin-Merging (`TwinState`). Run them
through ``mergejax.merge(..., return_state=True)`` and rebuild task ``i`` with
`reconstruct` ``(state, base, i)``; Twin-Merging's per-input mixture is
`twin_mix`. The single model `merge` returns for them is documented per method.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import layerwise
from mergejax._src import masks as masks_lib
from mergejax._src import methods_classic
from mergejax._src import modelaxis
from mergejax._src import paths
from mergejax._src import reduce
from mergejax._src import select
from mergejax._src import subspace

OTHER_RULES = ('mean', 'sum', 'zero')


def _static_mask(mask):
  """Makes a path mask hashable for `static_fn` (lists become tuples)."""
  if mask is None or isinstance(mask, str) or callable(mask):
    return mask
  return tuple(mask)


def _check_other(other):
  if other not in OTHER_RULES:
    raise ValueError(f'other must be one of {OTHER_RULES}, got {other!r}.')
  return other


def _reduce_other(x, other):
  if other == 'mean':
    return modelaxis.model_mean(x)
  if other == 'sum':
    return modelaxis.model_sum(x)
  return jnp.zeros(x.shape[1:], x.dtype)


def _per_matrix(updates, *, fn, exclude, conv, other, what):
  """Reduces the model axis: ``fn(path, [K, m, n]) -> [m, n]`` on matrices."""
  flat = paths.flatten_to_dict(updates)
  mats = set(subspace.matrix_paths(flat, exclude=exclude, conv=conv, what=what))
  out = {}
  for p, x in flat.items():
    if p in mats:
      out[p] = fn(p, subspace.to_matrix(x, conv)).reshape(x.shape[1:])
    else:
      out[p] = _reduce_other(x, other)
  return paths.unflatten_like(updates, out)


def _finish(step, lambda_):
  return base.chain(reduce.task_vectors(), step, reduce.scale(lambda_),
                    reduce.apply_updates())


# ----------------------------------------------------------------------------
# TSV-M.


class TSVState(NamedTuple):
  weights: jax.Array  # per-task scale applied before the SVDs


def tsv(alpha: float | jax.Array = 1.0, *, weights: Any = None,
        exclude: Any = None, conv: str = 'none',
        other: str = 'mean') -> base.MergeTransformation:
  """TSV-M, task singular vectors merge (Gargiulo et al. 2025; FusionBench TSVM).

  Per matrix: each task's top ``k = int(r / K)`` singular triplets are
  concatenated, the concatenated ``U`` and ``V^T`` are replaced by their
  orthogonal polar factors, and ``tau = U_perp diag(S_cat) V_perp^T``;
  ``theta = theta_0 + alpha tau``. Transpose-equivariant (layout-free).

  Args:
    alpha: global scale of the merged task vector (traced).
    weights: optional per-task scales applied to each ``tau_i`` before the SVD
      (FusionBench's list-valued ``alpha``); traced.
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` (conv kernels go to ``other``) or ``'reshape'``.
    other: rule for non-matrix leaves: ``'mean'`` (FusionBench), ``'sum'``,
      ``'zero'``.

  Raises:
    ValueError: naming the leaf, if a matrix has fewer singular values than
      tasks (``int(r / K) = 0``); exclude it.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.tsv(), base, fts)['w']
    Array([[3., 0.],
           [0., 1.]], dtype=float32)
  """
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  step = base.MergeTransformation(
      lambda params: TSVState(w),
      base.static_fn.of(_tsv_update, exclude=_static_mask(exclude), conv=conv,
                        other=_check_other(other)))
  return _finish(step, alpha)


def tsv_matrix(x: jax.Array, path: str = '<matrix>') -> jax.Array:
  """TSV-M of stacked matrices ``[K, m, n] -> [m, n]`` (FusionBench's rule)."""
  k_models, m, n = x.shape
  r = min(m, n)
  k = int(r * (1 / k_models))  # FusionBench: int(s.shape[0] * sv_reduction)
  if k == 0:
    raise ValueError(
        f'tsv: leaf {path!r} is a {m}x{n} matrix with {r} singular values, '
        f'fewer than the {k_models} tasks, so no task keeps a singular vector. '
        'Add it to `exclude` (it is then merged by `other`).')
  u, s, vh = subspace.truncated_svd(x, k)
  u_cat = jnp.transpose(u, (1, 0, 2)).reshape(m, k_models * k)
  s_cat = s.reshape(k_models * k)
  vh_cat = vh.reshape(k_models * k, n)
  return (subspace.polar(u_cat) * s_cat[None, :]) @ subspace.polar(vh_cat)


def _tsv_update(updates, state, params=None, *, key=None, exclude, conv, other):
  del params, key
  k = jax.tree.leaves(updates)[0].shape[0]
  w = checks.per_model(state.weights, k, 'weights')
  updates = jax.tree.map(
      lambda x: x * w.reshape((-1,) + (1,) * (x.ndim - 1)), updates)
  out = _per_matrix(updates, fn=lambda p, x: tsv_matrix(x, p), exclude=exclude,
                    conv=conv, other=other, what='tsv')
  return out, state


# ----------------------------------------------------------------------------
# Iso-C and Iso-CTS.


def iso_c(alpha: float | jax.Array = 1.0, *, exclude: Any = None,
          conv: str = 'none', other: str = 'mean') -> base.MergeTransformation:
  """Iso-C (Marczak et al. 2025): flatten the spectrum of the summed task matrix.

  Per matrix ``M = sum_i tau_i = U S V^T``; ``tau = U (mean(S) I) V^T``;
  ``theta = theta_0 + alpha tau``. FusionBench default ``alpha`` 1.0 (its docs
  use 1.5). Transpose-equivariant.

  Args:
    alpha: scale (traced).
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'``.
    other: rule for non-matrix leaves (``'mean'`` as FusionBench).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.iso_c(), base, fts)['w']
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
  """
  step = base.stateless(_iso_c, exclude=_static_mask(exclude), conv=conv,
                        other=_check_other(other))
  return _finish(step, alpha)


def iso_c_matrix(x: jax.Array) -> jax.Array:
  """Iso-C of stacked matrices ``[K, m, n] -> [m, n]``."""
  u, s, vh = subspace.svd(jnp.sum(x, axis=0))
  return (u * jnp.mean(s)) @ vh


def _iso_c(updates, params, *, key, exclude, conv, other):
  del params, key
  return _per_matrix(updates, fn=lambda p, x: iso_c_matrix(x), exclude=exclude,
                     conv=conv, other=other, what='iso_c')


def iso_cts(alpha: float | jax.Array = 1.0, *,
            common_space_fraction: float = 0.8, layout: str = 'in_out',
            exclude: Any = None, conv: str = 'none',
            other: str = 'mean') -> base.MergeTransformation:
  """Iso-CTS: common and task-specific subspaces with a flat spectrum.

  Per matrix (FusionBench ``iso_cts``, in PyTorch ``(out, in)`` orientation):
  the top ``k_c`` output-side singular vectors of ``sum_i tau_i`` form the
  common space; each task's residual ``tau_i - U_c U_c^T tau_i`` contributes
  its top ``d = (r - k_c) / K`` triplets; the concatenated bases are
  polar-orthogonalised and every singular value is set to the mean.
  ``k_c = r - round((r - int(r f)) / K) K`` (round half to even, as Python).

  Not transpose-equivariant: ``layout`` says which axis of a leaf is the
  output. Flax kernels are ``(in, out)`` (``'in_out'``, default); PyTorch
  weights ``(out, in)`` (``'out_in'``).

  Args:
    alpha: scale (traced).
    common_space_fraction: ``f``, static (it sets ranks); FusionBench 0.8.
    layout: ``'in_out'`` or ``'out_in'``.
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'`` (reshaped kernels are ``in_out``).
    other: rule for non-matrix leaves.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.diag(jnp.array([3., 0.]))}, {'w': jnp.diag(jnp.array([0., 1.]))}]
    >>> mj.merge(mj.methods.iso_cts(), base, fts)['w']
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
  """
  if not 0.0 < float(common_space_fraction) <= 1.0:
    raise ValueError('common_space_fraction must lie in (0, 1], got '
                     f'{common_space_fraction}.')
  subspace.to_out_in(jnp.zeros((1, 1)), layout)  # validates layout
  step = base.stateless(_iso_cts, fraction=float(common_space_fraction),
                        layout=layout, exclude=_static_mask(exclude), conv=conv,
                        other=_check_other(other))
  return _finish(step, alpha)


def iso_cts_matrix(w: jax.Array, fraction: float,
                   path: str = '<matrix>') -> jax.Array:
  """Iso-CTS of stacked PyTorch-oriented matrices ``[K, out, in] -> [out, in]``."""
  k_models, m, n = w.shape
  r = min(m, n)
  k_c = int(r * fraction)
  k_c = r - round((r - k_c) / k_models) * k_models
  if k_c < 1:
    raise ValueError(
        f'iso_cts: leaf {path!r} ({m}x{n}, rank {r}) leaves no common space '
        f'for {k_models} tasks with common_space_fraction={fraction}. Raise '
        'the fraction or exclude the leaf.')
  d = int((r - k_c) / k_models)
  u, s, vh = subspace.svd(jnp.sum(w, axis=0))
  u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
  us, ss, vhs = [], [], []
  if d > 0:
    w_ts = w - u_c[None] @ (u_c.T[None] @ w)
    ut, st, vht = subspace.truncated_svd(w_ts, d)
    us.append(jnp.transpose(ut, (1, 0, 2)).reshape(m, k_models * d))
    ss.append(st.reshape(-1))
    vhs.append(vht.reshape(k_models * d, n))
  u_cat = jnp.concatenate(us + [u_c], axis=1)
  s_cat = jnp.concatenate(ss + [s_c])
  vh_cat = jnp.concatenate(vhs + [vh_c], axis=0)
  return (subspace.polar(u_cat) * jnp.mean(s_cat)) @ subspace.polar(vh_cat)


def _iso_cts(updates, params, *, key, fraction, layout, exclude, conv, other):
  del params, key

  def fn(p, x):
    y = iso_cts_matrix(subspace.to_out_in(x, layout), fraction, p)
    return subspace.from_out_in(y, layout)

  return _per_matrix(updates, fn=fn, exclude=exclude, conv=conv, other=other,
                     what='iso_cts')


# ----------------------------------------------------------------------------
# KnOTS.


class KnotsState(NamedTuple):
  inner: Any


def knots(inner: base.MergeTransformation | None = None, *,
          lambda_: float | jax.Array = 1.0, eps: float = 1e-4,
          layout: str = 'in_out', exclude: Any = None, conv: str = 'none',
          other: str = 'mean') -> base.MergeTransformation:
  """KnOTS (Stoica et al. 2025): merge task updates in a shared SVD basis.

  Per matrix, in PyTorch orientation: ``[tau_1 | ... | tau_K] = U S V^T``
  (concatenated along the input axis, FusionBench ``subspace_alignment``),
  components with ``S <= eps`` dropped (zeroed), ``V^T`` split into per-task
  blocks ``V_i^T`` so that ``tau_i = U S V_i^T``. ``inner`` merges the stacked
  blocks ``[K, r, in]`` (e.g. a TIES reducer), and ``tau = U S V_merged^T``.
  ``theta = theta_0 + lambda tau``. SVDs run in float32 (FusionBench: float64).

  Args:
    inner: a base-free reducer of stacked blocks (``[K, ...] -> [...]``), e.g.
      ``mj.weighted_sum()`` (default; KnOTS-TA equals task arithmetic) or a
      TIES chain without ``task_vectors``/``apply_updates``.
    lambda_: scale (traced).
    eps: singular-value cut-off (static).
    layout: ``'in_out'`` (Flax) or ``'out_in'`` (PyTorch).
    exclude: path mask of 2-D leaves not to treat as matrices.
    conv: ``'none'`` or ``'reshape'``.
    other: rule for non-matrix leaves (applied to task vectors).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> fts = [{'w': jnp.eye(2)}, {'w': jnp.ones((2, 2))}]
    >>> mj.merge(mj.methods.knots(), base, fts)['w'].round(4)
    Array([[2., 1.],
           [1., 2.]], dtype=float32)
  """
  inner = reduce.weighted_sum() if inner is None else inner
  subspace.to_out_in(jnp.zeros((1, 1)), layout)
  step = base.MergeTransformation(
      lambda params: KnotsState(inner.init(None)),
      base.static_fn.of(_knots_update, inner=inner.update, eps=float(eps),
                        layout=layout, exclude=_static_mask(exclude),
                        conv=conv, other=_check_other(other)))
  return _finish(step, lambda_)


def _knots_update(updates, state, params=None, *, key=None, inner, eps, layout,
                  exclude, conv, other):
  del params
  flat = paths.flatten_to_dict(updates)
  mats = subspace.matrix_paths(flat, exclude=exclude, conv=conv, what='knots')
  blocks, factors = {}, {}
  for p in mats:
    w = subspace.to_out_in(subspace.to_matrix(flat[p], conv), layout)
    k, m, n = w.shape
    cat = jnp.transpose(w, (1, 0, 2)).reshape(m, k * n)  # [tau_1 | ... | tau_K]
    u, s, vh = subspace.svd(cat)
    s = jnp.where(s > eps, s, 0.0)
    factors[p] = (u, s)
    blocks[p] = jnp.transpose(vh.reshape(-1, k, n), (1, 0, 2))  # [K, r, in]
  merged, inner_state = inner(blocks, state.inner, None, key=key)
  out = {}
  for p, x in flat.items():
    if p in factors:
      u, s = factors[p]
      y = subspace.from_out_in((u * s[None]) @ merged[p], layout)
      out[p] = y.reshape(x.shape[1:])
    else:
      out[p] = _reduce_other(x, other)
  return paths.unflatten_like(updates, out), KnotsState(inner_state)


# ----------------------------------------------------------------------------
# Reconstruction of task models from method states.


def reconstruct(state: Any, base_params: Any, i: int | jax.Array) -> Any:
  """Rebuilds task model ``i`` from the state of EMR / TALL / reversible / twin.

  ``state`` is what ``mergejax.merge(tx, base, models, return_state=True)``
  returned (the first recognised method state inside it is used).

  Args:
    state: the merge state.
    base_params: the base model (its dtypes are kept).
    i: task index (may be traced, e.g. under ``jax.vmap``).

  Returns:
    Task ``i``'s model, shaped and typed like ``base_params``.
  """
  s = _find_state(state)
  if s is None:
    raise ValueError(
        'reconstruct: the state holds no EMRState, TallMaskState, '
        'ReversibleState or TwinState. Pass the state returned by '
        'merge(tx, base, models, return_state=True) for emr, tall_masks, '
        'consensus, reversible or twin.')
  delta = s.task_delta(base_params, i)
  return jax.tree.map(lambda b, d: (b.astype(jnp.float32) + d).astype(b.dtype),
                      base_params, delta)


def _find_state(state):
  if isinstance(state, (EMRState, TallMaskState, ReversibleState, TwinState)):
    return state
  if isinstance(state, dict):
    items = list(state.values())
  elif isinstance(state, (tuple, list)):
    items = list(state)
  else:
    return None
  for it in items:
    if (found := _find_state(it)) is not None:
      return found
  return None


def _take(tree, i):
  return jax.tree.map(lambda x: jnp.take(x, i, axis=0), tree)


# ----------------------------------------------------------------------------
# TALL masks and Consensus merging.


class TallMaskState(NamedTuple):
  """TALL masks: ``theta_i = theta_0 + m_i * tau_MTL``."""
  tall_lambda: jax.Array
  masks: Any = None  # [K, ...] bool, after update
  mtl: Any = None  # the multi-task vector tau_MTL

  def task_delta(self, base_params, i):
    del base_params
    return jax.tree.map(lambda m, t: jnp.take(m, i, axis=0) * t, self.masks,
                        self.mtl)


def tall_masks(tall_lambda: float | jax.Array = 0.6, *,
               formula: str = 'paper') -> base.MergeTransformation:
  """TALL masks (Wang et al. 2024): per-task masks on the multi-task vector.

  ``tau_MTL = sum_i tau_i``; ``m_i = |tau_i| > lambda_i |tau_MTL - tau_i|``;
  task model ``i`` is ``theta_0 + m_i * tau_MTL`` (rebuild it with
  `reconstruct`). The masks and ``tau_MTL`` live in the returned state
  (`TallMaskState`); the model `merge` returns is ``theta_0 + tau_MTL``.

  Args:
    tall_lambda: lambda, one or one per task (traced); FusionBench 0.6, the
      paper picks it per task from {0.2, ..., 0.6} on validation data.
    formula: ``'paper'`` or ``'fusion_bench'`` (FusionBench 0.2.33 compares
      ``|theta_0 - tau_i|``, see `masks.tall_masks_fusion_bench`).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> out, st = mj.merge(mj.methods.tall_masks(), base, fts, return_state=True)
    >>> mj.methods.reconstruct(st, base, 0)['w']
    Array([1., 0.], dtype=float32)
  """
  if formula not in masks_lib.FORMULAS:
    raise ValueError(f'formula must be one of {masks_lib.FORMULAS}, got '
                     f'{formula!r}.')
  lam = checks.hparam(tall_lambda, 'tall_lambda', low=0.0)
  step = base.MergeTransformation(
      lambda params: TallMaskState(lam),
      base.static_fn.of(_tall_update, formula=formula))
  return base.named_chain(('tv', reduce.task_vectors()), ('tall', step),
                          ('add', reduce.apply_updates()))


def _tall(updates, lam, params, formula):
  k = jax.tree.leaves(updates)[0].shape[0]
  lam = checks.per_model(lam, k, 'tall_lambda')
  mtl = jax.tree.map(lambda x: jnp.sum(x, axis=0), updates)
  if formula == 'paper':
    m = masks_lib.tall_masks(updates, mtl, lam)
  else:
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    m = masks_lib.tall_masks_fusion_bench(updates, mtl, params, lam)
  return m, mtl


def _tall_update(updates, state, params=None, *, key=None, formula):
  del key
  m, mtl = _tall(updates, state.tall_lambda, params, formula)
  return mtl, TallMaskState(state.tall_lambda, m, mtl)


class ConsensusState(NamedTuple):
  lambda_: jax.Array
  k: jax.Array
  tall: TallMaskState
  consensus: Any = None  # bool mask, after update


def consensus(lambda_: float | jax.Array = 0.3, *, k: float | jax.Array = 2,
              tall_lambda: float | jax.Array = 0.6,
              formula: str = 'paper') -> base.MergeTransformation:
  """Consensus merging (Wang et al. 2024): drop weights fewer than k tasks use.

  TALL masks ``m_i`` (see `tall_masks`), then ``c = [sum_i m_i >= k]`` and
  ``theta = theta_0 + lambda (c * tau_MTL)`` with ``tau_MTL = sum_i tau_i``.
  ``k = 2`` removes catastrophic and selfish weights; ``k = 0`` is task
  arithmetic. The TALL masks stay in the state, so `reconstruct` also works.

  Args:
    lambda_: scale of the masked multi-task vector (traced; tune it as for
      task arithmetic, FusionBench's TA default 0.3).
    k: minimum number of tasks (traced).
    tall_lambda: TALL mask lambda(s) (traced).
    formula: ``'paper'`` or ``'fusion_bench'`` (TALL mask formula).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([1., 1.])}, {'w': jnp.array([1., 0.])}]
    >>> mj.merge(mj.methods.consensus(1.0), base, fts)['w']
    Array([2., 0.], dtype=float32)
  """
  lam = checks.hparam(lambda_, 'lambda_')
  kk = checks.hparam(k, 'k', low=0.0)
  tl = checks.hparam(tall_lambda, 'tall_lambda', low=0.0)
  step = base.MergeTransformation(
      lambda params: ConsensusState(lam, kk, TallMaskState(tl)),
      base.static_fn.of(_consensus_update, formula=formula))
  return base.named_chain(('tv', reduce.task_vectors()), ('consensus', step),
                          ('add', reduce.apply_updates()))


def _consensus_update(updates, state, params=None, *, key=None, formula):
  del key
  m, mtl = _tall(updates, state.tall.tall_lambda, params, formula)
  c = masks_lib.consensus_mask(m, state.k)
  out = jax.tree.map(lambda cm, t: state.lambda_ * cm * t, c, mtl)
  tall = TallMaskState(state.tall.tall_lambda, m, mtl)
  return out, ConsensusState(state.lambda_, state.k, tall, c)


# ----------------------------------------------------------------------------
# EMR.


class EMRState(NamedTuple):
  """EMR: ``theta_i = theta_0 + r_i (m_i * tau_uni)``."""
  unified: Any = None  # tau_uni
  masks: Any = None  # [K, ...] bool
  rescalers: jax.Array | None = None  # [K]

  def task_delta(self, base_params, i):
    del base_params
    r = jnp.take(self.rescalers, i)
    return jax.tree.map(lambda m, t: r * (jnp.take(m, i, axis=0) * t),
                        self.masks, self.unified)


def emr() -> base.MergeTransformation:
  """EMR merging (Huang et al. 2024): elect, mask, rescale (FusionBench rule).

  ``gamma = sign(sum_i tau_i)`` with 0 counted as -1; ``m_i = [tau_i gamma >
  0]``; ``tau_uni = gamma max_i |m_i tau_i|``; ``r_i = sum_leaves mean|tau_i| /
  sum_leaves mean|m_i tau_uni|``. Task model ``i`` is ``theta_0 + r_i (m_i
  tau_uni)`` (`reconstruct`); the state (`EMRState`) holds ``tau_uni``, the
  masks and the rescalers. The one model `merge` returns is the average of
  the K task models.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([2., 1.])}, {'w': jnp.array([1., -3.])}]
    >>> out, st = mj.merge(mj.methods.emr(), base, fts, return_state=True)
    >>> st['emr'].unified['w']
    Array([ 2., -3.], dtype=float32)
  """
  step = base.MergeTransformation(lambda params: EMRState(),
                                  base.static_fn.of(_emr_update))
  return base.named_chain(('tv', reduce.task_vectors()), ('emr', step),
                          ('add', reduce.apply_updates()))


def _emr_update(updates, state, params=None, *, key=None):
  del state, params, key
  flag = jax.tree.map(
      lambda x: jnp.where(jnp.sum(x, axis=0) > 0, 1.0, -1.0), updates)
  m = jax.tree.map(lambda x, g: x * g[None] > 0, updates, flag)
  uni = jax.tree.map(
      lambda x, mm, g: g * jnp.max(jnp.abs(mm * x), axis=0), updates, m, flag)
  axes = lambda x: tuple(range(1, x.ndim))
  scales = sum(jnp.mean(jnp.abs(x), axis=axes(x))
               for x in jax.tree.leaves(updates))
  new = sum(jnp.mean(jnp.abs(mm * u[None]), axis=axes(mm))
            for mm, u in zip(jax.tree.leaves(m), jax.tree.leaves(uni)))
  r = scales / new
  out = jax.tree.map(
      lambda mm, u: jnp.mean(r.reshape((-1,) + (1,) * u.ndim) * (mm * u[None]),
                             axis=0), m, uni)
  return out, EMRState(uni, m, r)


# ----------------------------------------------------------------------------
# PCB.


class PCBState(NamedTuple):
  pcb_ratio: jax.Array
  lambda_: jax.Array


def pcb(pcb_ratio: float | jax.Array = 0.1, lambda_: float | jax.Array = 1.0
        ) -> base.MergeTransformation:
  """PCB-merging (Du et al. 2024): intra/inter balancing, drop and rescale.

  Over the flattened ``K x d`` task-vector matrix ``V`` (all leaves, one row
  per task; reference ``duguodong7/pcb-merging``): ``|V|`` is clamped per row
  to its ``[0.0001, 0.9999]`` order statistics (``V_bar`` keeps the signs);
  ``score = exp(K minmax(|V_bar|)^2) * tanh(V * sum_j V_j)``; per row the
  scores are clamped from below at the order statistic ``int(d (1 - ratio))``
  and min-max scaled to ``beta`` (the dropped entries get 0);
  ``tau = sum_i beta_i V_bar_i / max(sum_i beta_i, 1e-12)``;
  ``theta = theta_0 + lambda tau``. Order statistics use the radix select (no
  sort); ``pcb_ratio`` and ``lambda_`` are traced. The reference tunes
  per-task coefficients with nevergrad; that search is not included.

  Args:
    pcb_ratio: fraction of entries per task kept (0.05 - 0.1 in the paper).
    lambda_: scale of the merged vector.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(3)}
    >>> fts = [{'w': jnp.array([1., 2., -3.])}, {'w': jnp.array([1., 4., 3.])}]
    >>> mj.merge(mj.methods.pcb(0.5), base, fts)['w']
    Array([0. , 2.5, 0. ], dtype=float32)
  """
  r = checks.hparam(pcb_ratio, 'pcb_ratio', low=0.0, high=1.0,
                    low_inclusive=False)
  lam = checks.hparam(lambda_, 'lambda_')
  step = base.MergeTransformation(lambda params: PCBState(r, lam),
                                  base.static_fn.of(_pcb_update))
  return base.chain(reduce.task_vectors(), step, reduce.apply_updates())


def _order_key(x):
  """uint32 keys that order like the (signed) float32 values."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def _from_order_key(k):
  pos = (k >> 31) == 1
  b = jnp.where(pos, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _row_order_stat(leaves, i_asc):
  """Per model row: the value at ascending 0-based index ``i_asc`` (traced)."""
  d = sum(x[0].size for x in leaves)
  k = d - i_asc  # 1-based rank from the top

  def one(*xs):
    t = select.kth_largest_bits([_order_key(x) for x in xs], k)
    return _from_order_key(t)
  return jax.vmap(one)(*leaves)


def _pcb_update(updates, state, params=None, *, key=None):
  del params, key
  flat = paths.flatten_to_dict(updates)
  leaves = list(flat.values())
  k_models = leaves[0].shape[0]
  d = sum(x[0].size for x in leaves)
  bshape = lambda v, x: v.reshape((-1,) + (1,) * (x.ndim - 1))
  absv = [jnp.abs(x) for x in leaves]
  lo = _row_order_stat(absv, int(d * 0.0001))
  hi = _row_order_stat(absv, int(d * (1 - 0.0001) - 1))
  clipped = [jnp.clip(a, bshape(lo, a), bshape(hi, a)) for a in absv]
  vbar = [jnp.sign(x) * c for x, c in zip(leaves, clipped)]
  red = lambda f, xs: f(jnp.stack([f(c.reshape(k_models, -1), axis=1)
                                   for c in xs]), axis=0)
  cmin, cmax = red(jnp.min, clipped), red(jnp.max, clipped)
  scores = []
  for x, c in zip(leaves, clipped):
    norm = (c - bshape(cmin, c)) / bshape(
        jnp.where(cmax > cmin, cmax - cmin, 1.0), c)
    self_pcb = jnp.exp(k_models * norm ** 2)
    cross = jnp.tanh(x * jnp.sum(x, axis=0, keepdims=True))
    scores.append(self_pcb * cross)
  i_drop = jnp.floor(d * (1.0 - state.pcb_ratio)).astype(jnp.int32)
  i_drop = jnp.clip(i_drop, 0, d - 1)
  q = _row_order_stat(scores, i_drop)
  clamped = [jnp.maximum(s, bshape(q, s)) for s in scores]
  smax = red(jnp.max, clamped)
  # A constant row (max == threshold) would divide by zero (NaN in the
  # reference); it gets beta = 0 instead.
  den = jnp.where(smax > q, smax - q, 1.0)
  betas = [(s - bshape(q, s)) / bshape(den, s) for s in clamped]
  out = [jnp.sum(b * v, axis=0) / jnp.maximum(jnp.sum(b, axis=0), 1e-12)
         for b, v in zip(betas, vbar)]
  out = {p: state.lambda_ * o for p, o in zip(flat, out)}
  return paths.unflatten_like(updates, out), state


# ----------------------------------------------------------------------------
# LiNeS.


class LinesState(NamedTuple):
  inner: Any
  alpha: jax.Array
  beta: jax.Array


def lines(method: base.MergeTransformation, *,
          beta: float | jax.Array = 0.5, alpha: float | jax.Array | None = None,
          pattern: str | None = None,
          num_layers: int | None = None) -> base.MergeTransformation:
  """LiNeS (Wang et al. 2025): layer-increasing scaling of any merge's update.

  Runs ``method`` (a full merge returning a model), takes its task vector
  ``tau_m = theta_m - theta_0`` and scales block ``l``'s part by
  ``alpha + beta l / (L - 1)``; leaves in no block get ``alpha``
  (see `mergejax.layer_scale` for how blocks are read from paths). With
  ``alpha=None`` the multi-task rule ``alpha = ||sum_i tau_i||_1 /
  (K ||tau_m||_1)`` is used (``1/K`` for plain task arithmetic at scale 1).
  Run the inner method at scale 1 (e.g. ``task_arithmetic(lambda_=1.)``).

  Args:
    method: the merge to rescale.
    beta: the increment at the last block (traced; the tuned coefficient).
    alpha: scale of the first block (traced), or None for the rule above.
    pattern: regex whose first group is the block index.
    num_layers: number of blocks (None: inferred from the paths).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'layers_0': jnp.zeros(1), 'layers_1': jnp.zeros(1)}
    >>> fts = [{'layers_0': jnp.ones(1), 'layers_1': jnp.ones(1)}] * 2
    >>> tx = mj.methods.lines(mj.methods.task_arithmetic(), beta=1.0)
    >>> mj.merge(tx, base, fts)
    {'layers_0': Array([1.], dtype=float32), 'layers_1': Array([3.], dtype=float32)}
  """
  b = checks.hparam(beta, 'beta')
  a = checks.hparam(0.0 if alpha is None else alpha, 'alpha')
  return base.MergeTransformation(
      lambda params: LinesState(method.init(params), a, b),
      base.static_fn.of(_lines_update, inner=method.update,
                        auto_alpha=alpha is None, pattern=pattern,
                        num_layers=num_layers))


def _lines_update(updates, state, params=None, *, key=None, inner, auto_alpha,
                  pattern, num_layers):
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  merged, inner_state = inner(updates, state.inner, params, key=key)
  tau_m = jax.tree.map(lambda m, p: m.astype(jnp.float32) - p, merged, params)
  if auto_alpha:
    k = jax.tree.leaves(updates)[0].shape[0]
    l1_sum = sum(jnp.sum(jnp.abs(jnp.sum(u - p[None], axis=0)))
                 for u, p in zip(jax.tree.leaves(updates),
                                 jax.tree.leaves(params)))
    l1_m = sum(jnp.sum(jnp.abs(t)) for t in jax.tree.leaves(tau_m))
    alpha = l1_sum / jnp.maximum(l1_m, 1e-30) / k
  else:
    alpha = state.alpha
  flat = paths.flatten_to_dict(tau_m)
  f = layerwise.depth_factors(flat, alpha, state.beta, pattern=pattern,
                              num_layers=num_layers)
  flat_p = paths.flatten_to_dict(params)
  out = {p: flat_p[p] + f[p] * t for p, t in flat.items()}
  return paths.unflatten_like(params, out), LinesState(inner_state, state.alpha,
                                                       state.beta)


# ----------------------------------------------------------------------------
# WIDEN.


class WidenState(NamedTuple):
  t: jax.Array
  s: jax.Array


def widen(t: float | jax.Array = 1.0, s: float | jax.Array = 1.0, *,
          layout: str = 'in_out', exclude: Any = None,
          other: str = 'mean') -> base.MergeTransformation:
  """WIDEN (Yu et al. 2024): magnitude/direction disentanglement, adaptive fusion.

  For each matrix, per input unit ``j`` (a row of a Flax ``(in, out)`` kernel,
  a column of a PyTorch weight; reference ``yule-BUAA/MergeLLM``): magnitude
  ``mu_j = ||W_j||``, direction ``D_j = W_j / mu_j``; per model the changes
  ``|mu_m - mu_0|`` and ``1 - cos(D_m, D_0)`` are ranked over ``j``
  (significance ``rank / in``); importance is the softmax over models of the
  significances, set to ``s`` where a significance exceeds ``t`` times its
  mean; ``omega = (score_mag + score_dir) / 2`` and ``W = W_0 + sum_m omega_m
  delta_m``. 1-D leaves use ``|delta|`` as significance (no ranking).
  Leaves of other ranks or in ``exclude`` use ``other``.

  Args:
    t: above-average ratio (traced), 1.0.
    s: score calibration value (traced), 1.0.
    layout: ``'in_out'`` (Flax) or ``'out_in'`` (PyTorch).
    exclude: path mask of leaves not merged by WIDEN.
    other: rule for leaves WIDEN does not merge (on task vectors).
  """
  subspace.to_out_in(jnp.zeros((1, 1)), layout)
  tt = checks.hparam(t, 't')
  ss = checks.hparam(s, 's')
  step = base.MergeTransformation(
      lambda params: WidenState(tt, ss),
      base.static_fn.of(_widen_update, layout=layout,
                        exclude=_static_mask(exclude),
                        other=_check_other(other)))
  return base.chain(step, reduce.apply_updates())


def _widen_scores(sig, t, s):
  """sig [K, n] -> scores [K, n]."""
  score = jax.nn.softmax(sig, axis=0)
  above = sig > t * jnp.mean(sig, axis=1, keepdims=True)
  return jnp.where(above, s, score)


def _rank_sig(x):
  """Per row: ascending stable rank / n."""
  n = x.shape[-1]
  order = jnp.argsort(x, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return ranks.astype(jnp.float32) / n


def _widen_update(updates, state, params=None, *, key=None, layout, exclude,
                  other):
  del key
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)
  flat = paths.flatten_to_dict(updates)
  flat_p = paths.flatten_to_dict(params)
  exc = None if exclude is None else paths.make_predicate(exclude)
  out = {}
  for p, x in flat.items():
    b = flat_p[p]
    delta = x - b[None]
    if (exc is not None and exc(p)) or b.ndim not in (1, 2):
      out[p] = _reduce_other(delta, other)
      continue
    if b.ndim == 1:
      sc = _widen_scores(jnp.abs(delta), state.t, state.s)
      out[p] = jnp.sum(sc * delta, axis=0)
      continue
    # Units j along the input axis: rows in (in, out) layout.
    w = x if layout == 'in_out' else jnp.swapaxes(x, -1, -2)
    w0 = b if layout == 'in_out' else b.T
    mu = jnp.linalg.norm(w, axis=-1)  # [K, in]
    mu0 = jnp.linalg.norm(w0, axis=-1)  # [in]
    dirs = w / jnp.maximum(mu, 1e-30)[..., None]
    dir0 = w0 / jnp.maximum(mu0, 1e-30)[..., None]
    d_mag = jnp.abs(mu - mu0[None])
    d_dir = 1.0 - jnp.sum(dirs * dir0[None], axis=-1)
    omega = 0.5 * (_widen_scores(_rank_sig(d_mag), state.t, state.s)
                   + _widen_scores(_rank_sig(d_dir), state.t, state.s))
    dw = w - w0[None]
    merged = jnp.sum(omega[..., None] * dw, axis=0)
    out[p] = merged if layout == 'in_out' else merged.T
  return paths.unflatten_like(params, out), state


# ----------------------------------------------------------------------------
# Reversible model merging.


class ReversibleState(NamedTuple):
  """A rank-``b`` basis per leaf and coefficients: ``tau_i = mean + sum_j C[j, i] B_j``."""
  basis: Any = None  # per leaf [b, ...] (b - 1 when centred)
  coeffs: Any = None  # per leaf [b, K] (scope 'leaf') or one [b, K] ('global')
  mean: Any = None  # per leaf mean task vector (zeros unless centred)
  singular_values: Any = None  # per leaf (or global) all K singular values

  def task_delta(self, base_params, i):
    del base_params
    if isinstance(self.coeffs, jax.Array):
      c = jnp.take(self.coeffs, i, axis=1)
      return jax.tree.map(lambda b, m: m + jnp.tensordot(c, b, axes=1),
                          self.basis, self.mean)
    return jax.tree.map(
        lambda b, cf, m: m + jnp.tensordot(jnp.take(cf, i, axis=1), b, axes=1),
        self.basis, self.coeffs, self.mean)


def reversible(budget: int, *, scope: str = 'leaf',
               centred: bool = False) -> base.MergeTransformation:
  """Reversible model merging: a compact basis rebuilding every task model.

  Our closed form (the paper gives no formulas): for each leaf, the task
  vectors ``D = [vec tau_1 ... vec tau_K]`` are replaced by their best rank-b
  approximation (Eckart-Young), computed from the ``K x K`` Gram matrix
  (``eigh``), so memory stays ``O(n K)``. The state (`ReversibleState`) holds
  ``b`` basis tensors per leaf (``B = D V_b``) and coefficients ``C = V_b^T``;
  task ``i`` is ``theta_0 + sum_j C[j, i] B_j`` (`reconstruct`). With
  ``budget = K`` every task model is rebuilt exactly; the squared error is
  the sum of the discarded squared singular values, so it never grows with the
  budget. The model `merge` returns is the average of the rebuilt task models.

  Args:
    budget: ``b``, the number of "model equivalents" stored (static, 1..K).
    scope: ``'leaf'`` (coefficients per leaf, most accurate) or ``'global'``
      (one coefficient vector per task for the whole model: one Gram matrix
      summed over leaves).
    centred: store the mean task vector plus ``b - 1`` directions of the
      centred task vectors (the mean is then a usable merged model and counts
      as one of the ``b``).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(3)}
    >>> fts = [{'w': jnp.array([1., 2., 3.])}, {'w': jnp.array([0., 1., 0.])}]
    >>> _, st = mj.merge(mj.methods.reversible(2), base, fts, return_state=True)
    >>> mj.methods.reconstruct(st, base, 1)['w']
    Array([0., 1., 0.], dtype=float32)
  """
  if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
    raise ValueError(f'reversible: budget must be a positive int, got {budget!r}.')
  if scope not in ('leaf', 'global'):
    raise ValueError(f"scope must be 'leaf' or 'global', got {scope!r}.")
  step = base.MergeTransformation(
      lambda params: ReversibleState(),
      base.static_fn.of(_reversible_update, budget=budget, scope=scope,
                        centred=bool(centred)))
  return base.named_chain(('tv', reduce.task_vectors()), ('reversible', step),
                          ('add', reduce.apply_updates()))


def _top_eig(g, n_dirs):
  """Top ``n_dirs`` eigenvectors of a PSD Gram matrix, descending; all sqrt-eigvals."""
  w, v = subspace.eigh(g)
  w, v = w[::-1], v[:, ::-1]
  return v[:, :n_dirs], jnp.sqrt(jnp.maximum(w, 0.0))


def _reversible_update(updates, state, params=None, *, key=None, budget, scope,
                       centred):
  del state, params, key
  flat = paths.flatten_to_dict(updates)
  k = next(iter(flat.values())).shape[0]
  if budget > k:
    raise ValueError(
        f'reversible: budget {budget} exceeds the number of models ({k}); K '
        'model equivalents already rebuild every model exactly. Use '
        f'budget <= {k}.')
  n_dirs = budget - 1 if centred else budget
  mean = {p: (jnp.mean(x, axis=0) if centred else jnp.zeros(x.shape[1:]))
          for p, x in flat.items()}
  dmat = {p: (x - mean[p][None]).reshape(k, -1) for p, x in flat.items()}
  gram = {p: d @ d.T for p, d in dmat.items()}
  basis, coeffs, svals = {}, {}, {}
  if scope == 'global':
    v, sv = _top_eig(sum(gram.values()), n_dirs)
    c = v.T  # [b, K]
    for p, d in dmat.items():
      basis[p] = (c @ d).reshape((n_dirs,) + flat[p].shape[1:])
    coeffs_out, sv_out = c, sv
  else:
    for p, d in dmat.items():
      v, sv = _top_eig(gram[p], n_dirs)
      basis[p] = (v.T @ d).reshape((n_dirs,) + flat[p].shape[1:])
      coeffs[p] = v.T
      svals[p] = sv
    coeffs_out = paths.unflatten_like(updates, coeffs)
    sv_out = paths.unflatten_like(updates, svals)
  st = ReversibleState(paths.unflatten_like(updates, basis), coeffs_out,
                       paths.unflatten_like(updates, mean), sv_out)
  avg = jax.vmap(lambda i: st.task_delta(None, i))(jnp.arange(k))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), avg), st


# ----------------------------------------------------------------------------
# Twin-Merging.


class TwinState(NamedTuple):
  """Shared model plus exclusive vectors ``v_t = compress(theta_t - theta*)``.

  ``twins`` holds, per leaf of ``shared_model``, either a `SVDBasis`
  ``(u [K, m, r], s [K, r], vh [K, r, n])`` — the factorised rank-r exclusive
  part of every task for matrix leaves with ``compress='svd'``
  (``v_t = (u_t * s_t) @ vh_t``, reshaped to the leaf's shape) — or a dense
  ``[K, ...]`` array (1-D leaves, and ``compress='magnitude'``).
  """
  shared: Any
  shared_model: Any = None  # theta*, float32
  twins: Any = None  # per leaf: SVDBasis or [K, ...]

  def task_delta(self, base_params, i):
    return jax.tree.map(lambda s, v, b: s + twin_dense_leaf(v, s.shape, i) - b,
                        self.shared_model, self.twins,
                        jax.tree.map(lambda x: x.astype(jnp.float32),
                                     base_params))


def twin_dense_leaf(v: Any, shape: tuple[int, ...], i: int | jax.Array
                    ) -> jax.Array:
  """Task ``i``'s dense exclusive vector from one leaf of `TwinState.twins`."""
  if isinstance(v, subspace.SVDBasis):
    u, s, vh = (jnp.take(f, i, axis=0) for f in v)
    return ((u * s[None, :]) @ vh).reshape(shape)
  return jnp.take(v, i, axis=0)


def _mix_leaf(theta, v, w):
  """``theta + sum_t w_t v_t`` for one leaf, from factors when there are any."""
  if isinstance(v, subspace.SVDBasis):
    # U diag(w (x) s) V^T over the concatenated ranks: one [m, K r] @ [K r, n]
    # product, never K dense matrices.
    delta = jnp.einsum('kmr,kr,krn->mn', v.u, w[:, None] * v.s, v.vh)
    return theta + delta.reshape(theta.shape)
  return theta + jnp.tensordot(w, v, axes=1)


def twin(shared: base.MergeTransformation | None = None, *,
         density: float = 0.1, compress: str = 'svd') -> base.MergeTransformation:
  """Twin-Merging (Lu et al. 2024): shared merge plus compressed exclusive parts.

  ``theta* = shared(models)`` (default task arithmetic with lambda 0.29, as
  the reference config); ``v_t = compress(theta_t - theta*)`` where
  ``'svd'`` keeps the top ``max(1, int(density r))`` singular triplets of
  every matrix (rank >= 3 leaves are viewed as ``(prod(shape[:-1]),
  shape[-1])``) and *stores them factorised* (`SVDBasis`, ``r (m + n + 1)``
  numbers per task instead of ``m n``), and ``'magnitude'`` the top
  ``int(density n)`` entries per tensor (dense); 1-D leaves are kept in
  full, as in the reference. `merge` returns ``theta*``; the state
  (`TwinState`) holds the exclusive parts. At inference, mix them per input
  with router weights: `twin_mix` (``theta(x) = theta* + sum_t w_t(x)
  v_t``), `twin_apply` (any model, one mixed model per input) or
  `twin_dense` (a dense layer with the mix fused into the matmul); a router
  is trained with `twin_train_router`.

  Args:
    shared: a full merge method producing ``theta*``.
    density: fraction kept by ``compress`` (static: it sets ranks).
    compress: ``'svd'`` or ``'magnitude'``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((4, 4))}
    >>> fts = [{'w': jnp.eye(4)}, {'w': -jnp.eye(4)}]
    >>> _, st = mj.merge(mj.methods.twin(density=0.25), base, fts,
    ...                  return_state=True)
    >>> st.twins['w'].u.shape, st.twins['w'].vh.shape   # rank 1 per task
    ((2, 4, 1), (2, 1, 4))
  """
  if compress not in ('svd', 'magnitude'):
    raise ValueError(f"compress must be 'svd' or 'magnitude', got {compress!r}.")
  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f'density must lie in (0, 1], got {density}.')
  shared = (methods_classic.task_arithmetic(lambda_=0.29) if shared is None
            else shared)
  return base.MergeTransformation(
      lambda params: TwinState(shared.init(params)),
      base.static_fn.of(_twin_update, shared=shared.update,
                        density=float(density), compress=compress))


def _twin_update(updates, state, params=None, *, key=None, shared, density,
                 compress):
  theta, shared_state = shared(updates, state.shared, params, key=key)
  theta = jax.tree.map(lambda x: x.astype(jnp.float32), theta)
  diff = jax.tree.map(lambda x, s: x - s[None], updates, theta)

  def comp(v):
    if v.ndim <= 2:  # 1-D (or scalar) leaves: kept in full
      return v
    if compress == 'svd':
      mat = v.reshape(v.shape[0], -1, v.shape[-1])
      r = max(1, int(density * min(mat.shape[-2:])))
      return subspace.SVDBasis(*subspace.truncated_svd(mat, r))
    n = v[0].size
    k = int(density * n)
    return jax.vmap(lambda y: y * select.topk_mask(y, k))(v)

  twins = jax.tree.map(comp, diff)
  return theta, TwinState(shared_state, theta, twins)


def twin_mix(state: Any, weights: jax.Array) -> Any:
  """Twin-Merging parameters for router weights: ``theta* + sum_t w_t v_t``.

  Factorised exclusive parts are mixed as ``U diag(w (x) s) V^T`` (one
  product over the concatenated ranks), so no per-task dense matrix is built.

  Args:
    state: the state from ``merge(twin(...), ..., return_state=True)``.
    weights: ``[K]`` (one input) or ``[B, K]`` (a batch: returns ``[B, ...]``
      leaves; for large batches use `twin_dense` / `twin_apply` instead).

  Returns:
    The mixed parameters (float32).
  """
  s = _find_state(state)
  if not isinstance(s, TwinState):
    raise ValueError('twin_mix needs the state of a twin(...) merge.')
  weights = jnp.asarray(weights, jnp.float32)
  k = _twin_count(s)
  if weights.ndim not in (1, 2) or weights.shape[-1] != k:
    raise ValueError(f'twin_mix: weights must have shape [{k}] or [B, {k}] '
                     f'(one weight per task), got {weights.shape}.')

  def one(w):
    return jax.tree.map(lambda th, v: _mix_leaf(th, v, w), s.shared_model,
                        s.twins)
  return one(weights) if weights.ndim == 1 else jax.vmap(one)(weights)


def _twin_count(s: TwinState) -> int:
  return jax.tree.leaves(s.twins)[0].shape[0]
