"""The TIES family (mergekit's generalized task arithmetic) and SCE, MagMax, RAM.

Every method is a `named_chain` of primitives, so its steps' states are
readable by name (``state['elect'].agreement``, ``state['trim'].density``):

    task_vectors -> sparsify (trim | dare | breadcrumbs | della)
                 -> [elect_sign] -> disjoint_merge | weighted_sum
                 -> scale(lambda_) -> apply_to_base

Names and defaults follow mergekit 0.1.5 (``weight``, ``density``, ``gamma``,
``epsilon``, ``lambda_`` for ``lambda``, ``normalize``, ``rescale``); each
docstring says which settings reproduce the TIES/DARE/DELLA papers and
FusionBench. ``weight``, ``density``, ``gamma`` and ``epsilon`` may be one
value or one per model. mergekit requires ``weight``; here None means 1.
"""

from __future__ import annotations

from typing import Sequence

import jax

from mergejax._src import base
from mergejax.transforms import _ram as ram_lib
from mergejax.transforms import _sce as sce_lib
from mergejax.transforms import _consensus as consensus
from mergejax.transforms import _reduce as reduce_lib
from mergejax.transforms import _sparsify as sparsify

Hparam = float | Sequence[float] | jax.Array
Weights = Hparam | None


def _rescale(rescale: bool | str | None, paper: str) -> str | None:
  """mergekit's boolean ``rescale`` -> a rescale mode (True = mergekit's L1)."""
  if rescale is True:
    return 'l1'
  if rescale is False or rescale is None:
    return None
  allowed = ('l1', paper)
  if rescale not in allowed:
    raise ValueError(f'rescale must be a bool or one of {allowed}, got '
                     f'{rescale!r}.')
  return rescale


def _combine(weight: Weights, *, consensus_method: str | None,
             normalize: bool, reduce: str | None, zero: str
             ) -> tuple[tuple[str, base.MergeTransformation], ...]:
  if consensus_method is None:
    if reduce not in (None, 'sum', 'mean'):
      raise ValueError(f'reduce={reduce!r} needs sign consensus; without it '
                       "the models are combined by a weighted sum or mean.")
    return (('merge', reduce_lib.weighted_sum(
        weight, normalize=normalize if reduce is None else reduce == 'mean')),)
  red = reduce if reduce is not None else ('mean' if normalize else 'sum')
  return (('elect', consensus.elect_sign(consensus_method, weights=weight,
                                         zero=zero)),
          ('merge', consensus.disjoint_merge(weight, reduce=red)))


def _gta(sparsifier: tuple[str, base.MergeTransformation] | None,
         weight: Weights, lambda_: Hparam, *, consensus_method: str | None,
         normalize: bool, reduce: str | None = None, zero: str = 'plus'
         ) -> base.MergeTransformation:
  steps = [('task_vectors', reduce_lib.task_vectors())]
  if sparsifier is not None:
    steps.append(sparsifier)
  steps.extend(_combine(weight, consensus_method=consensus_method,
                        normalize=normalize, reduce=reduce, zero=zero))
  steps += [('scale', reduce_lib.scale(lambda_)),
            ('apply', reduce_lib.apply_to_base())]
  return base.named_chain(*steps)


def ties(weight: Weights = None, density: Hparam = 1.0, *,
         lambda_: Hparam = 1.0, normalize: bool = True,
         rescale: bool | str = False, scope: str = 'tensor',
         count: str = 'mergekit', exact: bool = True, elect: str = 'sum',
         zero: str = 'plus', reduce: str | None = None
         ) -> base.MergeTransformation:
  """TIES merging: trim, elect sign, disjoint merge, scale.

  Defaults reproduce mergekit's ``ties`` (per-tensor trim keeping
  ``max(1, int(density n))``, sign of the weighted sum, weighted disjoint mean
  ``sum w m x / sum w m`` with ``normalize``). Other peers:

  * TIES paper: ``ties(density=0.2, scope='global')`` (trim over the whole
    task vector, disjoint mean; ``lambda_`` tuned, ~1).
  * FusionBench ``TiesMergingAlgorithm`` (threshold 20, ``merge_func='sum'``,
    scaling 0.3): ``ties(density=0.2, scope='global', count='fusionbench',
    exact=False, zero='majority', reduce='sum', lambda_=0.3)``; its trim covers
    every state-dict entry, so pass exactly those leaves.

  Args:
    weight: per-model weights (mergekit ``weight``).
    density: fraction kept by the trim, in (0, 1]; per model allowed.
    lambda_: scaling of the merged task vector (mergekit ``lambda``).
    normalize: disjoint mean (True, mergekit default) or sum (False).
    rescale: mergekit ``rescale`` (True: L1-preserving rescale after trim).
    scope: trim ``'tensor'`` (mergekit) or ``'global'`` (paper, FusionBench).
    count: trim count rule, ``'mergekit'`` or ``'fusionbench'`` (see `trim`).
    exact: keep exactly k entries at the trim (False keeps threshold ties).
    elect: ``'sum'`` or ``'count'`` (see `elect_sign`).
    zero: how a zero total elects, ``'plus'`` or ``'majority'``.
    reduce: overrides ``normalize``: ``'mean'``, ``'sum'`` or ``'max'``.

  Returns:
    A `named_chain` with steps ``task_vectors, trim, elect, merge, scale,
    apply``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(3)}
    >>> fts = [{'w': jnp.array([1., -2., 3.])}, {'w': jnp.array([1., 2., 1.])}]
    >>> mj.merge(mj.methods.ties(density=1.0), base, fts)['w']
    Array([1., 2., 2.], dtype=float32)

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
      NeurIPS 2023.
      https://arxiv.org/abs/2306.01708
  """
  trim = sparsify.trim(density, scope=scope, exact=exact, count=count,
                       rescale=_rescale(rescale, 'l1'))
  return _gta(('trim', trim), weight, lambda_, consensus_method=elect,
              normalize=normalize, reduce=reduce, zero=zero)


