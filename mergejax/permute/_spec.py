"""Permutation specs: which permutation group acts on each axis of each leaf.

A hidden layer of width n can be permuted without changing the network's
function if the producer's output axis and every consumer's input axis move
together. A *permutation group* is the set of ``(leaf path, axis)`` pairs that
must move together. A `PermutationSpec` maps every leaf path to a tuple with
one group name (or None) per axis, as Git Re-Basin's ``axes_to_perm``.

*Nested groups* express per-head permutations in attention: a child group
(e.g. the within-head query/key dimension) has one permutation *per slot of its
parent group* (the heads), so its permutation array has shape ``[H, d_head]``.
Row ``i`` permutes the inner axis of the head that lands in slot ``i``.

Convention (Git Re-Basin's): ``perms[g][i]`` is the unit of model B matched to
unit ``i`` of model A, and ``jnp.take(w_b, perms[g], axis)`` aligns B to A.

Spec keys are parameter paths relative to a variable collection, e.g.
``'Dense_0/kernel'``; a leaf at ``'params/Dense_0/kernel'`` or
``'batch_stats/BatchNorm_0/mean'`` is looked up under its full path first and
then with the leading collection name dropped, so one spec serves a ``params``
tree and a full Flax ``variables`` dict alike.
"""

from __future__ import annotations

import functools

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths

Axes = tuple[str | None, ...]
Permutations = dict[str, jax.Array]


