"""RCP-Merging: domain models merged into a reasoning model, the reasoning
model's Fisher acting as a prior that protects reasoning-critical weights."""

from __future__ import annotations

from typing import Any

import jax

from mergejax._src import base
from mergejax.methods import _common as common
from mergejax.transforms import _rcp as rcp_lib
from mergejax.transforms import _reduce as reduce


def rcp_merging(reasoning_fisher: Any, domain_fishers: Any, *,
                kappa: float | jax.Array = 1.0,
                lambda_: float | jax.Array = 1.0, soft: bool = False,
                normalize: bool = True) -> base.MergeTransformation:
  """RCP-Merging: domain edits only where they matter more than reasoning.

  The reasoning (long chain-of-thought) model ``theta_r`` is the base and the
  prior; each domain model ``theta_d`` contributes its edit
  ``tau_d = theta_d - theta_r`` only on the entries where its domain
  sensitivity ``S_d = |tau_d| sqrt(F_d)`` beats the reasoning importance
  ``I_r = |tau_d| sqrt(F_r)`` of the same edit by a factor ``kappa``::

      theta = theta_r + lambda_ sum_d m_d * tau_d,   m_d = 1[S_d > kappa I_r]

  with ``F_r`` the reasoning model's diagonal Fisher on reasoning data and
  ``F_d`` domain model ``d``'s on its domain data (both from
  `mergejax.stats.fisher_diagonal`, mean-normalised by default). With one
  domain model and ``lambda_ = 1``, ``kappa -> inf`` returns ``theta_r`` and
  ``kappa -> 0`` returns ``theta_d`` wherever ``F_d > 0``. ``soft=True``
  uses ``m_d = S_d / (S_d + kappa I_r)``, a Fisher-weighted average of the two
  models. See `mergejax.transforms.rcp_select` for the details.

  This formula is this library's design: the paper is known here only from
  its abstract (a reasoning-preservation indicator from the reasoning
  model's Fisher, a domain-sensitivity score choosing which domain weights
  to merge), so results may differ from the authors' code.

  Args:
    reasoning_fisher: ``F_r``, a tree like the params.
    domain_fishers: ``F_d``, a list of K trees (one per domain model, in the
      order of the models merged), or one tree with a leading axis K.
    kappa: weight of reasoning importance against domain sensitivity, >= 0
      (traced, so a sweep vmaps); one value, or one per domain model.
    lambda_: scale of the summed domain edits (traced); with several domain
      models, ``1 / K`` averages edits that overlap.
    soft: soft weights instead of the 0/1 mask.
    normalize: divide each Fisher by its mean entry, making ``kappa``
      independent of the Fishers' scales.

  Returns:
    A `MergeTransformation`; merge with
    ``mergejax.merge(tx, reasoning_model, domain_models)``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> reasoning = {'w': jnp.array([1., 1., 1.])}
    >>> domain = [{'w': jnp.array([3., 5., 7.])}]
    >>> f_r = {'w': jnp.array([9., 1., 0.])}   # reasoning relies on w[0]
    >>> f_d = [{'w': jnp.array([1., 4., 1.])}]
    >>> tx = mj.methods.rcp_merging(f_r, f_d, kappa=1.0, normalize=False)
    >>> mj.merge(tx, reasoning, domain)['w']
    Array([1., 5., 7.], dtype=float32)

  References:
    Yang et al., "RCP-Merging: Merging Long Chain-of-Thought Models with
      Domain-Specific Models by Considering Reasoning Capability as Prior",
      AAAI 2026. https://arxiv.org/abs/2508.03140
  """
  select = rcp_lib.rcp_select(reasoning_fisher, domain_fishers, kappa=kappa,
                              soft=soft, normalize=normalize)
  return common.finish(base.chain(select, reduce.weighted_sum()), lambda_)