def dare_linear(weight: Weights = None, density: Hparam = 1.0, *,
                lambda_: Hparam = 1.0, normalize: bool = False,
                rescale: bool | str = True) -> base.MergeTransformation:
  """DARE followed by a weighted sum (mergekit ``dare_linear``); needs a key.

  ``rescale=True`` is mergekit's L1-preserving rescale; the DARE paper and
  FusionBench's DARE task arithmetic divide by the density:
  ``dare_linear(density=0.5, rescale='inverse_density', lambda_=0.3)``
  (FusionBench's ``sparsity_ratio`` is ``1 - density``).

  Args:
    weight: per-model weights.
    density: keep probability, in (0, 1]; per model allowed.
    lambda_: scaling of the merged task vector.
    normalize: divide by the weight sum (mergekit default False).
    rescale: True/``'l1'`` (mergekit), ``'inverse_density'`` (paper) or False.

  Returns:
    A `named_chain` with steps ``task_vectors, dare, merge, scale, apply``.

  References:
    Yu et al., "Language Models are Super Mario: Absorbing Abilities from
      Homologous Models as a Free Lunch", ICML 2024.
      https://arxiv.org/abs/2311.03099
  """
  sp = sparsify.dare(density, rescale=_rescale(rescale, 'inverse_density'))
  return _gta(('dare', sp), weight, lambda_, consensus_method=None,
              normalize=normalize)


def dare_ties(weight: Weights = None, density: Hparam = 1.0, *,
              lambda_: Hparam = 1.0, normalize: bool = False,
              rescale: bool | str = True, reduce: str | None = None
              ) -> base.MergeTransformation:
  """DARE, then TIES' sign election and disjoint merge (mergekit ``dare_ties``).

  Needs a key. mergekit's defaults: ``normalize=False`` (a disjoint *sum*),
  L1 rescale. FusionBench's DARE-TIES rescales by ``1/density`` and then runs
  its TIES (global trim at 20 %, sum, scaling 0.5); compose it as
  ``chain(task_vectors(), dare(d, rescale='inverse_density'), trim(0.2,
  scope='global', count='fusionbench', exact=False), elect_sign(
  zero='majority'), disjoint_merge(reduce='sum'), scale(0.5),
  apply_to_base())``.

  Args:
    weight: per-model weights.
    density: keep probability, in (0, 1]; per model allowed.
    lambda_: scaling of the merged task vector.
    normalize: disjoint mean (True) or sum (False, mergekit default).
    rescale: True/``'l1'`` (mergekit), ``'inverse_density'`` (paper) or False.
    reduce: overrides ``normalize`` (``'mean'``, ``'sum'``, ``'max'``).

  Returns:
    A `named_chain` with steps ``task_vectors, dare, elect, merge, scale,
    apply``.

  References:
    Yu et al., "Language Models are Super Mario", ICML 2024.
      https://arxiv.org/abs/2311.03099
    Yadav et al., "TIES-Merging", NeurIPS 2023. https://arxiv.org/abs/2306.01708
  """
  sp = sparsify.dare(density, rescale=_rescale(rescale, 'inverse_density'))
  return _gta(('dare', sp), weight, lambda_, consensus_method='sum',
              normalize=normalize, reduce=reduce)


