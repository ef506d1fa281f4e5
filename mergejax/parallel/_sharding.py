"""Sharded merges: a device mesh and regex sharding rules over parameter paths.

A sharded merge lays the stack of K models out over a mesh with two axes:

* ``models``: the leading model axis of the stack (each device holds some of
  the K models; the reducing step becomes a cross-device sum), and
* ``fsdp``: one axis of every parameter, chosen per leaf by regex rules over
  its path, big_vision style (first match wins)::

    rules = [(r'.*embed.*', P(None, 'fsdp')),   # shard the hidden dim
             (r'.*norm.*', 'replicate'),
             (r'.*', 'fsdp')]                    # the largest divisible axis

The whole merge runs as one ``jax.jit`` with ``in_shardings`` and
``out_shardings`` built from the rules, on a mesh with *Auto* axis types, so
steps that need a whole axis are correct without special cases: XLA's SPMD
partitioner all-reduces the scatter-add histograms of the radix top-k select
(histograms add across shards, which makes the distributed threshold exact),
all-gathers what an SVD or a sort needs, and turns the reduction over the
model axis into an all-reduce. Random steps draw the same numbers whatever the
sharding (JAX's partitionable threefry), so a sharded merge equals the
unsharded one.

Inputs are host arrays (NumPy, memory-mapped or lazily read tensors, or
single-process ``jax.Array``s): every device's block of the stacked global
array is read with `jax.make_array_from_callback`, so each process only reads
the slices its own devices hold. That is what makes the same call work across
hosts after `mergejax.parallel.initialize`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax._src import base as base_lib
from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax._src import paths

MODEL_AXIS = 'models'
FSDP_AXIS = 'fsdp'

# A rule's value: a PartitionSpec over the *parameter's* axes (the model axis
# is added in front by `sharded_merge`), one of the strategy names below, or a
# function ``(shape, mesh) -> PartitionSpec``.
RuleValue = P | str | None | Callable[[tuple[int, ...], Mesh], P]
Rules = Sequence[tuple[str, RuleValue]]

#: Shard every parameter's largest divisible axis over ``fsdp``.
DEFAULT_RULES: Rules = ((r'.*', 'fsdp'),)

_FSDP_RE = re.compile(r'^fsdp(?:_largest)?(?:\((?:axis=)?["\']?(\w+)["\']?\))?$')


def make_mesh(shape: Sequence[int] | None = None,
              axis_names: Sequence[str] = (MODEL_AXIS, FSDP_AXIS),
              *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with *Auto* axis types over all (or the given) devices.

  Args:
    shape: the mesh shape, e.g. ``(4, 2)``; None puts every device on the last
      axis (``(1, n)`` for the default names: pure fsdp).
    axis_names: the axis names; ``models`` and ``fsdp`` by default.
    devices: the devices to use (default: all of ``jax.devices()``).

  Returns:
    A `jax.sharding.Mesh`.

  Example:
    >>> import mergejax as mj
    >>> mesh = mj.parallel.make_mesh((1, 1), devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'models': 1, 'fsdp': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(axis_names)
  if shape is None:
    shape = (1,) * (len(names) - 1) + (len(devices),)
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(names):
    raise ValueError(f'make_mesh: shape {shape} and axis names {names} differ '
                     'in length.')
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'make_mesh: a {shape} mesh needs {int(np.prod(shape))} '
                     f'devices, {len(devices)} given.')
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def _auto(mesh: Mesh) -> Mesh:
  """The same mesh with Auto axis types (see module docstring for why)."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = FSDP_AXIS) -> P:
  """Shards the largest axis of ``shape`` divisible by the ``axis`` size.

  Ties go to the later axis (for ``(out, in)`` or ``(in, out)`` matrices of
  equal sizes either is fine; later axes keep rows contiguous). A leaf with no
  divisible axis, or a mesh without ``axis``, is replicated.

  Example:
    >>> mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    >>> fsdp_spec((6, 4), mesh)
    P('fsdp', None)
  """
  if axis not in mesh.shape:
    return P()
  n = mesh.shape[axis]
  best = None
  for i, d in enumerate(shape):
    if d % n == 0 and d >= n and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = axis
  return P(*spec)