class PermutationSpec:
  """Permutation groups per axis of each parameter leaf.

  Args:
    axes: ``{path: (group or None, ...)}`` with one entry per axis of the leaf.
      Leaves without permuted axes must still be listed (all None), so that a
      spec which misses a leaf is an error rather than a silent no-op.
    nested: ``{child_group: parent_group}`` for per-slot groups (attention
      heads): every leaf with the child axis must also carry the parent axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.PermutationSpec({'l0/kernel': (None, 'h'), 'l0/bias': ('h',),
    ...                                 'l1/kernel': ('h', None)})
    >>> spec.groups['h']
    (('l0/bias', 0), ('l0/kernel', 1), ('l1/kernel', 0))
  """

  def __init__(self, axes: Mapping[str, Axes],
               nested: Mapping[str, str] | None = None):
    self._axes = tuple(sorted((str(k), tuple(v)) for k, v in axes.items()))
    self._nested = tuple(sorted((nested or {}).items()))
    groups: dict[str, list[tuple[str, int]]] = {}
    for path, ax in self._axes:
      for i, g in enumerate(ax):
        if g is None:
          continue
        if not isinstance(g, str):
          raise ValueError(f'Spec entry {path!r} axis {i}: group names must be '
                           f'strings or None, got {g!r}.')
        if any(p == path for p, _ in groups.get(g, ())):
          raise ValueError(
              f'Spec entry {path!r} uses group {g!r} on two axes {ax}; a group '
              'may act on at most one axis of a leaf.')
        groups.setdefault(g, []).append((path, i))
    self._groups = {g: tuple(v) for g, v in sorted(groups.items())}
    for child, parent in self._nested:
      if child not in self._groups or parent not in self._groups:
        raise ValueError(f'nested {child!r} -> {parent!r}: both groups must '
                         f'appear in the spec; groups are {sorted(self._groups)}.')
      for path, _ in self._groups[child]:
        if parent not in self.axes[path]:
          raise ValueError(
              f'Leaf {path!r} carries the per-{parent} group {child!r} but not '
              f'{parent!r} itself: {self.axes[path]}.')

  # --- accessors -------------------------------------------------------------
  @property
  def axes(self) -> dict[str, Axes]:
    """``{path: axes}``, the hand-written part (``axes_to_perm``)."""
    return dict(self._axes)

  @property
  def groups(self) -> dict[str, tuple[tuple[str, int], ...]]:
    """``{group: ((path, axis), ...)}`` (``perm_to_axes``), derived."""
    return dict(self._groups)

  @property
  def nested(self) -> dict[str, str]:
    """``{child_group: parent_group}`` for per-slot (per-head) groups."""
    return dict(self._nested)

  def children(self, group: str) -> tuple[str, ...]:
    return tuple(c for c, p in self._nested if p == group)

  def __eq__(self, other):
    return (isinstance(other, PermutationSpec) and self._axes == other._axes
            and self._nested == other._nested)

  def __hash__(self):
    return hash((self._axes, self._nested))

  def __repr__(self):
    lines = [f'  {p!r}: {a},' for p, a in self._axes]
    nested = f', nested={dict(self._nested)}' if self._nested else ''
    return 'PermutationSpec({\n' + '\n'.join(lines) + '\n}' + nested + ')'

  # --- resolution against a tree --------------------------------------------
  def lookup(self, path: str) -> Axes | None:
    """Axes of the leaf at ``path`` (full path, or without its collection)."""
    axes = dict(self._axes)
    if path in axes:
      return axes[path]
    head, _, rest = path.partition('/')
    if rest and rest in axes:
      return axes[rest]
    return None

  def resolve(self, tree: Any) -> dict[str, Axes]:
    """``{leaf path of tree: axes}``, checking that spec and tree match.

    A spec that does not describe ``tree`` exactly would permute units that
    nothing undoes (for example a spec for a deeper MLP permutes the output
    logits of a shallower one), silently changing the model's function; so
    every mismatch is an error.

    Raises:
      ValueError: if a leaf of ``tree`` has no entry; an entry names a layer
        that ``tree`` does not have; an entry's length differs from the
        leaf's rank; or a group acts on one layer only, so that its
        permutation is never undone (it would permute that layer's outputs,
        e.g. the logits, which must stay fixed).
    """
    flat = paths.flatten_to_dict(tree)
    self._check_layers(flat)
    out = {}
    missing = []
    for path, x in flat.items():
      ax = self.lookup(path)
      if ax is None:
        missing.append(f'{path} {tuple(np.shape(x))}')
        continue
      if len(ax) != np.ndim(x):
        raise ValueError(
            f'Spec entry for {path!r} has {len(ax)} axes {ax} but the leaf has '
            f'shape {tuple(np.shape(x))}; give one group name or None per axis.')
      out[path] = ax
    if missing:
      raise ValueError(
          f'The permutation spec does not cover {len(missing)} leaf/leaves: '
          f'{missing[:8]}. Add them to the spec (all-None axes for leaves that '
          'are not permuted), e.g. {"' + missing[0].split(' ')[0] +
          '": (None,) * ndim}.')
    self._check_groups_closed(out)
    return out

  def _check_layers(self, flat: Mapping[str, Any]) -> None:
    """Spec entries must name layers of the tree (up to the collection).

    A layer is a leaf's path without its last part. An entry whose layer
    exists but whose leaf does not (BatchNorm statistics given with the
    ``params`` collection alone) is fine: there is nothing to permute.
    """
    layers = set()
    for path in flat:
      layers.add(path.rpartition('/')[0])
      if '/' in path:  # and without the collection name
        layers.add(path.partition('/')[2].rpartition('/')[0])
    extra = sorted(p for p, _ in self._axes
                   if p.rpartition('/')[0] not in layers)
    if extra:
      have = sorted({p.rpartition('/')[0] for p in flat})
      raise ValueError(
          f'The permutation spec names {len(extra)} leaf/leaves of layers the '
          f'parameters do not have: {extra[:8]}; the parameters have layers '
          f'{have[:12]}. A spec for another architecture (e.g. mlp_spec with '
          'the wrong number of hidden layers) would permute units that '
          'nothing undoes; build the spec for this model.')

  def _check_groups_closed(self, resolved: Mapping[str, Axes]) -> None:
    """Every group must act on at least two layers of the tree.

    A group whose axes all lie in one layer permutes that layer's units with
    no other layer undoing it, so the model's outputs change. A leaf at the
    top of the tree (no parent) counts as a layer of its own.
    """
    group_layers: dict[str, set[str]] = {}
    for path, ax in resolved.items():
      layer = path.rpartition('/')[0] or path
      for g in ax:
        if g is not None:
          group_layers.setdefault(g, set()).add(layer)
    open_groups = {g: sorted(ls) for g, ls in sorted(group_layers.items())
                   if len(ls) < 2}
    if open_groups:
      raise ValueError(
          f'Permutation group(s) {open_groups} act on one layer only: nothing '
          'undoes the permutation, so the model would compute a different '
          'function (e.g. permuted output units). Output axes must be None in '
          'the spec; check that the spec matches the model.')

  def group_sizes(self, tree: Any) -> dict[str, int]:
    """Size of every group in ``tree`` (inner size for nested groups).

    Raises:
      ValueError: if axes of one group have different sizes, naming the leaves.
    """
    resolved = self.resolve(tree)
    flat = paths.flatten_to_dict(tree)
    sizes: dict[str, tuple[int, str, int]] = {}
    for path, ax in resolved.items():
      shape = np.shape(flat[path])
      for i, g in enumerate(ax):
        if g is None:
          continue
        if g in sizes and sizes[g][0] != shape[i]:
          n, p0, i0 = sizes[g]
          raise ValueError(
              f'Permutation group {g!r} has inconsistent axis sizes: {p0!r} '
              f'axis {i0} has size {n} but {path!r} axis {i} has size '
              f'{shape[i]} (shape {tuple(shape)}). Axes of one group must have '
              'equal sizes; use separate groups or fix the spec.')
        sizes.setdefault(g, (shape[i], path, i))
    return {g: v[0] for g, v in sizes.items()}

  def perm_shapes(self, tree: Any) -> dict[str, tuple[int, ...]]:
    """Shape of each group's permutation array (``[H, n]`` for nested ones)."""
    sizes = self.group_sizes(tree)
    nested = self.nested
    return {g: ((sizes[nested[g]], n) if g in nested else (n,))
            for g, n in sizes.items()}


