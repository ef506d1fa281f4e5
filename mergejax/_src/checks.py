"""Input validation with messages that name the leaf, the values and the fix."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths


def is_concrete(x: Any) -> bool:
  """True if ``x`` holds a value now (not a tracer inside jit/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def hparam(value: Any, name: str, *, low: float | None = None,
           high: float | None = None, low_inclusive: bool = True,
           high_inclusive: bool = True) -> jax.Array:
  """Converts a numeric hyperparameter to a float32 array, checking its range.

  Concrete values that are empty, NaN, infinite or outside the range raise at
  once. Traced values (inside ``jax.vmap``/``jit`` sweeps) are checked when the
  computation runs: a value out of range stops it with an error naming the
  hyperparameter (raised as a ``JaxRuntimeError`` carrying this message), so a
  sweep never returns a silently wrong merge.

  Args:
    value: a scalar, a per-model sequence, or an array (possibly traced).
    name: the hyperparameter's name, used in the error message.
    low: lower bound, or None.
    high: upper bound, or None.
    low_inclusive: whether ``low`` itself is allowed.
    high_inclusive: whether ``high`` itself is allowed.

  Returns:
    ``value`` as a float32 array.

  Raises:
    ValueError: if a concrete value is empty, NaN, infinite or outside the
      range.
    TypeError: if ``value`` is not numeric (None, a string, a ragged list).

  Example:
    >>> hparam(0.2, 'density', low=0.0, high=1.0)
    Array(0.2, dtype=float32)
    >>> hparam(1.5, 'density', low=0.0, high=1.0)
    Traceback (most recent call last):
    ...
    ValueError: density must lie in [0.0, 1.0], got 1.5.
  """
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f'{name} must be a number or an array of numbers, got '
                    f'{value!r}.')
  try:
    arr = jnp.asarray(value, dtype=jnp.float32)
  except (TypeError, ValueError) as e:
    raise TypeError(f'{name} must be a number or an array of numbers, got '
                    f'{value!r} ({e}).') from None
  check = functools.partial(_check_range, name=name, low=low, high=high,
                            low_inclusive=low_inclusive,
                            high_inclusive=high_inclusive)
  if is_concrete(arr):
    if arr.size == 0:
      raise ValueError(f'{name} is empty ({value!r}); give one value, or one '
                       'per model.')
    check(np.asarray(arr))
  else:
    # Traced: the check runs with the values, on the host (one scalar-sized
    # callback per hyperparameter per call).
    jax.debug.callback(functools.partial(check, traced=True), arr)
  return arr


def _check_range(v, *, name, low, high, low_inclusive, high_inclusive,
                 traced=False):
  v = np.asarray(v)
  lo_ok = True if low is None else np.all(v >= low if low_inclusive else v > low)
  hi_ok = True if high is None else np.all(v <= high if high_inclusive else v < high)
  if np.all(np.isfinite(v)) and lo_ok and hi_ok:
    return
  lb = '-inf' if low is None else f'{low}'
  ub = 'inf' if high is None else f'{high}'
  rng = ('[' if low_inclusive else '(') + f'{lb}, {ub}' + (
      ']' if high_inclusive else ')')
  where = (' (a traced value, e.g. one point of a vmapped sweep)' if traced
           else '')
  if low is None and high is None:
    raise ValueError(f'{name} must be finite, got {v.tolist()}{where}.')
  raise ValueError(f'{name} must lie in {rng}, got {v.tolist()}{where}.')


def per_model(value: jax.Array, k: int, name: str) -> jax.Array:
  """Broadcasts a scalar or per-model hyperparameter to shape ``[k]``.

  Raises:
    ValueError: if ``value`` has a length other than 1 or ``k``.
  """
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (k,))
  if value.shape != (k,):
    raise ValueError(
        f'{name} has shape {value.shape} but there are {k} models: give one '
        f'value, or one per model (shape ({k},)).')
  return value


