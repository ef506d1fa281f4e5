"""Evo-Merging: black-box merging of a model repository from queries alone."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mergejax._src import checks
from mergejax.search import _evolve


def _top(v, k):
  """``v`` with all but its ``k`` largest entries set to 0 (``v >= 0``)."""
  if k >= v.shape[0]:
    return v
  kth = jax.lax.top_k(v, k)[0][-1]
  # Ties at the threshold are broken by position so exactly k survive.
  above = v > kth
  at = (v == kth) & (jnp.cumsum(v == kth) <= k - jnp.sum(above))
  return jnp.where(above | at, v, 0.0)


def evo_coefficients(candidate: dict[str, jax.Array], *, keep: int,
                     negative: int = 0) -> jax.Array:
  """The model coefficients an Evo-Merging candidate stands for.

  A candidate is ``{'raw': [N], 'scale': [2]}``. Sparsity-based denoising
  keeps the ``keep`` largest positive raw entries and, asymmetrically, the
  ``negative`` most negative ones (0: none), so most of a large repository
  gets coefficient 0; sign-aware scaling normalises the kept positive and
  negative parts separately and gives them their own scales,
  ``c = scale[0] * p / sum(p) - scale[1] * n / sum(n)``, so the search moves
  the direction of the merge and its strength independently. Models are
  then combined with ``c`` as task-arithmetic weights.

  Designed from the abstract of the Evo-Merging paper (only the abstract was
  available): the two components are named there, their form here is this
  library's design.

  Args:
    candidate: the raw scores and the two scales.
    keep: models with a positive coefficient (static).
    negative: models with a negative coefficient (static).

  Returns:
    ``[N]`` coefficients.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> c = {'raw': jnp.array([2., -1., 0.5, 1., -3.]),
    ...      'scale': jnp.array([0.6, 0.1])}
    >>> mj.search.evo_coefficients(c, keep=2, negative=1).round(3).tolist()
    [0.4, 0.0, 0.0, 0.2, -0.1]

  References:
    Chen et al., "Black-box Model Merging for Language-Model-as-a-Service
    with Massive Model Repositories", 2025 (https://arxiv.org/abs/2509.12951).
  """
  raw = jnp.asarray(candidate['raw'], jnp.float32)
  scale = jnp.asarray(candidate['scale'], jnp.float32)
  n = raw.shape[0]
  for name, v in (('keep', keep), ('negative', negative)):
    checks.static_int(v, name, owner='evo_coefficients', low=0, high=n,
                      hint=f' (the repository has {n} models)')
  if raw.ndim != 1 or scale.shape != (2,):
    raise ValueError(f'evo_coefficients: expected raw [N] and scale [2], got '
                     f'{raw.shape} and {scale.shape}.')
  out = jnp.zeros(n)
  for k, part, sign, s in ((keep, jnp.maximum(raw, 0.0), 1.0, scale[0]),
                           (negative, jnp.maximum(-raw, 0.0), -1.0, scale[1])):
    if k == 0:
      continue
    kept = _top(part, k)
    total = jnp.sum(kept)
    out = out + sign * s * kept / jnp.where(total > 0, total, 1.0)
  return out


def evo_merging(evaluate: Callable[[jax.Array], jax.Array], num_models: int,
                key: jax.Array, *, keep: int, negative: int = 0,
                generations: int = 50, population_size: int = 16,
                scale: tuple[float, float] = (1.0, 0.1),
                strategy: Any = 'CMA_ES', init_std: float = 0.3,
                **evolve_kwargs) -> tuple[jax.Array, _evolve.SearchResult]:
  """Evo-Merging: coefficients for a repository of N models, found from the
  merged model's metric alone.

  ``evaluate(c) -> scalar`` is the only access to the models: the metric of
  the merge with coefficients ``c [N]`` (queries to a served merge, or a
  local merge and evaluation); no gradients, weights or per-model outputs
  are needed. An evosax strategy (`evolve`) searches `evo_coefficients`'
  candidates, starting from equal raw scores and ``scale``.

  Designed from the abstract (see `evo_coefficients`).

  Args:
    evaluate: the metric of a coefficient vector (higher is better; pure,
      jit-able).
    num_models: N.
    key: the PRNG key.
    keep: models kept with positive coefficients.
    negative: models kept with negative coefficients.
    generations: generations of the strategy.
    population_size: candidates per generation.
    scale: the starting positive and negative scales.
    strategy: the evosax strategy.
    init_std: the strategy's initial spread (``std_init``).
    **evolve_kwargs: passed to `evolve` (checkpoints, progress, chunks, ...).

  Returns:
    ``(coefficients [N], SearchResult)``; the result's ``best`` is the raw
    candidate.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> want = jnp.array([0.5, 0., 0., 0.3, 0., 0.])
    >>> c, r = mj.search.evo_merging(lambda c: -jnp.sum((c - want) ** 2), 6,
    ...                              jax.random.key(0), keep=2,
    ...                              generations=60, progress=False)
    >>> bool(jnp.all((c > 0) == (want > 0))), r.evaluations
    (True, 960)

  References:
    Chen et al., "Black-box Model Merging for Language-Model-as-a-Service
    with Massive Model Repositories", 2025 (https://arxiv.org/abs/2509.12951).
  """
  n = int(num_models)
  to_c = lambda cand: evo_coefficients(cand, keep=keep, negative=negative)
  to_c({'raw': jnp.zeros(n), 'scale': jnp.zeros(2)})  # validates now
  x0 = {'raw': jnp.full((n,), 1.0 / n), 'scale': jnp.asarray(scale,
                                                               jnp.float32)}
  params = dict(evolve_kwargs.pop('params', None) or {})
  params.setdefault('std_init', init_std)
  r = _evolve.evolve(lambda cand: evaluate(to_c(cand)), x0, key=key,
                     generations=generations, population_size=population_size,
                     strategy=strategy, params=params, **evolve_kwargs)
  return to_c(r.best), r