def _resolve(path: str, shape: tuple[int, ...], value: RuleValue,
             mesh: Mesh) -> P:
  if value is None:
    return P()
  if isinstance(value, str):
    if value in ('replicate', 'replicated'):
      return P()
    m = _FSDP_RE.match(value)
    if m is None:
      raise ValueError(
          f'Sharding rule value {value!r} for parameter {path!r} is not known: '
          "use a PartitionSpec, 'fsdp' (largest divisible axis), "
          "'fsdp(axis=\"data\")', 'replicate', None or a function "
          '(shape, mesh) -> PartitionSpec.')
    return fsdp_spec(shape, mesh, m.group(1) or FSDP_AXIS)
  spec = value(shape, mesh) if callable(value) else value
  if not isinstance(spec, P):
    raise ValueError(f'Sharding rule for parameter {path!r} gave {spec!r}, not '
                     'a PartitionSpec.')
  if len(spec) > len(shape):
    raise ValueError(
        f'Sharding rule for parameter {path!r} gives {spec} ({len(spec)} axes) '
        f'but the parameter has shape {shape}. Use a rule with at most '
        f'{len(shape)} entries, or narrow the regex.')
  for dim, axes in zip(shape, spec):
    for a in ((axes,) if isinstance(axes, str) else (axes or ())):
      if a not in mesh.shape:
        raise ValueError(
            f'Sharding rule for parameter {path!r} names mesh axis {a!r}; the '
            f'mesh has axes {tuple(mesh.axis_names)}.')
    if dim % _axis_size(mesh, axes):
      raise ValueError(
          f'Sharding rule for parameter {path!r} (shape {shape}) puts an axis '
          f'of size {dim} on mesh axes {axes!r} of size '
          f'{_axis_size(mesh, axes)}, which does not divide it. Use '
          "'fsdp' (picks a divisible axis) or replicate this parameter.")
  return spec


def param_specs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """The `PartitionSpec` of every leaf of ``tree`` (one model) under ``rules``.

  Args:
    tree: a pytree of arrays or anything with a ``.shape``.
    mesh: the mesh the specs refer to.
    rules: ``[(regex, value), ...]``, first match wins (``re.search`` on the
      '/'-joined path). A value is a `PartitionSpec` over the parameter's own
      axes, ``'fsdp'`` / ``'fsdp_largest'`` (largest axis divisible by the
      ``fsdp`` mesh axis), ``'fsdp(axis="data")'``, ``'replicate'`` / None, or
      a function ``(shape, mesh) -> PartitionSpec``.

  Returns:
    A pytree of `PartitionSpec` with ``tree``'s structure.

  Example:
    >>> import numpy as np
    >>> mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    >>> tree = {'embed': np.zeros((10, 4)), 'norm': np.zeros(4)}
    >>> param_specs(tree, mesh, [('embed', P(None, 'fsdp')), ('.*', 'fsdp')])
    {'embed': P(None, 'fsdp'), 'norm': P('fsdp',)}
  """
  rules = tuple(rules)
  return paths.tree_map_with_path(
      lambda p, x: _resolve(p, tuple(x.shape),
                            paths.match_rules(rules, p, what='sharding rule'),
                            mesh), tree)


def stacked_spec(spec: P, num_models: int, mesh: Mesh,
                 model_axis: str = MODEL_AXIS) -> P:
  """A parameter's spec with the model axis in front.

  The model axis goes on the ``models`` mesh axis when that axis exists and
  divides ``num_models``; otherwise the stack is replicated along it (each
  device along ``models`` then holds every model's shard of the leaf).
  """
  if model_axis in mesh.shape and num_models % mesh.shape[model_axis] == 0:
    used = {a for axes in spec for a in
            ((axes,) if isinstance(axes, str) else (axes or ()))}
    if model_axis not in used:
      return P(model_axis, *spec)
  return P(None, *spec)


