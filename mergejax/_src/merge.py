"""`merge`: run a `MergeTransformation` on a base model and K fine-tunes."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mergejax._src import base as base_lib
from mergejax._src import checks
from mergejax._src import paths

ACCUM_DTYPE = jnp.float32


def stack_models(models: Sequence[Any], dtype=ACCUM_DTYPE) -> Any:
  """Stacks models into one pytree whose leaves have a leading model axis."""
  return jax.tree.map(lambda *xs: jnp.stack([x.astype(dtype) for x in xs]),
                      *models)


@functools.partial(jax.jit, static_argnames=('update', 'with_state'))
def _run(update, models, state, base, key, with_state=True):
  stacked = stack_models(models)
  base32 = None if base is None else jax.tree.map(
      lambda x: x.astype(ACCUM_DTYPE), base)
  out, state = update(stacked, state, base32, key=key)
  # Check and cast here, at trace time: a cast outside the jit would be one
  # more pass over the merged model, in float32.
  ref = base if base is not None else models[0]
  _check_reduced(out, ref)
  out = jax.tree.map(lambda o, r: o.astype(r.dtype), out, ref)
  # Diagnostics in the state (e.g. TIES's agreement fraction) are whole-tensor
  # reductions that XLA:CPU fuses badly with the merge itself; when nobody
  # asks for the state, not returning it lets XLA drop them as dead code.
  return (out, state) if with_state else (out, None)


def merge(transformation: base_lib.MergeTransformation,
          base: Any,
          models: Sequence[Any],
          key: jax.Array | None = None,
          *,
          check_finite: bool = True,
          return_state: bool = False) -> Any:
  """Merges ``models`` into one model with ``transformation``.

  The models are stacked along a leading model axis in float32 and passed with
  the base model (also float32) to ``transformation.update`` under ``jax.jit``.
  The result is cast back to the base model's dtypes (or the first model's when
  there is no base). Compilation happens once per tree structure and static
  configuration: numeric hyperparameters live in the transformation's state, so
  new values re-use the compiled function, and calling `merge` inside
  ``jax.vmap`` sweeps hyperparameters in one compiled call.

  Args:
    transformation: the merge, e.g. ``mergejax.methods.ties(density=0.2)``; it
      must reduce the model axis (end with a reducing step).
    base: the pre-trained parameters (a pytree), or None for methods without a
      base (e.g. ``linear``).
    models: the K fine-tuned models, each with ``base``'s structure, shapes and
      dtypes.
    key: a PRNG key for random methods (DARE, DELLA).
    check_finite: scan inputs for NaN/Inf before merging.
    return_state: also return the transformation's final state (diagnostics).

  Returns:
    The merged parameters (``base``'s structure and dtypes), and the state if
    ``return_state``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros(3)}
    >>> fts = [{'w': jnp.array([1., -2., 3.])}, {'w': jnp.array([1., 2., 1.])}]
    >>> mj.merge(mj.methods.ties(density=1.0), base, fts)['w']
    Array([1., 2., 2.], dtype=float32)
  """
  models = checks.cast_models(base, models)
  checks.check_models(base, models, check_finite=check_finite,
                      base_required=False)
  ref = base if base is not None else models[0]
  state = transformation.init(ref)
  out, state = _run(transformation.update, models, state, base, key,
                    with_state=return_state)
  return (out, state) if return_state else out


def _check_reduced(out: Any, ref: Any) -> None:
  ref_flat = paths.flatten_to_dict(ref)
  out_flat = paths.flatten_to_dict(out)
  if set(out_flat) != set(ref_flat):
    raise ValueError('The transformation changed the tree structure: it '
                     f'returned leaves {sorted(out_flat)[:5]}..., expected '
                     f'{sorted(ref_flat)[:5]}....')
  for p, o in out_flat.items():
    if o.shape != ref_flat[p].shape:
      raise ValueError(
          f'Leaf {p!r} came out with shape {tuple(o.shape)}, expected '
          f'{tuple(ref_flat[p].shape)}: the transformation must remove the '
          'model axis exactly once (end the chain with a reducing step such '
          'as weighted_sum or disjoint_merge, then apply_to_base).')
