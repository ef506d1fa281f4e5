"""PCB.
"""

from __future__ import annotations

from typing import NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _select as select


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

  References:
    Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS
      2024.
      https://arxiv.org/abs/2410.02396
  """
  r = checks.hparam(pcb_ratio, 'pcb_ratio', low=0.0, high=1.0,
                    low_inclusive=False)
  lam = checks.hparam(lambda_, 'lambda_')
  step = base.MergeTransformation(lambda params: PCBState(r, lam),
                                  base.static_fn.of(_pcb_update))
  return base.chain(reduce.task_vectors(), step, reduce.apply_to_base())


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