def _host_block(x: Any, index: tuple[slice, ...]) -> np.ndarray:
  return np.asarray(x[index] if index else x[()])


def put_sharded(tree: Any, mesh: Mesh, specs: Any) -> Any:
  """Places host arrays on ``mesh``; each device reads only its own block.

  Example:
    >>> import numpy as np
    >>> mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    >>> x = put_sharded({'w': np.ones((2, 2))}, mesh, {'w': P('fsdp')})
    >>> x['w'].sharding.spec
    P('fsdp',)
  """
  def put(x, spec):
    return jax.make_array_from_callback(
        tuple(x.shape), NamedSharding(mesh, spec),
        lambda idx: _host_block(x, idx))

  return jax.tree.map(put, tree, specs,
                      is_leaf=lambda s: isinstance(s, P))


def stack_sharded(models: Sequence[Any], mesh: Mesh, specs: Any) -> Any:
  """Stacks K models into global ``[K, ...]`` arrays laid out by ``specs``.

  ``specs`` are the stacked specs (model axis first). Each device's block is
  read from the models that fall in it, in the models' own dtype (the cast to
  float32 happens inside the compiled merge, so transfers stay narrow).
  """
  k = len(models)

  def put(spec, *xs):
    shape = (k,) + tuple(xs[0].shape)

    def block(index):
      kslice, rest = index[0], tuple(index[1:])
      return np.stack([_host_block(xs[i], rest) for i in range(k)[kslice]])

    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), block)

  return jax.tree.map(put, specs, *models, is_leaf=lambda s: isinstance(s, P))


def _replicate(tree: Any, mesh: Mesh) -> Any:
  rep = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), rep, lambda idx: np.asarray(x)[idx]), tree)


_JITS: dict[Any, Any] = {}


def _compiled(update, stacked_specs, base_specs, state_treedef, out_treedef,
              out_leaf_specs, out_dtypes, mesh, key_impl):
  """The jitted merge for one (update, layout, dtypes) combination.

  Cached so that a second merge with new numeric hyperparameters (which live in
  the state) re-uses the compiled executable, like `mergejax.merge`'s ``_run``.
  """
  cache_key = (update, stacked_specs, base_specs, state_treedef, out_treedef,
               out_leaf_specs, out_dtypes, mesh, key_impl)
  if cache_key in _JITS:
    return _JITS[cache_key]
  ns = lambda spec: NamedSharding(mesh, spec)  # pylint: disable=unnecessary-lambda-assignment
  rep = ns(P())
  in_shardings = (
      stacked_specs.map(ns),
      jax.tree.unflatten(state_treedef, [rep] * state_treedef.num_leaves),
      None if base_specs is None else base_specs.map(ns),
      None if key_impl is None else rep,
  )
  out_shardings = (
      jax.tree.unflatten(out_treedef, [ns(s) for s in out_leaf_specs]),
      None,  # the state: left to XLA (diagnostics are small or follow leaves)
  )

  def step(stacked, state, base, key):
    ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                       stacked)
    stacked = jax.tree.map(lambda x: x.astype(merge_lib.ACCUM_DTYPE), stacked)
    base32 = None if base is None else jax.tree.map(
        lambda x: x.astype(merge_lib.ACCUM_DTYPE), base)
    if key is not None and key_impl != 'raw':
      key = jax.random.wrap_key_data(key, impl=key_impl)
    out, state = update(stacked, state, base32, key=key)
    merge_lib._check_reduced(out, ref)  # pylint: disable=protected-access
    leaves = jax.tree.leaves(out)
    out = jax.tree.unflatten(
        jax.tree.structure(out),
        [o.astype(d) for o, d in zip(leaves, out_dtypes)])
    return out, state

  fn = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings)
  _JITS[cache_key] = fn
  return fn


