"""Learned permutation matching: Sinkhorn re-basin and the straight-through estimator.

Weight and activation matching pick permutations from a proxy (weight or
feature similarity). The methods here *learn* them on an objective:

* `sinkhorn_matching` (Sinkhorn re-basin, Pena et al. CVPR'23): one trainable
  logit matrix per permutation group; its log-domain Sinkhorn projection
  (`solvers.sinkhorn`) is a doubly-stochastic *soft permutation*, applied to
  the other model by a matmul along every axis the group permutes
  (`soft_apply_permutation`). An optax optimiser trains the logits on a
  data-free weight distance to the reference, or on the task loss at the
  midpoint (or a random point) of the interpolation. Optionally the forward
  pass uses the LAP-hardened matrix and the gradient the soft one (Git
  Re-Basin's STE v1). The answer is the LAP of the learned logits.
* `ste_matching` (Git Re-Basin's STE v2): trainable weights are projected onto
  the other model's permutation orbit by weight matching every step.

Convention (as `weight_matching`): ``perms[g][i]`` is the unit of ``other``
matched to unit ``i`` of ``reference``; a soft matrix ``S`` has rows indexed by
the reference's units and columns by the other's, ``S[i, perms[g][i]] = 1``
in the hard limit, and aligns ``other`` by ``out[i] = sum_j S[i, j] x[j]``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import optim
from mergejax._src import paths
from mergejax.permute import _evaluate as evaluate_lib
from mergejax.permute import _matching as matching_lib
from mergejax.permute import _solvers as solvers_lib
from mergejax.permute import _spec as spec_lib
from mergejax.permute._spec import PermutationSpec

LOSSES = ('l2', 'cosine', 'midpoint', 'random')
_DATA_LOSSES = ('midpoint', 'random')
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- #
# Soft permutations.
# --------------------------------------------------------------------------- #
def permutation_matrices(perms: Mapping[str, Any]) -> dict[str, jax.Array]:
  """0/1 matrices ``M[..., i, perm[..., i]] = 1`` of ``{group: perm}`` (float32).

  ``soft_apply_permutation(spec, permutation_matrices(p), x)`` equals
  ``apply_permutation(spec, p, x)``; nested ``[H, n]`` permutations give
  ``[H, n, n]`` matrices.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> permute.permutation_matrices({'h': jnp.array([2, 0, 1])})['h']
    Array([[0., 0., 1.],
           [1., 0., 0.],
           [0., 1., 0.]], dtype=float32)
  """
  return {g: jax.nn.one_hot(jnp.asarray(p), jnp.shape(p)[-1], dtype=jnp.float32)
          for g, p in perms.items()}


def _check_matrices(spec: PermutationSpec, matrices: Mapping[str, Any],
                    tree: Any) -> None:
  shapes = spec.perm_shapes(tree)
  unknown = sorted(set(matrices) - set(shapes))
  if unknown:
    raise ValueError(f'Soft permutations for unknown group(s) {unknown}; the '
                     f'spec has groups {sorted(shapes)}.')
  for g, m in matrices.items():
    want = shapes[g] + shapes[g][-1:]
    if tuple(np.shape(m)) != want:
      where = spec.groups[g][0]
      raise ValueError(
          f'Soft permutation for group {g!r} has shape {tuple(np.shape(m))} but '
          f'the group needs {want} (size {shapes[g][-1]}, e.g. {where[0]!r} axis '
          f'{where[1]}; nested groups take one [n, n] matrix per slot).')


def _mix(x, m, axis):
  """``out[.., i, ..] = sum_j m[i, j] x[.., j, ..]`` along ``axis``."""
  return jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis), precision=_HIGHEST),
                      0, axis)


def _mix_nested(x, m, axis, slot_axis):
  """As `_mix` with a different ``[n, n]`` matrix per slot of ``slot_axis``."""
  y = jnp.moveaxis(x, (slot_axis, axis), (0, 1))
  flat = y.reshape(y.shape[:2] + (-1,))
  out = jnp.einsum('sij,sjr->sir', m, flat, precision=_HIGHEST).reshape(y.shape)
  return jnp.moveaxis(out, (0, 1), (slot_axis, axis))


def soft_apply_permutation(spec: PermutationSpec, matrices: Mapping[str, Any],
                           params: Any) -> Any:
  """Applies (soft) permutation matrices along every permuted axis of ``params``.

  The differentiable counterpart of `apply_permutation`: along each axis of
  group ``g``, ``out[i] = sum_j matrices[g][i, j] x[j]`` (a matmul, in float32
  at full precision). With 0/1 matrices (`permutation_matrices`) the result
  equals ``apply_permutation`` exactly. Nested (per-head) groups take one
  ``[n, n]`` matrix per slot of their parent (``[H, n, n]``), applied after the
  parent's matrix, as `apply_permutation` applies per-slot permutations after
  the heads have moved. Groups missing from ``matrices`` are left alone.

  Args:
    spec: the `PermutationSpec`.
    matrices: ``{group: [n, n]}`` (``[H, n, n]`` for nested groups), e.g.
      Sinkhorn soft permutations.
    params: the tree to permute (model B).

  Returns:
    The permuted tree (leaves promoted to at least float32).

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> p = {'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.arange(3.)},
    ...      'Dense_1': {'kernel': jnp.ones((3, 1)), 'bias': jnp.zeros(1)}}
    >>> half = jnp.array([[.5, .5, 0.], [.5, .5, 0.], [0., 0., 1.]])
    >>> permute.soft_apply_permutation(spec, {'P_0': half}, p)['Dense_0']['bias']
    Array([0.5, 0.5, 2. ], dtype=float32)
  """
  resolved = spec.resolve(params)
  _check_matrices(spec, matrices, params)
  nested = spec.nested

  def mix(x, g, axis, slot_axis):
    m = jnp.asarray(matrices[g], jnp.promote_types(x.dtype, jnp.float32))
    x = x.astype(m.dtype)
    return _mix(x, m, axis) if slot_axis is None else _mix_nested(x, m, axis, slot_axis)

  def leaf(path, x):
    return spec_lib.permute_axes(jnp.asarray(x), resolved[path], nested,
                                 set(matrices), mix)

  return paths.tree_map_with_path(leaf, params)


# --------------------------------------------------------------------------- #
# Sinkhorn re-basin.
# --------------------------------------------------------------------------- #
class SinkhornMatchingResult(NamedTuple):
  """Hard ``permutations``, final ``soft`` matrices, raw ``logits``, per-step ``losses``."""
  permutations: dict[str, jax.Array]
  soft: dict[str, jax.Array]
  logits: dict[str, jax.Array]
  losses: jax.Array


def _check_pair(reference, other):
  matching_lib.check_pair(reference, other)
  if jax.tree.structure(reference) != jax.tree.structure(other):
    raise ValueError('reference and other have the same leaf paths but different '
                     'pytree types (e.g. dict vs FrozenDict); convert one.')


def _stack_batches(batches):
  """A list of batches is stacked; anything else already has a leading axis."""
  if isinstance(batches, list) or (not isinstance(batches, (tuple, dict)) and
                                   hasattr(batches, '__iter__') and
                                   not hasattr(batches, 'shape')):
    batches = list(batches)
    if not batches:
      raise ValueError('batches is empty; give at least one batch.')
    try:
      return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                          *batches)
    except ValueError as e:
      raise ValueError('The batches must share one structure and shapes (they are '
                       'stacked and cycled inside the jitted loop); drop a '
                       f'ragged last batch. ({e})') from None
  leaves = jax.tree.leaves(batches)
  if not leaves or any(np.ndim(x) < 1 for x in leaves):
    raise ValueError('batches: give a list of batches, or one pytree whose leaves '
                     'all carry a leading axis that indexes the batches.')
  n = {np.shape(x)[0] for x in leaves}
  if len(n) != 1:
    raise ValueError(f'Stacked batches have different leading sizes {sorted(n)}; '
                     'the leading axis indexes the batches.')
  return jax.tree.map(jnp.asarray, batches)


def _init_logits(perms, key, noise):
  """One-hot matrices of ``perms`` plus ``noise * randn`` (one key per group)."""
  eye = permutation_matrices(perms)
  return {g: eye[g] + noise * jax.random.normal(jax.random.fold_in(key, i),
                                                eye[g].shape, jnp.float32)
          for i, g in enumerate(sorted(eye))}


def _weight_loss(mix, resolved, reference, permuted):
  """``mix[0] * L2 + mix[1] * cosine`` distance over the permuted leaves.

  Both are computed (a few reductions next to the Sinkhorn iterations) so that
  ``'l2'`` and ``'cosine'`` (``mix`` (1, 0) or (0, 1), traced) share one
  compiled loop; neither term's gradient can be NaN, so a zero weight is exact.
  """
  a_flat = paths.flatten_to_dict(reference)
  b_flat = paths.flatten_to_dict(permuted)
  sq, cos, size, count = 0.0, 0.0, 0, 0
  for path, ax in sorted(resolved.items()):
    if all(g is None for g in ax):
      continue  # not moved by any permutation: a constant
    a, b = a_flat[path], b_flat[path]
    sq = sq + jnp.sum(jnp.square(a - b))
    size += a.size
    # Not norm(a) * norm(b): the norm's gradient is NaN at an all-zero leaf
    # (e.g. freshly initialised biases); the floored product has none.
    denom = jnp.sqrt(jnp.maximum(jnp.sum(a * a) * jnp.sum(b * b), 1e-24))
    cos = cos + (1.0 - jnp.vdot(a, b) / denom)
    count += 1
  return mix[0] * sq / max(size, 1) + mix[1] * cos / max(count, 1)


@functools.partial(jax.jit, static_argnames=(
    'spec', 'loss', 'loss_fn', 'steps', 'n_iter', 'straight_through',
    'optimizer', 'solver'))
def _fit(init_perms, reference, other, batches, key, learning_rate, tau,
         init_noise, lam_range, weight_mix, *, spec, loss, loss_fn, steps,
         n_iter, straight_through, optimizer, solver):
  """The whole optimisation: one ``lax.scan`` over steps (compiled once)."""
  init_key, key = jax.random.split(key)
  logits = _init_logits(init_perms, init_key, init_noise)
  opt = optimizer if optimizer is not None else optax.adam(learning_rate)
  resolved = spec.resolve(reference)
  lap = solvers_lib.get_solver(solver) if straight_through else None
  sinkhorn = functools.partial(solvers_lib.sinkhorn, tau=tau, n_iter=n_iter)

  def soft(logits, harden):
    # Groups of one size (and per-head slots) go through one vmapped Sinkhorn
    # loop: one loop to compile and run per size instead of one per group.
    by_size: dict[int, list[str]] = {}
    for g in sorted(logits):
      by_size.setdefault(logits[g].shape[-1], []).append(g)
    out = {}
    for n, names in by_size.items():
      lg = jnp.concatenate([logits[g].reshape(-1, n, n) for g in names])
      s = jax.vmap(sinkhorn)(lg)
      if harden:
        # LAP(log-domain Sinkhorn) == LAP(logits): Sinkhorn only subtracts
        # row and column constants, so the logits are hardened directly.
        hard = jax.nn.one_hot(lap(jax.lax.stop_gradient(lg)), n, dtype=s.dtype)
        s = s + jax.lax.stop_gradient(hard - s)  # forward hard, gradient soft
      start = 0
      for g in names:
        rows = logits[g].size // (n * n)
        out[g] = s[start:start + rows].reshape(logits[g].shape)
        start += rows
    return out

  def objective(logits, batch, lam):
    permuted = soft_apply_permutation(spec, soft(logits, straight_through),
                                      other)
    if loss == 'weights':
      return _weight_loss(weight_mix, resolved, reference, permuted)
    # 'midpoint' and 'random' share one compiled loop: lam ~ U(lam_range),
    # [0.5, 0.5] or [0, 1], is traced.
    return loss_fn(evaluate_lib.lerp_params(reference, permuted, lam), batch)

  num_batches = (jax.tree.leaves(batches)[0].shape[0]
                 if batches is not None else 1)

  def step(carry, i):
    logits, state = carry
    batch = (None if batches is None else
             jax.tree.map(lambda x: x[i % num_batches], batches))
    lam = jax.random.uniform(jax.random.fold_in(key, i), (), jnp.float32,
                             lam_range[0], lam_range[1])
    value, grads = jax.value_and_grad(objective)(logits, batch, lam)
    return optim.optax_step(opt, grads, state, logits), value

  (logits, _), losses = jax.lax.scan(step, (logits, opt.init(logits)),
                                     jnp.arange(steps))
  return logits, soft(logits, False), losses


def sinkhorn_matching(spec: PermutationSpec, reference: Any, other: Any, *,
                      key: jax.Array, loss: str = 'l2',
                      loss_fn: Callable[[Any, Any], jax.Array] | None = None,
                      batches: Any = None, steps: int = 200,
                      learning_rate: float | jax.Array | None = None,
                      tau: float | jax.Array = 1.0, n_iter: int = 20,
                      optimizer: optax.GradientTransformation | None = None,
                      straight_through: bool = False,
                      init_permutations: Mapping[str, Any] | None = None,
                      init_noise: float = 0.1, solver: str = 'auto',
                      return_result: bool = False):
  """Sinkhorn re-basin: learns permutations aligning ``other`` to ``reference``.

  One trainable logit matrix ``L_g`` per group, initialised to ``I + 0.1 *
  randn`` (Sinkhorn re-basin; or the one-hot matrix of ``init_permutations``
  plus the noise: a warm start, e.g. from `weight_matching`). Each step
  projects ``L_g / tau`` onto the doubly-stochastic matrices by ``n_iter``
  log-domain Sinkhorn iterations (`sinkhorn`), applies them to ``other`` along
  every permuted axis (`soft_apply_permutation`), and takes an optax step on
  ``loss``:

  * ``'l2'`` (default, data-free): mean squared distance between
    ``reference`` and the permuted ``other`` over the leaves with a permuted
    axis;
  * ``'cosine'`` (data-free): mean over those leaves of ``1 - cos``;
  * ``'midpoint'``: ``loss_fn(lerp_params(reference, permuted, 0.5), batch)``;
  * ``'random'``: the same at ``lam ~ U(0, 1)``, drawn from ``key`` each step.

  With ``straight_through`` the forward pass uses the LAP-hardened matrices
  and the gradient flows through the soft ones (Git Re-Basin's STE v1), so
  the loss is that of a real permutation. The answer is the LAP of the learned
  logits (`solve_assignment`; equal to the LAP of the soft matrices' logs).

  The loop is one jitted ``lax.scan`` over ``steps``; batches are stacked and
  cycled inside it. ``learning_rate`` and ``tau`` are traced, so new values
  re-use the compiled loop; ``spec``, ``loss``, ``loss_fn``, ``steps``,
  ``n_iter``, ``optimizer`` and ``solver`` are static (a new ``loss_fn`` or
  ``optimizer`` object compiles again: define them once); ``'l2'`` and
  ``'cosine'`` share one compiled loop, as do ``'midpoint'`` and ``'random'``. The stacked batches
  stay in device memory for the whole loop. Call the function itself outside
  ``jit``: it validates concrete inputs and solves the final LAP on the host
  (for the default host solvers).

  Nested (per-head) groups are supported: a child group has one logit matrix
  per slot of its parent (``[H, n, n]``), applied after the heads' soft
  permutation, and is hardened per slot, as `apply_permutation` reads an
  ``[H, n]`` permutation.

  Args:
    spec: the `PermutationSpec` covering both trees.
    reference: model A (a pytree).
    other: model B, same structure and shapes.
    key: PRNG key (logit noise; ``lam`` of the ``'random'`` loss).
    loss: ``'l2' | 'cosine' | 'midpoint' | 'random'``.
    loss_fn: ``loss_fn(params, batch) -> scalar`` (jax-traceable; required by
      the data losses).
    batches: for the data losses: a list of batches with equal shapes, or one
      pytree whose leaves have a leading axis indexing the batches; step ``t``
      uses batch ``t mod num_batches``.
    steps: optimisation steps (>= 1).
    learning_rate: Adam's learning rate (default 0.1, as Sinkhorn re-basin's
      AdamW); not allowed together with ``optimizer``.
    tau: Sinkhorn temperature (> 0); lower is closer to a hard permutation.
    n_iter: Sinkhorn iterations per step.
    optimizer: an optax ``GradientTransformation`` for the logits.
    straight_through: forward with hard permutations (see above). The
      per-step LAP runs with ``solver`` (host solvers via ``pure_callback``).
    init_permutations: warm start ``{group: perm}`` (default identity).
    init_noise: scale of the Gaussian noise added to the initial logits.
    solver: LAP solver for hardening and for the answer (`solve_assignment`).
    return_result: return a `SinkhornMatchingResult` with the final soft
      matrices, logits and per-step losses (``losses[t]`` before step ``t``'s
      update; with ``straight_through``, the loss of the hardened
      permutations) instead of the permutations only.

  Returns:
    ``{group: int32 permutation}`` such that
    ``apply_permutation(spec, perms, other)`` is aligned to ``reference``
    (``[H, n]`` for nested groups), or a `SinkhornMatchingResult`.

  Raises:
    ValueError: for an unknown ``loss``, ``steps < 1``, ``tau <= 0``, trees
      that differ, data losses without ``loss_fn``/``batches`` (or data given
      to a data-free loss), or both ``optimizer`` and ``learning_rate``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> a = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (4, 6)),
    ...                  'bias': jnp.zeros(6)},
    ...      'Dense_1': {'kernel': jax.random.normal(jax.random.key(1), (6, 2)),
    ...                  'bias': jnp.zeros(2)}}
    >>> b = permute.apply_permutation(spec, {'P_0': jnp.array([3, 1, 0, 5, 4, 2])}, a)
    >>> perms = permute.sinkhorn_matching(spec, a, b, key=jax.random.key(0), steps=100)
    >>> perms['P_0']
    Array([2, 1, 5, 0, 4, 3], dtype=int32)
  """
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}.')
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f'steps must be an integer >= 1, got {steps!r}.')
  if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
    raise ValueError(f'n_iter must be an integer >= 1, got {n_iter!r}.')
  if key is None:
    raise ValueError('sinkhorn_matching needs a PRNG key (the logits start '
                     'from noise), e.g. key=jax.random.key(0).')
  tau = _positive(tau, 'tau')
  if not (np.isfinite(init_noise) and init_noise >= 0):
    raise ValueError(f'init_noise must be finite and >= 0, got {init_noise}.')
  if callable(learning_rate):
    raise ValueError('learning_rate must be a number; for a schedule pass '
                     'optimizer=optax.adam(schedule) instead.')
  if optimizer is not None and learning_rate is not None:
    raise ValueError('Give either optimizer or learning_rate, not both: the '
                     "learning rate belongs to the optimizer's own schedule.")
  learning_rate = _positive(0.1 if learning_rate is None else learning_rate,
                            'learning_rate')
  _check_pair(reference, other)
  spec.group_sizes(reference)  # coverage and consistent sizes, naming leaves
  if loss in _DATA_LOSSES:
    if loss_fn is None or batches is None:
      raise ValueError(f'loss={loss!r} is evaluated on data: pass '
                       'loss_fn(params, batch) -> scalar and batches.')
    batches = _stack_batches(batches)
  elif loss_fn is not None or batches is not None:
    raise ValueError(f'loss={loss!r} is data-free and ignores loss_fn/batches; '
                     "use loss='midpoint' or 'random' to train on data.")
  if solver not in solvers_lib.SOLVERS and not callable(solver):
    raise ValueError(f'solver must be one of {solvers_lib.SOLVERS} or a '
                     f'callable, got {solver!r}.')
  init_perms = spec_lib.start_permutations(spec, reference, init_permutations)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  logits, soft, losses = _fit(
      init_perms, f32(reference), f32(other), batches, key, learning_rate, tau,
      jnp.float32(init_noise),
      jnp.asarray([0.0, 1.0] if loss == 'random' else [0.5, 0.5], jnp.float32),
      jnp.asarray([0.0, 1.0] if loss == 'cosine' else [1.0, 0.0], jnp.float32),
      spec=spec, loss='data' if loss in _DATA_LOSSES else 'weights',
      loss_fn=loss_fn,
      steps=int(steps), n_iter=int(n_iter),
      straight_through=bool(straight_through), optimizer=optimizer,
      solver=solver)
  perms = {g: solvers_lib.solve_assignment(lg, solver).astype(jnp.int32)
           for g, lg in logits.items()}
  if return_result:
    return SinkhornMatchingResult(perms, soft, logits, losses)
  return perms


def _positive(value, name):
  arr = jnp.asarray(value, jnp.float32)
  if arr.ndim != 0:
    raise ValueError(f'{name} must be a scalar, got shape {arr.shape}.')
  if not isinstance(arr, jax.core.Tracer):
    v = float(arr)
    if not v > 0 or not np.isfinite(v):
      raise ValueError(f'{name} must be finite and > 0, got {v}.')
  return arr


# --------------------------------------------------------------------------- #
# Straight-through estimator (Git Re-Basin STE v2).
# --------------------------------------------------------------------------- #
def ste_matching(spec: PermutationSpec, reference: Any, other: Any,
                 loss_fn, batches, *, steps: int = 100,
                 learning_rate: float = 1e-2, key: jax.Array | None = None,
                 optimizer=None) -> dict[str, Any]:
  """Learns permutations on the midpoint loss with the straight-through estimator.

  Git Re-Basin's STE (v2): trainable weights ``theta`` start at ``reference``
  and stand for the B endpoint. Each step projects them onto B's permutation
  orbit by weight matching (warm-started from the previous answer),
  ``ste = stop_gradient(perm(B)) + theta - stop_gradient(theta)``, and takes an
  optax step on ``loss_fn(lerp_params(reference, ste, 0.5), batch)``. Returns the
  permutations with the lowest batch loss seen.

  The projection is host weight matching, so steps are dispatched one by one
  (the optax step itself is jitted); `sinkhorn_matching` with
  ``straight_through=True`` is the fully jitted STE v1 variant.

  Args:
    spec: the `PermutationSpec`.
    reference: model A.
    other: model B.
    loss_fn: ``loss_fn(params, batch) -> scalar`` (jax-traceable).
    batches: an iterable of batches (cycled for ``steps`` steps).
    steps: optimisation steps (>= 1).
    learning_rate: SGD (momentum 0.9) learning rate, unless ``optimizer``.
    key: PRNG key for weight matching's group order.
    optimizer: an optax ``GradientTransformation`` (default SGD + momentum).

  Returns:
    ``{group: perm}`` aligning ``other`` to ``reference``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> a = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (4, 6)),
    ...                  'bias': jnp.zeros(6)},
    ...      'Dense_1': {'kernel': jax.random.normal(jax.random.key(1), (6, 2)),
    ...                  'bias': jnp.zeros(2)}}
    >>> b = permute.apply_permutation(spec, {'P_0': jnp.array([3, 1, 0, 5, 4, 2])}, a)
    >>> x = jax.random.normal(jax.random.key(2), (8, 4))
    >>> def loss(p, x):
    ...   h = jax.nn.relu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'][None])
    ...   return jnp.mean((h @ p['Dense_1']['kernel']) ** 2)
    >>> perms = permute.ste_matching(spec, a, b, loss, [x], steps=3)
    >>> perms['P_0'].shape
    (6,)
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f'steps must be an integer >= 1, got {steps!r}.')
  _check_pair(reference, other)
  batches = list(batches)
  if not batches:
    raise ValueError('batches is empty; give at least one batch.')
  opt = optimizer or optax.sgd(learning_rate, momentum=0.9)
  theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), reference)
  state = opt.init(theta)

  @jax.jit
  def step(theta, state, projected, batch):
    def loss(t):
      ste = jax.tree.map(lambda p, t: jax.lax.stop_gradient(p) + t -
                         jax.lax.stop_gradient(t), projected, t)
      # The midpoint; ste first so that it is computed in ste's float32.
      return loss_fn(evaluate_lib.lerp_params(ste, reference, 0.5), batch)
    value, grads = jax.value_and_grad(loss)(theta)
    theta, state = optim.optax_step(opt, grads, state, theta)
    return theta, state, value

  permute_fn = jax.jit(lambda p, x: spec_lib.apply_permutation(spec, p, x))
  perms = None
  best, best_loss = spec_lib.identity_permutations(spec, reference), np.inf
  for i, batch in zip(range(steps), itertools.cycle(batches)):
    sub = None if key is None else jax.random.fold_in(key, i)
    perms = matching_lib.weight_matching(spec, theta, other, key=sub,
                                         init_permutations=perms)
    projected = permute_fn(perms, other)
    theta, state, value = step(theta, state, projected, batch)
    if float(value) < best_loss:
      best, best_loss = perms, float(value)
  return best