def breadcrumbs(weight: Weights = None, density: Hparam = 1.0,
                gamma: Hparam = 0.01, *, lambda_: Hparam = 1.0,
                normalize: bool = False, rescale: bool | str = False
                ) -> base.MergeTransformation:
  """Model Breadcrumbs, then a weighted sum (mergekit ``breadcrumbs``).

  mergekit 0.1.5 semantics, including ``gamma=0`` / tiny tensors, which keep
  ``int(density n)`` entries (see `mergejax.transforms.breadcrumbs_prune`).

  Args:
    weight: per-model weights.
    density: fraction kept, in (0, 1]; per model allowed.
    gamma: fraction of top-magnitude outliers dropped, in [0, 1).
    lambda_: scaling of the merged task vector.
    normalize: divide by the weight sum (mergekit default False).
    rescale: True/``'l1'`` for mergekit's L1 rescale (default False).

  Returns:
    A `named_chain` with steps ``task_vectors, breadcrumbs, merge, scale,
    apply``.

  References:
    Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
      with Sparse Masks", ECCV 2024.
      https://arxiv.org/abs/2312.06795
  """
  sp = sparsify.breadcrumbs_prune(density, gamma, rescale=_rescale(rescale, 'l1'))
  return _gta(('breadcrumbs', sp), weight, lambda_, consensus_method=None,
              normalize=normalize)


def breadcrumbs_ties(weight: Weights = None, density: Hparam = 1.0,
                     gamma: Hparam = 0.01, *, lambda_: Hparam = 1.0,
                     normalize: bool = False, rescale: bool | str = False,
                     reduce: str | None = None) -> base.MergeTransformation:
  """Model Breadcrumbs with TIES sign consensus (mergekit ``breadcrumbs_ties``).

  Args:
    weight: per-model weights.
    density: fraction kept, in (0, 1]; per model allowed.
    gamma: fraction of top-magnitude outliers dropped, in [0, 1).
    lambda_: scaling of the merged task vector.
    normalize: disjoint mean (True) or sum (False, mergekit default).
    rescale: True/``'l1'`` for mergekit's L1 rescale (default False).
    reduce: overrides ``normalize`` (``'mean'``, ``'sum'``, ``'max'``).

  Returns:
    A `named_chain` with steps ``task_vectors, breadcrumbs, elect, merge,
    scale, apply``.

  References:
    Davari and Belilovsky, "Model Breadcrumbs", ECCV 2024.
      https://arxiv.org/abs/2312.06795
    Yadav et al., "TIES-Merging", NeurIPS 2023. https://arxiv.org/abs/2306.01708
  """
  sp = sparsify.breadcrumbs_prune(density, gamma, rescale=_rescale(rescale, 'l1'))
  return _gta(('breadcrumbs', sp), weight, lambda_, consensus_method='sum',
              normalize=normalize, reduce=reduce)


def della(weight: Weights = None, density: Hparam = 1.0,
          epsilon: Hparam = 0.15, *, lambda_: Hparam = 1.0,
          normalize: bool = True, rescale: bool | str = True,
          axis: int | None = 1, reduce: str | None = None
          ) -> base.MergeTransformation:
  """DELLA: MAGPRUNE drop, sign election, disjoint merge (mergekit ``della``).

  Needs a key. Ranks run along ``axis`` (1 = the input axis of PyTorch
  ``(out, in)`` weights, as mergekit; use ``axis=-2`` for Flax kernels). The
  DELLA paper rescales each kept entry by ``1/p_i``: ``rescale='inverse_prob'``.

  Args:
    weight: per-model weights.
    density: mean keep probability, in (0, 1]; per model allowed.
    epsilon: half-width of the keep probabilities (``0 < density - epsilon``,
      ``density + epsilon < 1``).
    lambda_: scaling of the merged task vector.
    normalize: disjoint mean (True, mergekit default) or sum.
    rescale: True/``'l1'`` (mergekit), ``'inverse_prob'`` (paper) or False.
    axis: the ranking axis (see `mergejax.transforms.della_prune`).
    reduce: overrides ``normalize``.

  Returns:
    A `named_chain` with steps ``task_vectors, della, elect, merge, scale,
    apply``.

  References:
    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
      Magnitude-Based Sampling", 2024.
      https://arxiv.org/abs/2406.11617
  """
  sp = sparsify.della_prune(density, epsilon, rescale=_rescale(rescale, 'inverse_prob'),
                      axis=axis)
  return _gta(('della', sp), weight, lambda_, consensus_method='sum',
              normalize=normalize, reduce=reduce)