def _cache_size() -> int:
  """Number of compiled sharded merges (for no-recompile tests)."""
  return sum(fn._cache_size() for fn in _JITS.values())  # pylint: disable=protected-access


def sharded_merge(transformation: base_lib.MergeTransformation,
                  base: Any,
                  models: Sequence[Any],
                  key: jax.Array | None = None,
                  *,
                  mesh: Mesh,
                  rules: Rules = DEFAULT_RULES,
                  model_axis: str = MODEL_AXIS,
                  check_finite: bool = True,
                  return_state: bool = False) -> Any:
  """`mergejax.merge` on a device mesh, laid out by regex sharding rules.

  Same semantics as `mergejax.merge` (float32 arithmetic, the base's dtypes
  out, one compile per tree structure and static configuration: numeric
  hyperparameters re-use the compiled function), but the models are stacked
  straight into global arrays sharded as ``P(model_axis, *spec)``, where
  ``spec`` is the leaf's rule, and the compiled merge has ``in_shardings`` and
  ``out_shardings``. The merged leaves come back as global ``jax.Array``s
  sharded by ``spec``. Across hosts (after `mergejax.parallel.initialize`)
  every process calls this with the same arguments; each reads only the blocks
  of the inputs its devices hold, so the inputs may be lazy (memory-mapped
  NumPy arrays, safetensors slices: anything with ``.shape``, ``.dtype`` and
  NumPy slicing).

  Args:
    transformation: the merge, e.g. ``mergejax.methods.ties(density=0.3)``.
    base: the pre-trained parameters (host arrays), or None for methods
      without a base.
    models: the K fine-tuned models, each with ``base``'s structure, shapes and
      dtypes.
    key: a PRNG key for random methods; results do not depend on the mesh.
    mesh: the device mesh; an axis named ``model_axis`` (if any) carries the
      model axis when it divides K. Explicit axis types are run as Auto.
    rules: ``[(regex, value), ...]`` sharding rules over parameter paths, see
      `param_specs`.
    model_axis: the mesh axis for the model axis.
    check_finite: scan inputs for NaN/Inf (on the devices, one pass).
    return_state: also return the transformation's final state.

  Returns:
    The merged parameters (global sharded arrays with ``base``'s structure and
    dtypes), and the state if ``return_state``.

  Example:
    >>> import numpy as np, mergejax as mj
    >>> mesh = mj.parallel.make_mesh((1, 1), devices=jax.devices()[:1])
    >>> base = {'w': np.zeros(4, np.float32)}
    >>> fts = [{'w': np.arange(4, dtype=np.float32)}, {'w': np.ones(4, np.float32)}]
    >>> out = mj.parallel.sharded_merge(mj.methods.task_arithmetic(lambda_=0.5), base, fts,
    ...                        mesh=mesh)
    >>> out['w']
    Array([0.5, 1. , 1.5, 2. ], dtype=float32)
  """
  fn, args = prepare_sharded_merge(
      transformation, base, models, key, mesh=mesh, rules=rules,
      model_axis=model_axis, check_finite=check_finite)
  out, state = fn(*args)
  return (out, state) if return_state else out