def identity_permutations(spec: PermutationSpec, tree: Any) -> Permutations:
  """Identity permutations for every group of ``spec`` present in ``tree``."""
  return {g: jnp.broadcast_to(jnp.arange(s[-1], dtype=jnp.int32), s)
          for g, s in spec.perm_shapes(tree).items()}


def start_permutations(spec: PermutationSpec, tree: Any,
                       init_permutations: Mapping[str, Any] | None) -> Permutations:
  """Identity permutations, replaced by ``init_permutations`` where given (checked)."""
  perms = identity_permutations(spec, tree)
  if init_permutations is not None:
    check_permutations(spec, init_permutations, tree)
    perms.update({g: jnp.asarray(p, jnp.int32) for g, p in init_permutations.items()})
  return perms


def random_permutations(spec: PermutationSpec, tree: Any,
                        key: jax.Array) -> Permutations:
  """Uniformly random permutations for every group (per slot if nested).

  Drawn on the host from the key's bits (NumPy), so that no per-size
  computation is compiled.
  """
  shapes = spec.perm_shapes(tree)
  data = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
  rng = np.random.default_rng([int(x) for x in data])
  out = {}
  for g, s in sorted(shapes.items()):
    rows = int(np.prod(s[:-1], dtype=int))
    p = np.stack([rng.permutation(s[-1]) for _ in range(rows)]).reshape(s)
    out[g] = jnp.asarray(p, jnp.int32)
  return out


def check_permutations(spec: PermutationSpec, perms: Mapping[str, Any],
                       tree: Any) -> None:
  """Checks names and shapes of ``perms`` against ``spec`` on ``tree``.

  Concrete permutations must also be integer arrays holding every unit index
  exactly once (traced ones, inside ``jit``, are checked for shape only).

  Raises:
    ValueError: for unknown group names, arrays of the wrong length or dtype,
      or indices out of range or repeated.
  """
  shapes = spec.perm_shapes(tree)
  unknown = sorted(set(perms) - set(shapes))
  if unknown:
    raise ValueError(f'Permutations for unknown group(s) {unknown}; the spec has '
                     f'groups {sorted(shapes)}.')
  for g, p in perms.items():
    if tuple(np.shape(p)) != shapes[g]:
      where = spec.groups[g][0]
      raise ValueError(
          f'Permutation for group {g!r} has shape {tuple(np.shape(p))} but the '
          f'group has size {shapes[g]} (e.g. {where[0]!r} axis {where[1]}); a '
          'permutation must list every unit of its group exactly once.')
    if isinstance(p, jax.core.Tracer):
      continue
    arr = np.asarray(p)
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f'Permutation for group {g!r} has dtype {arr.dtype}; '
                       'permutations are integer index arrays (e.g. the '
                       'output of weight_matching).')
    n = arr.shape[-1]
    rows = arr.reshape(-1, n)
    bad = ~np.all(np.sort(rows, axis=-1) == np.arange(n), axis=-1)
    if np.any(bad):
      row = rows[int(np.argmax(bad))]
      out = sorted(set(row[(row < 0) | (row >= n)].tolist()))
      dup = sorted({int(v) for v in row if np.sum(row == v) > 1})
      raise ValueError(
          f'Permutation for group {g!r} is not a permutation of 0..{n - 1}: '
          f'out-of-range indices {out[:5]}, repeated indices {dup[:5]}. Each '
          'unit must appear exactly once.')


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Any],
                      params: Any) -> Any:
  """Permutes ``params``: ``take(leaf, perms[g], axis)`` for every group axis.

  Groups missing from ``perms`` are left alone (identity). Works under ``jit``
  and ``vmap`` (shapes are checked from the traced shapes).

  Args:
    spec: the `PermutationSpec`.
    perms: ``{group: int array}``; ``[n]``, or ``[H, n]`` for nested groups.
    params: the tree to permute (model B), e.g. ``params`` or ``variables``.

  Returns:
    The permuted tree. With ``perms = weight_matching(spec, a, b)`` it is
    aligned to ``a``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> p = {'Dense_0': {'kernel': jnp.eye(2, 3), 'bias': jnp.arange(3.)},
    ...      'Dense_1': {'kernel': jnp.ones((3, 1)), 'bias': jnp.zeros(1)}}
    >>> permute.apply_permutation(spec, {'P_0': jnp.array([2, 0, 1])}, p)['Dense_0']['bias']
    Array([2., 0., 1.], dtype=float32)
  """
  resolved = spec.resolve(params)
  check_permutations(spec, perms, params)
  nested = spec.nested

  def permute_leaf(path, x):
    return permute_axes(x, resolved[path], nested, set(perms), functools.partial(
        take_group, jnp, perms=perms))

  return paths.tree_map_with_path(permute_leaf, params)