def check_models(base: Any, models: Sequence[Any], *, check_finite: bool = True,
                 base_required: bool = True) -> None:
  """Checks that ``models`` share ``base``'s tree, shapes and dtypes.

  Args:
    base: the base model (a pytree of arrays), or None where a method has none.
    models: the fine-tuned models.
    check_finite: also scan values for NaN/Inf (one pass over memory).
    base_required: whether ``base`` must be given.

  Raises:
    ValueError: naming the first offending leaf path, with shapes/dtypes and a
      suggested fix.
  """
  models = list(models)
  if not models:
    raise ValueError('models is empty: pass at least one fine-tuned model, e.g. '
                     'merge(tx, base=base, models=[ft_1, ft_2]).')
  ref_name, ref = ('base', base) if base is not None else ('models[0]', models[0])
  if base is None and base_required:
    raise ValueError('This merge needs base=: pass the pre-trained parameters.')
  ref_flat = paths.flatten_to_dict(ref)
  if not ref_flat:
    raise ValueError(f'{ref_name} has no array leaves.')
  ref_def = jax.tree.structure(ref)
  named = [(f'models[{i}]', m) for i, m in enumerate(models)]
  if base is not None:
    named = [('base', base)] + named
  for name, tree in named:
    if tree is not ref and jax.tree.structure(tree) != ref_def:
      flat = paths.flatten_to_dict(tree)
      missing = sorted(set(ref_flat) - set(flat))[:5]
      extra = sorted(set(flat) - set(ref_flat))[:5]
      raise ValueError(
          f'{name} has a different tree structure from {ref_name}: missing '
          f'leaves {missing}, extra leaves {extra}. All models must have the '
          f'same parameters; select a common subset first.')
    for path, x in paths.flatten_to_dict(tree).items():
      r = ref_flat[path]
      if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
        raise ValueError(f'{name} leaf {path!r} is a {type(x).__name__}, not an '
                         'array.')
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f'{name} leaf {path!r} has dtype {x.dtype}; mergejax merges '
            'floating-point leaves only. Drop integer leaves (e.g. step '
            'counters) before merging and restore them afterwards.')
      if 0 in tuple(x.shape):
        raise ValueError(
            f'{name} leaf {path!r} has zero-size shape {tuple(x.shape)}: there '
            'is nothing to merge in it. Drop it from the trees before merging '
            '(and add it back afterwards).')
      if x.shape != r.shape:
        raise ValueError(
            f'{name} leaf {path!r} has shape {tuple(x.shape)} but {ref_name} '
            f'has {tuple(r.shape)}. Models must share every shape; align '
            'vocabularies or crop/pad this tensor before merging.')
      if x.dtype != r.dtype:
        raise ValueError(
            f'{name} leaf {path!r} has dtype {x.dtype} but {ref_name} has '
            f'{r.dtype}. Cast the models to one dtype first, e.g. '
            f'jax.tree.map(lambda x: x.astype(jnp.{r.dtype}), model).')
      if check_finite and is_concrete(x) and (n_bad := _count_nonfinite(x)):
        raise ValueError(
            f'{name} leaf {path!r} (shape {tuple(x.shape)}, {x.dtype}) contains '
            f'{n_bad} NaN/Inf value(s). Fix or drop that checkpoint, or pass '
            'check_finite=False to merge anyway.')


def cast_models(base: Any, models: Sequence[Any]) -> list[Any]:
  """Casts float leaves whose dtype differs from the reference's, warning once.

  The reference is ``base`` (or ``models[0]`` without a base). mergekit casts
  every input to the merge dtype; mergejax does the same, and says so once
  per call, naming the first leaf cast. Trees that differ in structure or
  shape are left alone for `check_models` to report.

  Returns:
    ``models`` with every differing floating-point leaf cast.
  """
  models = list(models)
  ref = base if base is not None else (models[0] if models else None)
  if ref is None:
    return models
  ref_def = jax.tree.structure(ref)
  first = None
  out = []
  for i, m in enumerate(models):
    if jax.tree.structure(m) != ref_def:
      out.append(m)
      continue

    def cast(path, x, r, i=i):
      nonlocal first
      dx, dr = getattr(x, 'dtype', None), getattr(r, 'dtype', None)
      if (dx is None or dr is None or dx == dr
          or not jnp.issubdtype(dx, jnp.floating)
          or not jnp.issubdtype(dr, jnp.floating)):
        return x
      first = first or (f'models[{i}]', path, dx, dr)
      return x.astype(dr)

    out.append(paths.tree_map_with_path(cast, m, ref))
  if first:
    name, path, dx, dr = first
    warnings.warn(
        f'{name} leaf {path!r} is {dx} where the reference is {dr}: models are '
        f'cast to the reference dtypes before merging (as mergekit casts to '
        'its merge dtype).', UserWarning, stacklevel=3)
  return out


@jax.jit
def _nonfinite(x):
  return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _count_nonfinite(x: jax.Array) -> int:
  # Concrete inputs can still be checked inside an outer jit/vmap (a sweep):
  # compile-time evaluation keeps the count a Python int there.
  with jax.ensure_compile_time_eval():
    return int(_nonfinite(x))


