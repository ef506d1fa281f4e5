"""Interpolation methods under mergekit's names and defaults.

Each method is the matching primitive from `mergejax.transforms._interpolate` with
mergekit's parameter names (``nuslerp_flatten``, ``nuslerp_row_wise``,
``normalize_weights``, ...), so a mergekit YAML maps over one to one. All of
them return merged parameters directly (no ``apply_to_base`` step).
"""

from __future__ import annotations

import jax

from mergejax._src import base
from mergejax.transforms import _interpolate as interpolate

Weights = interpolate.Weights


def slerp(t: float | jax.Array, *, dot_threshold: float | jax.Array = 0.9995
          ) -> base.MergeTransformation:
  """mergekit ``slerp``: merge(base=v0, models=[v1]); ``t = 0`` gives the base.

  mergekit requires exactly two inputs, one of them the base; here the base
  is ``base=`` and the other model the only entry of ``models``. A mergekit
  gradient ``t`` (a list over layers) maps onto `mergejax.partition` with one
  `slerp` per layer group (same static config: one compile).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base, ft = {'w': jnp.array([1., 2.])}, {'w': jnp.array([3., 4.])}
    >>> mj.merge(mj.methods.slerp(t=1.0), base, [ft])['w']
    Array([3., 4.], dtype=float32)

  References:
    Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985.
      https://doi.org/10.1145/325165.325242
    mergekit. https://github.com/arcee-ai/mergekit
  """
  return interpolate.slerp_reduce(t, dot_threshold=dot_threshold)


def nuslerp(weight: Weights = None, *, nuslerp_flatten: bool = True,
            nuslerp_row_wise: bool = False, axis: int | None = None
            ) -> base.MergeTransformation:
  """mergekit ``nuslerp``: two models, optional base, ``t = w_1/(w_0 + w_1)``.

  Pass ``base=None`` to `mergejax.merge` for mergekit's base-less form. With
  ``nuslerp_flatten=False`` vectors run along the last axis (PyTorch
  ``(out, in)`` rows; ``axis=0`` gives the same vectors for Flax ``(in, out)``
  kernels) or along axis 0 with ``nuslerp_row_wise``. See
  `mergejax.transforms.nuslerp_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([0., 1.])}]
    >>> mj.merge(mj.methods.nuslerp(weight=[1., 0.]), None, fts)['w']
    Array([1., 0.], dtype=float32)

  References:
    mergekit (``nuslerp``). https://github.com/arcee-ai/mergekit
  """
  return interpolate.nuslerp_reduce(weight, flatten=nuslerp_flatten,
                             row_wise=nuslerp_row_wise, axis=axis)


def multislerp(weight: Weights = None, *, normalize_weights: bool = True,
               eps: float | jax.Array = 1e-8) -> base.MergeTransformation:
  """mergekit ``multislerp``: >= 1 models, optional base. See `mergejax.transforms.multislerp_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([1., 2.])}]
    >>> mj.merge(mj.methods.multislerp(), {'w': jnp.zeros(2)}, fts)['w']
    Array([1., 2.], dtype=float32)

  References:
    mergekit (``multislerp``). https://github.com/arcee-ai/mergekit
  """
  return interpolate.multislerp_reduce(weight, normalize_weights=normalize_weights,
                                eps=eps)


def karcher(*, max_iter: int | jax.Array = 10, tol: float | jax.Array = 1e-5,
            weight: Weights = None) -> base.MergeTransformation:
  """mergekit ``karcher``; ``weight=None`` (uniform) reproduces mergekit.

  mergekit ignores per-model weights and averages a listed base in as one
  more model: put the base in ``models`` for that (the ``base=`` argument is
  not used). ``weight`` gives a weighted Karcher mean. See `mergejax.transforms.karcher_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> fts = [{'w': jnp.array([1., 0.])}, {'w': jnp.array([1., 0.])}]
    >>> mj.merge(mj.methods.karcher(), None, fts)['w']
    Array([1., 0.], dtype=float32)

  References:
    Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 1977.
      https://doi.org/10.1002/cpa.3160300502
    mergekit (``karcher``). https://github.com/arcee-ai/mergekit
  """
  return interpolate.karcher_reduce(weights=weight, max_iter=max_iter, tol=tol)


def model_stock(*, filter_wise: bool = False, convention: str = 'mergekit',
                axis: int = -1) -> base.MergeTransformation:
  """Model Stock: base required plus >= 2 models. See `mergejax.transforms.model_stock_reduce`.

  ``convention='mergekit'`` (mean of pairwise cosines) reproduces mergekit
  ``model_stock``; ``'fusionbench'`` (cosine of the mean pairwise angle)
  reproduces FusionBench's ``ModelStock`` ratio.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(2)}
    >>> fts = [{'w': jnp.array([2., 0.])}, {'w': jnp.array([2., 0.])}]
    >>> mj.merge(mj.methods.model_stock(), base, fts)['w']  # parallel: t = 1
    Array([2., 0.], dtype=float32)

  References:
    Jang et al., "Model Stock: All we need is just a few fine-tuned models",
      ECCV 2024.
      https://arxiv.org/abs/2403.19522
  """
  return interpolate.model_stock_reduce(filter_wise=filter_wise, convention=convention,
                                 axis=axis)


def nearswap(t: float | jax.Array) -> base.MergeTransformation:
  """mergekit ``nearswap``: base plus exactly one model. See `mergejax.transforms.nearswap_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base, ft = {'w': jnp.array([0., 0.])}, {'w': jnp.array([0.1, 2.])}
    >>> mj.merge(mj.methods.nearswap(t=0.5), base, [ft])['w']
    Array([0.1, 0.5], dtype=float32)

  References:
    mergekit (``nearswap``). https://github.com/arcee-ai/mergekit
  """
  return interpolate.nearswap_reduce(t)


def arcee_fusion(*, axis: int = -1) -> base.MergeTransformation:
  """mergekit ``arcee_fusion``: base plus exactly one model. See `mergejax.transforms.arcee_fusion_reduce`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base, ft = {'w': jnp.zeros((2, 3))}, {'w': jnp.ones((2, 3))}
    >>> mj.merge(mj.methods.arcee_fusion(), base, [ft])['w'].shape
    (2, 3)

  References:
    mergekit (``arcee_fusion``). https://github.com/arcee-ai/mergekit
  """
  return interpolate.arcee_fusion_reduce(axis=axis)