def prepare_sharded_merge(transformation: base_lib.MergeTransformation,
                          base: Any, models: Sequence[Any],
                          key: jax.Array | None = None, *, mesh: Mesh,
                          rules: Rules = DEFAULT_RULES,
                          model_axis: str = MODEL_AXIS,
                          check_finite: bool = True):
  """Places the inputs and returns ``(compiled_fn, args)``; see `sharded_merge`.

  ``compiled_fn(*args)`` returns ``(merged, state)``. Useful to time the merge
  step alone, or to re-run it on the same placed inputs.
  """
  models = checks.cast_models(base, models)
  checks.check_models(base, models, check_finite=False, base_required=False)
  mesh = _auto(mesh)
  ref = base if base is not None else models[0]
  specs = param_specs(ref, mesh, rules)
  is_spec = lambda s: isinstance(s, P)  # pylint: disable=unnecessary-lambda-assignment
  k = len(models)
  sspecs = jax.tree.map(lambda s: stacked_spec(s, k, mesh, model_axis), specs,
                        is_leaf=is_spec)
  stacked = stack_sharded(models, mesh, sspecs)
  base_arr = None if base is None else put_sharded(base, mesh, specs)
  if check_finite:
    _check_finite(stacked, base_arr, mesh)

  state = _replicate(transformation.init(ref), mesh)
  key_impl, key_data = None, None
  if key is not None:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key_impl, key_data = str(jax.random.key_impl(key)), jax.random.key_data(key)
    else:
      key_impl, key_data = 'raw', key
    key_data = _replicate(key_data, mesh)

  fn = _compiled(
      transformation.update, _Frozen(sspecs),
      None if base is None else _Frozen(specs), jax.tree.structure(state),
      jax.tree.structure(ref), tuple(jax.tree.leaves(specs, is_leaf=is_spec)),
      tuple(jnp.dtype(x.dtype) for x in jax.tree.leaves(ref)), mesh,
      _impl_name(key_impl))
  return fn, (stacked, state, base_arr, key_data)


def _impl_name(impl: str | None) -> str | None:
  if impl is None or impl == 'raw':
    return impl
  # `str(key_impl)` is e.g. "PRNGImpl(threefry2x32)" or "threefry2x32".
  m = re.search(r'(\w+)\)?$', impl)
  return m.group(1) if m else impl


class _Frozen:
  """A hashable pytree of PartitionSpecs (treedef + leaves), for the jit cache."""

  def __init__(self, tree):
    self.treedef = jax.tree.structure(tree, is_leaf=lambda s: isinstance(s, P))
    self.leaves = tuple(jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, P)))

  def __hash__(self):
    return hash((self.treedef, self.leaves))

  def __eq__(self, other):
    return (isinstance(other, _Frozen) and self.treedef == other.treedef and
            self.leaves == other.leaves)

  def map(self, fn):
    return jax.tree.unflatten(self.treedef, [fn(s) for s in self.leaves])


def _nonfinite_counts(stacked, base):
  # Per model for the stack, so the error can name models[i].
  per_model = lambda x: jnp.sum(  # pylint: disable=unnecessary-lambda-assignment
      ~jnp.isfinite(x).reshape(x.shape[0], -1), axis=1, dtype=jnp.int32)
  total = lambda x: jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  return jax.tree.map(per_model, stacked), jax.tree.map(total, base)


@functools.cache
def _nonfinite_fn(mesh: Mesh):
  # Replicated outputs, so every process can read them after a multi-host run.
  return jax.jit(_nonfinite_counts, out_shardings=NamedSharding(mesh, P()))


def _check_finite(stacked: Any, base: Any, mesh: Mesh) -> None:
  """Counts NaN/Inf per leaf on the devices and names the first bad leaf."""
  per_model, total = _nonfinite_fn(mesh)(stacked, base)
  named = [('base', None, total)] if base is not None else []
  named.append(('models', stacked, per_model))
  for which, tree, counts in named:
    shapes = paths.flatten_to_dict(base if tree is None else tree)
    for p, c in paths.flatten_to_dict(counts).items():
      c = np.asarray(jax.device_get(c))
      if not c.any():
        continue
      x = shapes[p]
      if which == 'base':
        name, shape = 'base', tuple(x.shape)
      else:
        i = int(np.flatnonzero(c)[0])
        name, shape, c = f'models[{i}]', tuple(x.shape[1:]), c[i]
      raise ValueError(
          f'{name} leaf {p!r} (shape {shape}, {x.dtype}) contains '
          f'{int(c)} NaN/Inf value(s). Fix or drop that checkpoint, or pass '
          'check_finite=False to merge anyway.')
