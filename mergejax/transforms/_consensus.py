"""Sign consensus (TIES' "elect") and the disjoint merge that follows it.

The two steps talk through zeros: `elect_sign` zeroes every entry whose sign
disagrees with the elected one, and `disjoint_merge` treats the non-zero
entries as the kept ones. That is exact for mergekit's rule, where a zero never
agrees with the elected sign (so a kept entry is always non-zero).

Per-model weights enter both steps, as in mergekit's generalized task
arithmetic: the sign is elected on the *weighted* values ``u_i = w_i x_i`` and
the mean divides by ``sum_i w_i m_i``. Methods pass the same weights to both.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax.transforms._sparsify import _choice

Weights = float | Sequence[float] | jax.Array | None


class ElectSignState(NamedTuple):
  weights: jax.Array  # () or [K]
  # Diagnostic: fraction of the non-zero (model, entry) pairs whose sign
  # agrees with the elected sign, over all leaves the step sees.
  agreement: jax.Array


def elect_sign(method: str = 'sum', *, weights: Weights = None,
               zero: str = 'plus') -> base.MergeTransformation:
  """Elects a sign per entry and zeroes the entries that disagree.

  ``[K, ...] -> [K, ...]`` (values are returned unweighted). With ``u_i = w_i
  x_i``:

  * ``method='sum'``: the sign of ``sum_i u_i`` (TIES' "total mass";
    mergekit ``consensus_method: sum``);
  * ``method='count'``: the sign of ``sum_i sign(u_i)`` (mergekit ``count``).

  A zero total elects ``+1`` with ``zero='plus'`` (mergekit). With
  ``zero='majority'`` it takes the sign of the sum of all elected signs over
  every leaf the step sees (FusionBench's ``resolve_sign``; if that is zero too,
  only negative entries survive there, as in FusionBench). Entry ``x_i`` is kept
  iff ``sign(u_i)`` equals the elected sign, so zeros are never kept.

  Args:
    method: ``'sum'`` or ``'count'``.
    weights: per-model weights used for the election (None means 1); the
      same as the merge step's weights.
    zero: ``'plus'`` (mergekit) or ``'majority'`` (FusionBench).

  Returns:
    A `MergeTransformation` with state `ElectSignState` (``agreement`` is
    filled in by ``update``).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.elect_sign()
    >>> u = {'w': jnp.array([[1., -2., 3.], [1., 2., -1.]])}
    >>> tx.update(u, tx.init(None))[0]
    {'w': Array([[1., 0., 3.],
           [1., 2., 0.]], dtype=float32)}
  """
  _choice(method, 'elect_sign method', ('sum', 'count'))
  _choice(zero, 'elect_sign zero', ('plus', 'majority'))
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  return base.MergeTransformation(
      lambda params: ElectSignState(w, jnp.zeros((), jnp.float32)),
      base.static_fn.of(_elect_update, method=method, zero=zero))


def sign_agreement(values: list[jax.Array], *, method: str = 'sum',
                   zero: str = 'plus') -> list[jax.Array]:
  """Boolean masks ``sign(u_i) == elected sign`` for ``[K, ...]`` arrays ``u``."""
  totals = [modelaxis.model_sum(u if method == 'sum' else jnp.sign(u))
            for u in values]
  if zero == 'plus':
    elected = [jnp.where(t >= 0, 1.0, -1.0) for t in totals]
  else:
    signs = [jnp.sign(t) for t in totals]
    majority = jnp.sign(sum(jnp.sum(s) for s in signs))
    elected = [jnp.where(s == 0, majority, s) for s in signs]
  # Elected +1 keeps positive entries, anything else keeps negative ones.
  return [modelaxis.model_map(lambda x, e=e: jnp.where(e > 0, x > 0, x < 0), u)
          for u, e in zip(values, elected)]


def _elect_update(updates, state, params=None, *, key=None, method, zero):
  del params, key
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, state
  w = checks.per_model(state.weights, leaves[0].shape[0], 'weights')
  weighted = [modelaxis.model_map(lambda x, wi: x * wi.astype(x.dtype), u, w)
              for u in leaves]
  masks = sign_agreement(weighted, method=method, zero=zero)
  out = [modelaxis.model_map(
      lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), u, m)
         for u, m in zip(leaves, masks)]
  # A diagnostic: XLA drops it as dead code unless the state is returned.
  agree = sum(jnp.sum(m, dtype=jnp.float32) for m in masks)
  nonzero = sum(jnp.sum(v != 0, dtype=jnp.float32) for v in weighted)
  frac = agree / jnp.maximum(nonzero, 1.0)
  return jax.tree.unflatten(treedef, out), ElectSignState(state.weights, frac)


class DisjointMergeState(NamedTuple):
  weights: jax.Array  # () or [K]


def disjoint_merge(weights: Weights = None, *, reduce: str = 'mean'
                   ) -> base.MergeTransformation:
  """Reduces the model axis over the kept (non-zero) entries only.

  ``[K, ...] -> [...]`` (the reducing step). With weights ``w`` and ``m_i =
  [x_i != 0]``:

  * ``'mean'``: ``sum_i w_i x_i / sum_i w_i m_i`` (a zero divisor is replaced by
    1): mergekit's TIES with ``normalize: true``, the TIES paper's disjoint
    mean, FusionBench ``merge_func='mean'`` (unit weights).
  * ``'sum'``: ``sum_i w_i x_i``: mergekit with ``normalize: false``,
    FusionBench's default ``merge_func='sum'``.
  * ``'max'``: the ``w_i x_i`` of largest magnitude (ties to the later model):
    FusionBench ``merge_func='max'`` after `elect_sign`, and MagMax without it.

  With negative weights ``sum_i w_i m_i`` may cancel; mergekit does the same.

  Args:
    weights: one weight for all models or one per model; None means 1.
    reduce: ``'mean'``, ``'sum'`` or ``'max'``.

  Returns:
    A `MergeTransformation` with state `DisjointMergeState`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.disjoint_merge()
    >>> tx.update({'w': jnp.array([[1., 0., 3.], [1., 2., 0.]])}, tx.init(None))[0]
    {'w': Array([1., 2., 3.], dtype=float32)}
  """
  _choice(reduce, 'disjoint_merge reduce', ('mean', 'sum', 'max'))
  w = checks.hparam(1.0 if weights is None else weights, 'weights')
  return base.MergeTransformation(
      lambda params: DisjointMergeState(w),
      base.static_fn.of(_disjoint_update, reduce=reduce))


def _disjoint_leaf(u: jax.Array, w: jax.Array, reduce: str) -> jax.Array:
  wu = jnp.broadcast_to(w.astype(u.dtype), u.shape[:1])
  if reduce == 'max':
    v = modelaxis.model_map(lambda x, wi: x * wi, u, wu)
    # A running `>=`: ties go to the later model.
    return modelaxis.model_fold(
        lambda best, x: jnp.where(jnp.abs(x) >= jnp.abs(best), x, best), v)
  num = modelaxis.model_sum(u, wu)
  if reduce == 'sum':
    return num
  den = modelaxis.model_sum(
      modelaxis.model_map(lambda x: (x != 0).astype(x.dtype), u), wu)
  return num / jnp.where(den == 0, jnp.ones((), u.dtype), den)


def _disjoint_update(updates, state, params=None, *, key=None, reduce):
  del params, key
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return updates, state
  w = checks.per_model(state.weights, leaves[0].shape[0], 'weights')
  return jax.tree.map(lambda u: _disjoint_leaf(u, w, reduce), updates), state
