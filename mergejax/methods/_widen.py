"""WIDEN.
"""

from __future__ import annotations

from typing import Any, NamedTuple
import jax
import jax.numpy as jnp
from mergejax._src import base
from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _reduce as reduce
from mergejax.transforms import _subspace as subspace
from mergejax.transforms import _matrix as matrix


class WidenState(NamedTuple):
  t: jax.Array
  s: jax.Array


def widen(t: float | jax.Array = 1.0, s: float | jax.Array = 1.0, *,
          layout: str = 'auto', exclude: Any = None,
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
    layout: ``'auto'`` (default: each leaf's orientation from its name,
      ``…weight`` ``(out, in)`` as in PyTorch / Hugging Face checkpoints,
      else ``(in, out)`` as Flax kernels), ``'in_out'`` or ``'out_in'``.
    exclude: path mask of leaves not merged by WIDEN.
    other: rule for leaves WIDEN does not merge (on task vectors).

  References:
    Yu et al., "Extend Model Merging from Fine-Tuned to Pre-Trained Large
      Language Models via Weight Disentanglement", 2024.
      https://arxiv.org/abs/2408.03092
  """
  subspace.check_layout(layout)
  tt = checks.hparam(t, 't')
  ss = checks.hparam(s, 's')
  step = base.MergeTransformation(
      lambda params: WidenState(tt, ss),
      base.static_fn.of(_widen_update, layout=layout,
                        exclude=matrix.static_mask(exclude),
                        other=matrix.check_other(other)))
  return base.chain(step, reduce.apply_to_base())


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
      out[p] = matrix.reduce_other(delta, other)
      continue
    if b.ndim == 1:
      sc = _widen_scores(jnp.abs(delta), state.t, state.s)
      out[p] = jnp.sum(sc * delta, axis=0)
      continue
    # Units j along the input axis: rows in (in, out) layout.
    in_out = subspace.leaf_layout(p, layout) == 'in_out'
    w = x if in_out else jnp.swapaxes(x, -1, -2)
    w0 = b if in_out else b.T
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
    out[p] = merged if in_out else merged.T
  return paths.unflatten_like(params, out), state