def check_finite_tree(tree: Any, what: str, fix: str) -> None:
  """Raises if a leaf of ``tree`` holds NaN/Inf, naming the leaf and ``fix``.

  Args:
    tree: a pytree of concrete arrays (e.g. accumulated statistics).
    what: what the tree is, for the message (``'the Fisher diagonal'``).
    fix: what to do about it.

  Raises:
    ValueError: naming the first leaf path with a NaN/Inf value.
  """
  for path, x in paths.flatten_to_dict(tree).items():
    if is_concrete(x) and (n_bad := _count_nonfinite(x)):
      raise ValueError(f'{what} at {path!r} (shape {tuple(x.shape)}) has '
                       f'{n_bad} NaN/Inf value(s): {fix}')


def static_int(value: Any, name: str, *, owner: str, low: int = 0,
               high: int | None = None, hint: str = '') -> int:
  """A static integer setting (a shape, a count, a number of steps), checked.

  Booleans and non-integers (floats, arrays) are rejected, so ``steps=True``
  or ``steps=2.5`` fail loudly instead of running one step or truncating.

  Args:
    value: the setting.
    name: its argument name, for the message.
    owner: the function it was passed to, for the message.
    low: the smallest valid value.
    high: the largest valid value (None: no bound).
    hint: appended to the message (e.g. what bounds ``high``).

  Returns:
    ``value`` as a Python int.

  Raises:
    ValueError: naming the function, the argument and the valid range.
  """
  ok = (not isinstance(value, bool) and isinstance(value, (int, np.integer))
        and value >= low and (high is None or value <= high))
  if not ok:
    valid = f'>= {low}' if high is None else f'in [{low}, {high}]'
    raise ValueError(f'{owner}: {name} must be an int {valid}{hint}, got '
                     f'{value!r}.')
  return int(value)


def float_tree(tree: Any, what: str, *, fix: str = '') -> dict[str, Any]:
  """``{path: leaf}`` of a non-empty pytree whose leaves are all floats.

  Raises:
    ValueError: naming the non-float leaves and their dtypes, then ``fix``.
  """
  leaves = paths.flatten_to_dict(tree)
  bad = {p: str(jnp.result_type(l)) for p, l in leaves.items()
         if not jnp.issubdtype(jnp.result_type(l), jnp.floating)}
  if not leaves or bad:
    raise ValueError(f'{what} must be a non-empty pytree of float arrays; '
                     f'non-float leaves: {bad}.' + (f' {fix}' if fix else ''))
  return leaves


def nonnegative_tree(tree: Any, what: str, *, fix: str) -> Any:
  """``tree`` as float32, its concrete leaves checked finite and ``>= 0``.

  For statistics that are squares by construction (diagonal Fishers, Adam
  second moments). Traced leaves pass unchecked (their values are unknown
  until the computation runs).

  Raises:
    ValueError: naming the offending leaf, its shape, and ``fix``.
  """
  float_tree(tree, what, fix=fix)
  out = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  for path, v in paths.flatten_to_dict(out).items():
    if not is_concrete(v) or not v.size:
      continue
    with jax.ensure_compile_time_eval():
      ok = bool(jnp.all(jnp.isfinite(v)) & jnp.all(v >= 0))
    if not ok:
      raise ValueError(f'{what} leaf {path!r} (shape {tuple(v.shape)}) holds '
                       f'negative or NaN/Inf values. {fix}')
  return out


def one_of(value: Any, name: str, choices: Any, *, owner: str) -> str:
  """``value`` if it is one of ``choices``, else a ValueError listing them.

  ``choices`` is a sequence of names or a ``{name: meaning}`` mapping, whose
  meanings the message shows.

  Example:
    >>> one_of('b', 'per', {'a': 'per item', 'b': 'per batch'}, owner='f')
    'b'
    >>> one_of('c', 'per', ('a', 'b'), owner='f')
    Traceback (most recent call last):
    ...
    ValueError: f: per must be 'a' or 'b', got 'c'.
  """
  if isinstance(value, str) and value in choices:
    return value
  names = [f'{c!r}' + (f' ({choices[c]})' if isinstance(choices, dict)
                       else '') for c in choices]
  listed = ' or '.join(names) if len(names) < 3 else (
      ', '.join(names[:-1]) + ' or ' + names[-1])
  raise ValueError(f'{owner}: {name} must be {listed}, got {value!r}.')