def permute_axes(x, ax, nested, groups, permute_one):
  """``permute_one(x, g, axis, slot_axis)`` for every axis of ``x`` in ``groups``.

  ``ax`` is the leaf's group per axis; ``slot_axis`` is the axis of a nested
  group's parent (None for plain groups). Parents (heads) go before children
  (within-head dims): a child's rows are indexed by the slot a head lands in.
  One loop for hard (`apply_permutation`), soft (`soft_apply_permutation`)
  and host-side (weight matching's cost terms) permutations.
  """
  for i in sorted(range(len(ax)), key=lambda i: ax[i] in nested):
    g = ax[i]
    if g is not None and g in groups:
      x = permute_one(x, g, i, ax.index(nested[g]) if g in nested else None)
  return x


def take_group(xp, x, g, axis, slot_axis, *, perms):
  """``take`` along ``axis`` by ``perms[g]``; per slot for a nested group (xp: np or jnp)."""
  p = xp.asarray(perms[g])
  if slot_axis is None:
    return xp.take(x, p, axis=axis)
  shape = [1] * x.ndim
  shape[slot_axis], shape[axis] = p.shape
  idx = xp.broadcast_to(p.reshape(shape), x.shape)
  return xp.take_along_axis(x, idx, axis=axis)


def compose(first: Mapping[str, Any], second: Mapping[str, Any],
            spec: PermutationSpec | None = None) -> Permutations:
  """Permutations equal to applying ``first`` and then ``second``.

  ``apply(second, apply(first, x)) == apply(compose(first, second), x)``.
  """
  nested = spec.nested if spec is not None else {}
  out = dict(first)
  for g, q in second.items():
    if g not in first:
      out[g] = q
      continue
    p = jnp.asarray(first[g])
    q = jnp.asarray(q)
    if g in nested:
      raise NotImplementedError('compose: nested groups are not supported.')
    out[g] = jnp.take(p, q, axis=-1)
  return out


def inverse(perms: Mapping[str, Any]) -> Permutations:
  """The inverse permutations (per slot for nested groups is not supported)."""
  return {g: jnp.argsort(jnp.asarray(p), axis=-1).astype(jnp.int32)
          for g, p in perms.items()}


def check_spec(spec: PermutationSpec, apply_fn, variables: Any, *inputs: Any,
               key: jax.Array, rtol: float = 1e-4, atol: float = 1e-4,
               trials: int = 1) -> Permutations:
  """Asserts that random permutations of every group leave outputs unchanged.

  Args:
    spec: the spec to check.
    apply_fn: ``apply_fn(variables, *inputs) -> outputs`` (e.g. ``model.apply``).
    variables: the model's variables (or params), covered by ``spec``.
    *inputs: example inputs.
    key: PRNG key for the random permutations.
    rtol: relative tolerance.
    atol: absolute tolerance (relative to the output scale).
    trials: number of random draws.

  Returns:
    The last permutations drawn.

  Raises:
    AssertionError: naming the largest output difference if the permuted
      model computes something else (the spec misses a symmetry constraint).
  """
  apply_fn = jax.jit(apply_fn)
  permute_fn = jax.jit(lambda p, v: apply_permutation(spec, p, v))
  ref = apply_fn(variables, *inputs)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref)) or 1.0
  perms = {}
  for k in jax.random.split(key, trials):
    perms = random_permutations(spec, variables, k)
    out = apply_fn(permute_fn(perms, variables), *inputs)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      err = float(jnp.max(jnp.abs(a - b)))
      if not err <= atol * scale + rtol * float(jnp.max(jnp.abs(a))):
        raise AssertionError(
            f'Permuting by the spec changed the outputs (max |diff| {err:.3g}, '
            f'output scale {scale:.3g}); some group in {sorted(perms)} does not '
            'leave the function invariant.')
  return perms
