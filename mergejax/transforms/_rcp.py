"""RCP selection: keep a domain edit only where the domain needs it more than
the reasoning prior does (Fisher-scored, per entry)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import modelaxis
from mergejax._src import paths


class RcpSelectState(NamedTuple):
  """State of `rcp_select`: the Fishers, ``kappa`` and a diagnostic."""
  reasoning_fisher: Any  # like the params, float32
  domain_fishers: Any  # like the params, every leaf [K, ...] float32
  kappa: jax.Array  # () or [K]
  # Diagnostic: per domain model, the fraction of entries whose edit is kept
  # (the mean of the mask; of the soft weights with ``soft``).
  kept: jax.Array


def rcp_select(reasoning_fisher: Any, domain_fishers: Any, *,
               kappa: float | jax.Array = 1.0, soft: bool = False,
               normalize: bool = True) -> base.MergeTransformation:
  """Masks each domain task vector by domain sensitivity vs. reasoning importance.

  ``[K, ...] -> [K, ...]`` on task vectors ``tau_d = theta_d - theta_r``
  taken from the reasoning model ``theta_r`` (the base). Per entry, with
  ``F_d`` the diagonal Fisher of domain model ``d`` on its domain data and
  ``F_r`` that of the reasoning model on reasoning data::

      S_d = |tau_d| * sqrt(F_d)   # domain knowledge sensitivity
      I_r = |tau_d| * sqrt(F_r)   # reasoning importance of the same edit
      m_d = 1[S_d > kappa * I_r]  # hard (default)
      m_d = S_d / (S_d + kappa * I_r)  # soft=True

  ``S_d`` and ``I_r`` are the square roots of the second-order loss changes
  ``F tau^2 / 2`` that undoing the edit costs the domain and that making it
  costs reasoning, so the edit is kept where the domain loses more than
  reasoning (weighted by ``kappa``). Both share ``|tau_d|``: for a non-zero
  edit the rule is the Fisher-ratio test ``sqrt(F_d) > kappa sqrt(F_r)``,
  which is how it is computed (products of tiny edits and Fishers would
  underflow). Ties, and entries neither Fisher sees, keep the reasoning
  weights (the prior wins); entries with ``F_r = 0`` take the domain edit for
  every finite ``kappa``. The soft rule is a Fisher-weighted average of the
  two models with weights ``sqrt(F_d)`` and ``kappa sqrt(F_r)``.

  Fishers computed on different models and data carry unrelated scales
  (token counts, loss normalisation); ``normalize`` divides every Fisher by
  its mean over all entries of all leaves, so ``kappa = 1`` compares
  relative sensitivities. The formula is this library's design: the paper is
  known here only from its abstract.

  Args:
    reasoning_fisher: ``F_r``, one tree like the params
      (`mergejax.stats.fisher_diagonal` of the reasoning model).
    domain_fishers: ``F_d`` per domain model: a list of K trees like the
      params, or one tree whose leaves have a leading axis K.
    kappa: how much reasoning importance outweighs domain sensitivity, >= 0
      (traced); one value, or one per domain model.
    soft: use the soft mask instead of the hard one.
    normalize: divide each Fisher by its global mean.

  Returns:
    A `MergeTransformation` with state `RcpSelectState`.

  Raises:
    ValueError: naming the leaf, for a Fisher whose dtype is not floating,
      whose shape does not match the params, or that holds negative or
      non-finite values; or naming ``kappa`` for an invalid one.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> f_r = {'w': jnp.array([4., 1.])}
    >>> f_d = [{'w': jnp.array([1., 4.])}]
    >>> tx = mj.transforms.rcp_select(f_r, f_d, normalize=False)
    >>> tx.update({'w': jnp.array([[2., 3.]])}, tx.init(None))[0]
    {'w': Array([[0., 3.]], dtype=float32)}

  References:
    Yang et al., "RCP-Merging: Merging Long Chain-of-Thought Models with
      Domain-Specific Models by Considering Reasoning Capability as Prior",
      AAAI 2026. https://arxiv.org/abs/2508.03140
  """
  f_r = _fisher_tree(reasoning_fisher, 'reasoning_fisher')
  if isinstance(domain_fishers, (list, tuple)):
    if not domain_fishers:
      raise ValueError('rcp_select: domain_fishers is empty: pass one Fisher '
                       'tree per domain model.')
    trees = [_fisher_tree(f, f'domain_fishers[{i}]')
             for i, f in enumerate(domain_fishers)]
    for i, t in enumerate(trees[1:], 1):
      if jax.tree.structure(t) != jax.tree.structure(trees[0]):
        paths.require_same_paths(paths.flatten_to_dict(t),
                                 paths.flatten_to_dict(trees[0]),
                                 f'domain_fishers[{i}]')
        raise ValueError(f'rcp_select: domain_fishers[{i}] has a different '
                         'tree structure from domain_fishers[0].')
      for p, x in paths.flatten_to_dict(t).items():
        ref = paths.flatten_to_dict(trees[0])[p]
        if x.shape != ref.shape:
          raise ValueError(
              f'rcp_select: domain_fishers[{i}] leaf {p!r} has shape '
              f'{tuple(x.shape)} but domain_fishers[0] has '
              f'{tuple(ref.shape)}.')
    f_d = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  else:
    f_d = _fisher_tree(domain_fishers, 'domain_fishers')
    for p, x in paths.flatten_to_dict(f_d).items():
      if x.ndim == 0:
        raise ValueError(
            f'rcp_select: domain_fishers leaf {p!r} is a scalar; a stacked '
            'tree needs a leading model axis K (or pass a list of trees).')
  k_models = jax.tree.leaves(f_d)[0].shape[0]
  kap = checks.hparam(kappa, 'kappa', low=0.0)

  def init(params):
    if params is not None:
      _check_shapes(f_r, params, 'reasoning_fisher', stacked=False)
      _check_shapes(f_d, params, 'domain_fishers', stacked=True)
    return RcpSelectState(f_r, f_d, kap, jnp.zeros((k_models,), jnp.float32))

  return base.MergeTransformation(
      init, base.static_fn.of(_rcp_update, soft=soft, normalize=normalize))


def _fisher_tree(tree, what):
  """``tree`` as float32 after checking dtypes and, if concrete, values."""
  return checks.nonnegative_tree(
      tree, f'rcp_select: {what}',
      fix='A diagonal Fisher is finite and >= 0 (squared gradients); pass '
          'one, e.g. from mergejax.stats.fisher_diagonal.')


def _check_shapes(fishers, params, what, *, stacked):
  fl, pl = paths.flatten_to_dict(fishers), paths.flatten_to_dict(params)
  paths.require_same_paths(fl, pl, f'rcp_select: {what}')
  for p, f in fl.items():
    want = tuple(pl[p].shape)
    got = tuple(f.shape[1:] if stacked else f.shape)
    if got != want or (stacked and f.ndim == 0):
      shape = f'[K, *{want}]' if stacked else f'{want}'
      hint = (' (a single domain model\'s Fisher goes in a list: '
              'domain_fishers=[fisher])' if stacked and tuple(f.shape) == want
              else '')
      raise ValueError(f'rcp_select: {what} leaf {p!r} has shape '
                       f'{tuple(f.shape)}; expected {shape}{hint}.')


def _normalized(tree, axis_models):
  """Divides a Fisher tree by its mean entry (per model if ``axis_models``)."""
  leaves = jax.tree.leaves(tree)
  if axis_models:
    k = leaves[0].shape[0]
    total = sum(jnp.sum(x.reshape(k, -1), axis=1) for x in leaves)
    count = sum(x[0].size for x in leaves)
  else:
    total = sum(jnp.sum(x) for x in leaves)
    count = sum(x.size for x in leaves)
  mean = total / jnp.float32(count)
  # An all-zero Fisher carries no information; it is left as it is.
  scale = jnp.where(mean > 0, 1.0 / jnp.where(mean > 0, mean, 1.0), 1.0)

  def div(x):
    s = scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
    return x * s

  return jax.tree.map(div, tree)


def rcp_mask(tau: jax.Array, f_reason: jax.Array, f_domain: jax.Array,
             kappa: jax.Array, *, soft: bool = False) -> jax.Array:
  """RCP's mask for one domain model's leaf (see `rcp_select`).

  Args:
    tau: the domain task vector of the leaf.
    f_reason: the reasoning Fisher, shaped like ``tau``.
    f_domain: the domain Fisher, shaped like ``tau``.
    kappa: the trade-off (scalar, may be traced).
    soft: the soft weights instead of the 0/1 mask.

  Returns:
    A float32 array shaped like ``tau``, in [0, 1].
  """
  del tau  # shared by both scores: it cancels (see `rcp_select`)
  s_d = jnp.sqrt(f_domain)
  i_r = kappa * jnp.sqrt(f_reason)
  if soft:
    den = s_d + i_r
    return jnp.where(den > 0, s_d / jnp.where(den > 0, den, 1.0), 0.0)
  return (s_d > i_r).astype(jnp.float32)


def _rcp_update(updates, state, params=None, *, key=None, soft, normalize):
  del params, key
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return updates, state
  k = leaves[0].shape[0]
  k_f = jax.tree.leaves(state.domain_fishers)[0].shape[0]
  if k_f != k:
    raise ValueError(f'rcp_select: domain_fishers hold {k_f} models but {k} '
                     'domain models are merged.')
  f_r, f_d = state.reasoning_fisher, state.domain_fishers
  if normalize:
    f_r, f_d = _normalized(f_r, False), _normalized(f_d, True)
  kap = checks.per_model(state.kappa, k, 'kappa')

  masks = jax.tree.map(
      lambda u, fr, fd: modelaxis.model_map(
          lambda t, d, c, fr=fr: rcp_mask(t, fr, d, c, soft=soft),
          u, fd, kap), updates, f_r, f_d)
  out = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, masks)
  kept = sum(jnp.sum(m.reshape(k, -1), axis=1) for m in jax.tree.leaves(masks))
  kept = kept / jnp.float32(sum(m[0].size for m in jax.tree.leaves(masks)))
  return out, state._replace(kept=kept)
