"""Merging LoRA adapters as factor pairs, without materialising full deltas.

A LoRA update of a Flax kernel ``(in, out)`` is a `LoRA` pair with
``delta = a @ b``: ``a (in, r)``, ``b (r, out)``. From PEFT (PyTorch,
``delta_W = B A`` with ``lora_A (r, in)``, ``lora_B (out, r)``) the mapping is
``a = lora_A.T``, ``b = (scaling * lora_B).T``, so that ``(B A).T = a @ b``.

An adapter is any pytree whose LoRA-adapted leaves are `LoRA` nodes (other
leaves, e.g. trained biases, are merged by a weighted sum). Methods:

* `lora_svd`: the best rank-``rank`` approximation of ``sum_i w_i a_i b_i``
  computed from QR factors of the concatenated factors, in
  ``O((in + out) K r)`` memory: the ``in x out`` delta is never formed.
* `lora_lego`: LoRA-LEGO (Zhao et al. 2025): rank-wise clustering of all
  ``K r`` rank-one units into ``rank`` clusters with k-means; each cluster's
  merged unit is the mean of its members.

`lora_from_delta` turns dense deltas (e.g. the task vectors of fully
fine-tuned models) into adapters by truncated SVD of each matrix leaf.

Both return adapters (factor pairs). Use them with `merge_lora`, which checks
the pairs (ranks must agree within a pair and across adapters, naming the
leaf) and runs the transformation under jit; with ``rank`` equal to the input
rank they also run through ``mergejax.merge(tx, None, adapters)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import paths
from mergejax.transforms import _subspace as subspace


class LoRA(NamedTuple):
  """A low-rank update ``a @ b`` of a Flax kernel (see the module docstring)."""
  a: jax.Array  # (in, r)
  b: jax.Array  # (r, out)


def is_lora(x):
  return isinstance(x, LoRA)


def lora_delta(adapter: Any) -> Any:
  """Materialises every `LoRA` node as the dense ``a @ b`` (float32)."""
  return jax.tree.map(
      lambda x: (x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)
                 if is_lora(x) else x), adapter, is_leaf=is_lora)


def lora_from_delta(delta: Any, rank: int | None) -> Any:
  """Best rank-``rank`` `LoRA` factors of every 2-D leaf of a dense delta.

  Each matrix leaf ``tau (in, out)`` (Flax layout, e.g. a task vector
  ``theta_t - theta_0``) becomes ``LoRA(a, b)`` from its truncated SVD
  ``tau ~ U_r S_r V_r^T``: ``a = U_r S_r^(1/2)`` ``(in, r)``, ``b = S_r^(1/2)
  V_r^T`` ``(r, out)``, the best rank-``r`` approximation in Frobenius and
  spectral norm (Eckart-Young), with the singular values split evenly between
  the factors. Other leaves (biases, scalars, conv kernels) stay dense, as
  `lora_svd` and `lora_lego` merge dense leaves directly. The SVD runs in
  float32; factors come back in the leaf's dtype.

  Args:
    delta: a pytree of dense arrays.
    rank: static rank of every factor pair; None means each matrix's full rank
      ``min(in, out)`` (then ``a @ b`` reproduces the leaf up to rounding).

  Returns:
    The pytree with `LoRA` nodes in place of the 2-D leaves.

  Raises:
    ValueError: naming the leaf, when ``rank`` is below 1 or above
      ``min(in, out)`` of a matrix leaf.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tau = {'w': jnp.outer(jnp.arange(1., 4.), jnp.ones(2)), 'b': jnp.ones(2)}
    >>> ad = mj.transforms.lora_from_delta(tau, rank=1)
    >>> ad['w'].a.shape, ad['w'].b.shape, ad['b'].shape
    ((3, 1), (1, 2), (2,))
    >>> bool(jnp.allclose(mj.transforms.lora_delta(ad)['w'], tau['w'], atol=1e-5))
    True
  """
  if rank is not None and (int(rank) != rank or rank < 1):
    raise ValueError(f'lora_from_delta: rank must be a positive int or None, '
                     f'got {rank!r}.')

  def one(path, x):
    x = jnp.asarray(x)
    if x.ndim != 2:
      return x
    n_in, n_out = x.shape
    full = min(n_in, n_out)
    rk = full if rank is None else int(rank)
    if rk > full:
      raise ValueError(
          f'lora_from_delta: rank {rk} is impossible for leaf '
          f'{paths.path_str(path)!r} of shape {tuple(x.shape)}: at most '
          f'{full}. Lower the rank or pass rank=None (each leaf\'s full rank).')
    u, s, vh = subspace.svd(x)
    sq = jnp.sqrt(s[:rk])
    return LoRA((u[:, :rk] * sq[None]).astype(x.dtype),
                (sq[:, None] * vh[:rk]).astype(x.dtype))

  return jax.tree_util.tree_map_with_path(one, delta)


def check_lora(adapters: Sequence[Any]) -> None:
  """Checks LoRA pairs: ``a (..., in, r)`` / ``b (..., r, out)``, same ranks.

  Raises:
    ValueError: naming the leaf, for mismatched ranks inside a pair or across
      adapters, or for adapters with different trees.
  """
  ref = None
  for idx, ad in enumerate(adapters):
    nodes = {paths.path_str(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(ad, is_leaf=is_lora)[0]}
    for p, x in nodes.items():
      if not is_lora(x):
        continue
      if x.a.ndim < 2 or x.b.ndim < 2 or x.a.shape[-1] != x.b.shape[-2]:
        raise ValueError(
            f'adapters[{idx}] LoRA leaf {p!r}: a has shape {tuple(x.a.shape)} '
            f'and b {tuple(x.b.shape)}, but a must be (in, r) and b (r, out) '
            'with the same r. From PEFT use a = lora_A.T, b = lora_B.T.')
    if ref is None:
      ref = nodes
      continue
    if set(nodes) != set(ref):
      raise ValueError(
          f'adapters[{idx}] has leaves {sorted(set(nodes) ^ set(ref))[:5]} '
          'that adapters[0] lacks or vice versa: adapt the same modules.')
    for p, x in nodes.items():
      r0 = ref[p]
      if is_lora(x) != is_lora(r0):
        raise ValueError(f'adapters[{idx}] leaf {p!r} is LoRA in one adapter '
                         'and dense in another.')
      if is_lora(x) and (x.a.shape != r0.a.shape or x.b.shape != r0.b.shape):
        raise ValueError(
            f'adapters[{idx}] LoRA leaf {p!r} has rank {x.a.shape[-1]} '
            f'(a {tuple(x.a.shape)}, b {tuple(x.b.shape)}) but adapters[0] has '
            f'rank {r0.a.shape[-1]} (a {tuple(r0.a.shape)}, b '
            f'{tuple(r0.b.shape)}). Stacking needs equal ranks: zero-pad the '
            'smaller adapter to the larger rank (a with zero columns, b with '
            'zero rows), which leaves its delta unchanged.')


@functools.partial(jax.jit, static_argnames=('update',))
def run_jit(update, adapters, state, key):
  stacked = jax.tree.map(lambda *xs: jnp.stack([x.astype(jnp.float32)
                                                for x in xs]), *adapters)
  return update(stacked, state, None, key=key)


def merge_lora(tx: base.MergeTransformation, adapters: Sequence[Any],
               key: jax.Array | None = None, *, return_state: bool = False):
  """Merges LoRA adapters with ``tx`` (`lora_svd` / `lora_lego`), under jit.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> ad = [{'w': mj.transforms.LoRA(jnp.ones((3, 1)), jnp.ones((1, 2)))}] * 2
    >>> out = mj.transforms.merge_lora(mj.methods.lora_svd(), ad)
    >>> mj.transforms.lora_delta(out)['w'].round(4)
    Array([[2., 2.],
           [2., 2.],
           [2., 2.]], dtype=float32)
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError('merge_lora: no adapters given.')
  check_lora(adapters)
  state = tx.init(adapters[0])
  out, state = run_jit(tx.update, adapters, state, key)
  return (out, state) if return_state else out


