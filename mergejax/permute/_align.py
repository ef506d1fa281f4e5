"""`permute_align`: a merge primitive that aligns every stacked model to a reference."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax.permute import _matching as matching
from mergejax.permute import _spec as spec_lib
from mergejax.permute._spec import PermutationSpec


class PermuteAlignState(NamedTuple):
  """``permutations``: ``{group: [K, ...] int32}`` after ``update`` (None after init)."""
  permutations: Any = None


def permute_align(spec: PermutationSpec, *, reference: str = 'base',
                  solver: str = 'auto',
                  max_iter: int = 100) -> base.MergeTransformation:
  """Permutes every stacked model onto a reference by weight matching.

  ``[K, ...] -> [K, ...]`` (keeps the model axis). Put it **first** in a
  chain, on the raw models (before `task_vectors`), then any merge:
  ``mergejax.chain(permute_align(spec), mergejax.methods.average())``.

  Under ``jit`` (``mergejax.merge`` jits every update):

  * ``solver='auto'`` (default; fastest on CPU), ``'scipy'`` or ``'lapjv'``
    runs the host weight matching (incremental costs, host LAP) through
    ``jax.pure_callback``, one model after another. It blocks on the host and
    is not differentiable.
  * ``solver='hungarian'`` runs the whole coordinate descent in JAX
    (``while_loop`` + ``lax.switch`` + optax's Hungarian), vmapped over the
    models: no host round trip, suited to accelerators.

  Args:
    spec: the `PermutationSpec` of the model.
    reference: ``'base'`` (the ``params`` passed to update, e.g. the base
      model) or ``'first'`` (``models[0]``, for merges without a base).
    solver: ``'auto' | 'scipy' | 'lapjv' | 'hungarian' | 'sinkhorn'``.
    max_iter: maximum coordinate-descent sweeps.

  Returns:
    A `MergeTransformation`; its state holds the permutations found.

  Example:
    >>> import jax, jax.numpy as jnp, mergejax as mj
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> a = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (3, 4)),
    ...                  'bias': jnp.zeros(4)},
    ...      'Dense_1': {'kernel': jax.random.normal(jax.random.key(1), (4, 2)),
    ...                  'bias': jnp.zeros(2)}}
    >>> b = permute.apply_permutation(spec, {'P_0': jnp.array([2, 0, 3, 1])}, a)
    >>> tx = mj.chain(permute.permute_align(spec, reference='first'), mj.transforms.mean())
    >>> out = mj.merge(tx, None, [a, b])
    >>> bool(jnp.allclose(out['Dense_0']['kernel'], a['Dense_0']['kernel']))
    True
  """
  if reference not in ('base', 'first'):
    raise ValueError(f"reference must be 'base' or 'first', got {reference!r}.")
  if solver not in ('auto', 'scipy', 'lapjv', 'hungarian', 'sinkhorn'):
    raise ValueError(f'Unknown solver {solver!r}.')
  return base.MergeTransformation(
      lambda params: PermuteAlignState(),
      base.static_fn.of(_permute_align_update, spec=spec, reference=reference,
                        solver=solver, max_iter=max_iter))


def _permute_align_update(updates, state, params=None, *, key=None, spec,
                          reference, solver, max_iter):
  del state
  if reference == 'base':
    if params is None:
      raise ValueError("permute_align(reference='base') needs the base model: "
                       "pass base= to merge, or use reference='first'.")
    ref = params
  else:
    ref = jax.tree.map(lambda u: u[0], updates)
  key = jax.random.key(0) if key is None else key
  if solver in ('auto', 'scipy', 'lapjv'):
    seed = jax.random.bits(key, dtype=jnp.uint32)
    perms = matching.host_permutations_callback(spec, ref, updates, seed,
                                                max_iter=max_iter,
                                                lap_solver=solver)
  else:
    resolved = spec.resolve(ref)
    ident = spec_lib.identity_permutations(spec, ref)
    k = jax.tree.leaves(updates)[0].shape[0]
    from mergejax._src import paths  # pylint: disable=g-import-not-at-top
    ref_flat = paths.flatten_to_dict(ref)

    def one(model, key):
      perms, _ = matching._jax_matching(  # pylint: disable=protected-access
          spec, resolved, ref_flat, paths.flatten_to_dict(model), ident, key,
          max_iter, solver)
      return perms

    perms = jax.vmap(one)(updates, jax.random.split(key, k))
  aligned = jax.vmap(lambda p, m: spec_lib.apply_permutation(spec, p, m))(
      perms, updates)
  return aligned, PermuteAlignState(perms)