def della_linear(weight: Weights = None, density: Hparam = 1.0,
                 epsilon: Hparam = 0.15, *, lambda_: Hparam = 1.0,
                 normalize: bool = False, rescale: bool | str = True,
                 axis: int | None = 1) -> base.MergeTransformation:
  """DELLA drop, then a weighted sum (mergekit ``della_linear``); needs a key.

  Args:
    weight: per-model weights.
    density: mean keep probability, in (0, 1]; per model allowed.
    epsilon: half-width of the keep probabilities.
    lambda_: scaling of the merged task vector.
    normalize: divide by the weight sum (mergekit default False).
    rescale: True/``'l1'`` (mergekit), ``'inverse_prob'`` (paper) or False.
    axis: the ranking axis (see `mergejax.transforms.della_prune`).

  Returns:
    A `named_chain` with steps ``task_vectors, della, merge, scale, apply``.

  References:
    Deep et al., "DELLA-Merging", 2024. https://arxiv.org/abs/2406.11617
  """
  sp = sparsify.della_prune(density, epsilon, rescale=_rescale(rescale, 'inverse_prob'),
                      axis=axis)
  return _gta(('della', sp), weight, lambda_, consensus_method=None,
              normalize=normalize)


# ---------------------------------------------------------------- SCE


def sce(select_topk: Hparam = 1.0) -> base.MergeTransformation:
  """SCE: select by variance, calculate weights, erase sign conflicts (mergekit).

  Args:
    select_topk: fraction of the non-zero-variance entries kept (1.0 keeps
      all, mergekit's default).

  Returns:
    A `named_chain` with steps ``task_vectors, select, merge, apply``.

  References:
    Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (SCE merging),
      2024.
      https://arxiv.org/abs/2408.07990
  """
  return base.named_chain(('task_vectors', reduce_lib.task_vectors()),
                          ('select', sce_lib.sce_select(select_topk)),
                          ('merge', sce_lib.sce_merge()),
                          ('apply', reduce_lib.apply_to_base()))


# ---------------------------------------------------------------- MagMax


def magmax(*, lambda_: Hparam = 0.5) -> base.MergeTransformation:
  """MagMax (FusionBench ``magmax``): per entry, the task vector of largest |.|.

  Ties go to the later model, as in FusionBench; ``theta_0 + lambda_ tau_max``
  with FusionBench's scaling factor 0.5 by default.

  Returns:
    A `named_chain` ``task_vectors, merge (disjoint_merge max), scale, apply``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([1., -4.])}, {'w': jnp.array([-2., 3.])}]
    >>> mj.merge(mj.methods.magmax(lambda_=1.0), {'w': jnp.zeros(2)}, fts)['w']
    Array([-2., -4.], dtype=float32)

  References:
    Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual
      Learning", ECCV 2024.
      https://arxiv.org/abs/2407.06322
  """
  return base.named_chain(('task_vectors', reduce_lib.task_vectors()),
                          ('merge', consensus.disjoint_merge(reduce='max')),
                          ('scale', reduce_lib.scale(lambda_)),
                          ('apply', reduce_lib.apply_to_base()))


# ---------------------------------------------------------------- RAM


def ram(*, epsilon: Hparam = 1e-5) -> base.MergeTransformation:
  """RAM (mergekit ``ram``): average shared updates, keep unique ones.

  Returns:
    A `named_chain` ``task_vectors, merge, apply``.

  References:
    Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (RAM),
      2026.
      https://arxiv.org/abs/2601.13572
  """
  return base.named_chain(('task_vectors', reduce_lib.task_vectors()),
                          ('merge', ram_lib.ram_merge(epsilon)),
                          ('apply', reduce_lib.apply_to_base()))


def ramplus_tl(*, r: Hparam = 0.1, alpha: Hparam = 0.2,
               epsilon: Hparam = 1e-5) -> base.MergeTransformation:
  """RAM+ tensor-local (mergekit ``ramplus_tl``): RAM with unique updates boosted.

  Unique entries of model ``i`` are scaled by ``1 + r clip(shared_i/unique_i,
  0, alpha)`` (counts within the tensor). Whether the paper's RAM+ counts per
  tensor or over the whole model is uncertain; this is mergekit's per-tensor
  version.

  Returns:
    A `named_chain` ``task_vectors, merge, apply``.

  References:
    Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models"
      (RAM+), 2026.
      https://arxiv.org/abs/2601.13572
  """
  return base.named_chain(('task_vectors', reduce_lib.task_vectors()),
                          ('merge', ram_lib.ram_merge(epsilon, r=r, alpha=alpha)),
                          ('apply', reduce_lib.apply_to_base()))
