"""Config helpers and hyperparameter sweeps over `mergejax.merge`.

A *sweep* is a list of flat override dicts such as
``[{'merge.density': 0.1}, {'merge.density': 0.2}]``, built with `sweep`,
`product` and `zip_` (big_vision's ``hyper.product`` / ``hyper.sweep``, without
the closed-source launcher) and applied to an ``ml_collections`` config with
``config.update_from_flattened_dict``.

`run_sweep` runs the points of a sweep with as few compilations as possible:
points that differ only in *numeric* merge hyperparameters (float values under
``merge.``) are one group and run as **one** ``jax.vmap``-ed, jit-compiled call
of `mergejax.merge` (numeric hyperparameters live in the transformation's state,
so they trace); points that differ in anything else (a method, a rank, a mode,
a zoo setting) are *structural variants* and run as separate jobs. Every point
lands in one results table (``sweep.json`` / ``sweep.csv`` in ``workdir``).

Method configs (``configs/methods/*.py``) describe a merge as a flat
``config.merge`` section: ``method`` (a name in `mergejax.methods`) plus that
factory's keyword arguments; `build_method` turns it into a transformation.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import mergejax as mj
from experiments.tools import progress as progress_lib

__all__ = (
    'sweep',
    'product',
    'zip_',
    'zip_sweep',
    'parse_sweep',
    'apply_overrides',
    'parse_arg',
    'load_config',
    'method_kwargs',
    'get_method',
    'build_method',
    'merge_sweep',
    'SweepResult',
    'format_table',
    'split_overrides',
    'run_sweep',
    'write_table',
)

Overrides = dict[str, Any]
Axis = Sequence[Overrides] | Mapping[str, Sequence[Any]]


# ----------------------------------------------------------------------------
# Building sweeps.


def sweep(name: str, values: Iterable[Any]) -> list[Overrides]:
  """One sweep axis: ``[{name: v} for v in values]``.

  A leading ``config.`` is dropped, so big_vision-style names work too.

  Example:
    >>> import mergejax as mj
    >>> sweep('merge.density', [0.1, 0.2])
    [{'merge.density': 0.1}, {'merge.density': 0.2}]
  """
  name = name.removeprefix('config.')
  return [{name: v} for v in values]


def _as_axis(axis: Axis) -> list[Overrides]:
  if isinstance(axis, Mapping):
    # {'a': [1, 2], 'b': [3, 4]} is a zip of its entries (one axis).
    return zip_(*(sweep(k, v) for k, v in axis.items()))
  out = [dict(d) for d in axis]
  for d in out:
    if not isinstance(d, Mapping):
      raise ValueError(f'A sweep axis must be a list of override dicts, got an '
                       f'element {d!r}; build axes with sweep(name, '
                       'values).')
  return [{k.removeprefix('config.'): v for k, v in d.items()} for d in out]


def _merge_dicts(dicts: Sequence[Overrides]) -> Overrides:
  out = {}
  for d in dicts:
    clash = set(out) & set(d)
    if clash:
      raise ValueError(f'Sweep axes both set {sorted(clash)}: each name may '
                       'appear in one axis only.')
    out.update(d)
  return out


def product(*axes: Axis) -> list[Overrides]:
  """The Cartesian product of sweep axes, as a list of flat override dicts.

  Args:
    *axes: each a list of override dicts (e.g. from `sweep`) or a mapping
      ``{name: values}`` (its entries are zipped into one axis).

  Returns:
    One dict per point; the last axis varies fastest.

  Example:
    >>> import mergejax as mj
    >>> product(sweep('merge.density', [0.1, 0.2]),
    ...            {'merge.lambda_': [0.5, 1.0]})
    [{'merge.density': 0.1, 'merge.lambda_': 0.5},
     {'merge.density': 0.1, 'merge.lambda_': 1.0},
     {'merge.density': 0.2, 'merge.lambda_': 0.5},
     {'merge.density': 0.2, 'merge.lambda_': 1.0}]
  """
  lists = [_as_axis(a) for a in axes]
  return [_merge_dicts(p) for p in itertools.product(*lists)]


def zip_(*axes: Axis) -> list[Overrides]:
  """Zips sweep axes of equal length point by point.

  Example:
    >>> import mergejax as mj
    >>> zip_(sweep('merge.density', [0.1, 0.2]),
    ...         sweep('merge.lambda_', [1.0, 0.5]))
    [{'merge.density': 0.1, 'merge.lambda_': 1.0},
     {'merge.density': 0.2, 'merge.lambda_': 0.5}]
  """
  lists = [_as_axis(a) for a in axes]
  lengths = {len(l) for l in lists}
  if len(lengths) > 1:
    raise ValueError(f'zip_ needs axes of equal length, got lengths '
                     f'{[len(l) for l in lists]}; use product for a grid.')
  return [_merge_dicts(p) for p in zip(*lists)]


zip_sweep = zip_


def parse_sweep(product_spec: str = '', zip_spec: str = '') -> list[Overrides]:
  """Parses sweep strings from a config (settable on the command line).

  Each string is ``'name=values; name=values'`` with ``values`` a Python
  literal tuple or list. Entries of ``product_spec`` are crossed; entries of
  ``zip_spec`` are zipped into one axis, crossed with the others.

  Example:
    >>> from experiments.tools.sweep import parse_sweep
    >>> parse_sweep('merge.density=(0.1, 0.2)', 'merge.lambda_=(1.,);seed=(3,)')
    [{'merge.lambda_': 1.0, 'seed': 3, 'merge.density': 0.1},
     {'merge.lambda_': 1.0, 'seed': 3, 'merge.density': 0.2}]
  """
  def entries(spec):
    out = []
    for item in (spec or '').split(';'):
      if not item.strip():
        continue
      name, eq, values = item.partition('=')
      try:
        vals = ast.literal_eval(values.strip()) if eq else None
      except (ValueError, SyntaxError):
        vals = None
      if not isinstance(vals, (tuple, list)):
        raise ValueError(f'Cannot parse sweep entry {item.strip()!r}: write '
                         "'name=(v1, v2, ...)', entries separated by ';'.")
      out.append(sweep(name.strip(), vals))
    return out

  axes = entries(product_spec)
  zipped = entries(zip_spec)
  if zipped:
    axes = [zip_(*zipped)] + axes
  return product(*axes) if axes else [{}]


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Overrides) -> ml_collections.ConfigDict:
  """A copy of ``config`` (kept locked if it was) with ``overrides`` applied.

  Raises:
    KeyError: from ml_collections, naming the valid fields, on a typo such as
      ``{'merge.densty': 0.3}`` when ``config`` is locked.
  """
  # deepcopy keeps the lock and the FieldReferences between fields (e.g.
  # configs/default.py's shared merge.density), which to_dict() would resolve.
  new = copy.deepcopy(config)
  new.update_from_flattened_dict({k.removeprefix('config.'): v
                                  for k, v in overrides.items()})
  return new


# ----------------------------------------------------------------------------
# Config files.


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses a config-file argument ``'k=v,k2=v2'`` against defaults ``spec``.

  Values are cast to the type of their default (``'True'``/``'false'``/``'1'``
  for booleans). A bare value without ``=`` sets the first key, so
  ``file.py:ties`` means ``file.py:variant=ties`` when ``variant`` is the first
  key. This is big_vision's ``parse_arg``, for ``get_config(arg)`` functions.

  Raises:
    ValueError: on an unknown key, naming the valid ones.

  Example:
    >>> from experiments.tools.sweep import parse_arg
    >>> a = parse_arg('variant=fusionbench,runlocal=True', variant='mergekit',
    ...               runlocal=False)
    >>> a.variant, a.runlocal
    ('fusionbench', True)
  """
  out = dict(spec)
  if arg:
    for i, item in enumerate(arg.split(',')):
      if '=' not in item:
        if i != 0 or not spec:
          raise ValueError(f'Cannot parse {item!r} in config argument {arg!r}: '
                           'write key=value pairs separated by commas.')
        item = f'{next(iter(spec))}={item}'
      key, value = item.split('=', 1)
      key = key.strip()
      if key not in spec:
        raise ValueError(f'Unknown config argument {key!r} in {arg!r}; valid '
                         f'arguments: {sorted(spec)}.')
      out[key] = _cast(value.strip(), spec[key], key)
  return ml_collections.ConfigDict(out)


def _cast(value: str, default: Any, key: str) -> Any:
  if isinstance(default, bool):
    if value.lower() in ('true', '1', 'yes'):
      return True
    if value.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'Config argument {key}={value!r} is not a boolean.')
  if default is None or isinstance(default, str):
    return value
  return type(default)(value)


def load_config(spec: str | os.PathLike[str], *, lock: bool = True
                ) -> ml_collections.ConfigDict:
  """Loads ``'path/to/config.py:arg'`` the way ``--config`` does, locked.

  For notebooks and tests; on the command line the launcher's ``--config``
  flag (``ml_collections.config_flags``) does the same.

  Example:
    >>> from experiments.tools.sweep import load_config
    >>> cfg = load_config('configs/methods/ties.py')  # doctest: +SKIP
  """
  spec = str(spec)
  path, _, arg = spec.partition(':')
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'Config file {path} does not exist.')
  module_spec = importlib.util.spec_from_file_location(
      f'_mergejax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  if lock:
    config.lock()
  return config


def method_kwargs(merge_config: Mapping[str, Any]
                  ) -> tuple[str, dict[str, Any]]:
  """Splits a ``config.merge`` section into ``(method, factory kwargs)``."""
  d = dict(merge_config.to_dict() if hasattr(merge_config, 'to_dict')
           else merge_config)
  if 'method' not in d:
    raise ValueError(f'A merge config needs a "method" field (a name in '
                     f'mergejax.methods); got fields {sorted(d)}.')
  method = d.pop('method')
  # Lists from YAML/CLI become tuples: hashable, so usable as static config.
  return method, {k: tuple(v) if isinstance(v, list) else v
                  for k, v in d.items()}


def get_method(name: str) -> Callable[..., Any]:
  """``mergejax.methods.<name>``, or a ValueError listing the methods."""
  from mergejax import methods  # pylint: disable=g-import-not-at-top
  fn = getattr(methods, name, None)
  if fn is None or name.startswith('_') or not callable(fn):
    valid = sorted(n for n in dir(methods)
                   if not n.startswith('_') and callable(getattr(methods, n)))
    raise ValueError(f'Unknown merge method {name!r}; mergejax.methods has '
                     f'{valid}.')
  return fn


def build_method(merge_config: Mapping[str, Any], **overrides: Any):
  """Builds the transformation a ``config.merge`` section describes.

  Args:
    merge_config: ``method`` plus the factory's keyword arguments.
    **overrides: keyword arguments replacing the config's (e.g. traced values
      inside a vmapped sweep, which a ConfigDict cannot hold).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> from experiments.tools.sweep import build_method
    >>> tx = build_method({'method': 'task_arithmetic', 'lambda_': 0.5})
    >>> base, fts = {'w': jnp.zeros(1)}, [{'w': jnp.ones(1)}]
    >>> mj.merge(tx, base, fts)['w']
    Array([0.5], dtype=float32)
  """
  method, kwargs = method_kwargs(merge_config)
  kwargs.update(overrides)
  fn = get_method(method)
  try:
    return fn(**kwargs)
  except TypeError as e:
    raise TypeError(f'mergejax.methods.{method} rejected the config fields '
                    f'{sorted(kwargs)}: {e}') from e


# ----------------------------------------------------------------------------
# Vmapped merges.


def _is_numeric(value: Any) -> bool:
  """Floats (and tuples of floats) trace; ints, bools, strings are static."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (float, np.floating)):
    return True
  if isinstance(value, (tuple, list)) and value:
    return all(_is_numeric(v) for v in value)
  return False


@functools.partial(jax.jit, static_argnames=('method', 'static'))
def _merge_sweep(method, static, numeric, base, models, key):
  fn = get_method(method)

  def one(hp):
    return mj.merge(fn(**dict(static), **hp), base, models, key,
                           check_finite=False)

  return jax.vmap(one)(numeric)


def merge_sweep(merge_config: Mapping[str, Any],
                numeric: Mapping[str, Any],
                base: Any,
                models: Sequence[Any],
                key: jax.Array | None = None) -> Any:
  """Merges once per row of ``numeric`` in one vmapped, jit-compiled call.

  Args:
    merge_config: a ``config.merge`` section (``method`` + static kwargs; its
      numeric fields are defaults for those not in ``numeric``).
    numeric: ``{kwarg: values}`` with a leading sweep axis S on every value
      (e.g. ``{'density': [0.1, 0.2, 0.3]}``; per-model weights ``[S, K]``).
    base: the base model (or None).
    models: the K fine-tuned models.
    key: one PRNG key shared by all points (common random numbers).

  Returns:
    The merged models stacked on a leading axis of size S.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> from experiments.tools.sweep import merge_sweep
    >>> base, fts = {'w': jnp.zeros(1)}, [{'w': jnp.ones(1)}]
    >>> merge_sweep({'method': 'task_arithmetic'}, {'lambda_': [0.5, 2.0]},
    ...             base, fts)['w']
    Array([[0.5],
           [2. ]], dtype=float32)
  """
  method, kwargs = method_kwargs(merge_config)
  numeric = {k: jnp.asarray(v, jnp.float32) for k, v in numeric.items()}
  sizes = {v.shape[0] if v.ndim else None for v in numeric.values()}
  if not numeric or None in sizes or len(sizes) != 1:
    raise ValueError('merge_sweep needs numeric values with one common leading '
                     f'sweep axis, got shapes '
                     f'{ {k: v.shape for k, v in numeric.items()} }.')
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in numeric))
  models = list(models)
  # Validate once, eagerly (the values are concrete here, not inside the jit).
  mj.check_models(base, models, base_required=False)
  get_method(method)
  try:
    return _merge_sweep(method, static, numeric, base, models, key)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerBoolConversionError,
          jax.errors.TracerIntegerConversionError) as e:
    raise ValueError(
        f'mergejax.methods.{method} cannot trace {sorted(numeric)}: one of '
        'them sets shapes or Python control flow, so it cannot be vmapped. '
        'Sweep it as a structural variant: run_sweep(..., static=('
        f"'merge.<name>',)) (or config.sweep.static). Cause: "
        f'{type(e).__name__}.') from e


# ----------------------------------------------------------------------------
# Running a sweep.


@dataclasses.dataclass
class SweepResult:
  """The table of a sweep: one row per point, plus where it was written.

  Attributes:
    rows: one dict per point: its overrides, then the job's metrics, then
      ``group`` (the structural variant it ran in).
    groups: how many structural variants (jobs) ran.
    path: the ``sweep.json`` written, or None without a workdir.
  """
  rows: list[dict[str, Any]]
  groups: int
  path: str | None = None

  def column(self, name: str) -> list[Any]:
    return [r.get(name) for r in self.rows]

  def to_markdown(self, columns: Sequence[str] | None = None) -> str:
    return format_table(self.rows, columns)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str] | None = None) -> str:
  """Formats rows as a Markdown table (floats with 4 significant digits)."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in rows for k in r))

  def fmt(v):
    if isinstance(v, (float, np.floating)):
      return f'{float(v):.4g}'
    if isinstance(v, (tuple, list)):
      return '(' + ', '.join(fmt(x) for x in v) + ')'
    return str(v)

  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |'
            for r in rows]
  return '\n'.join(lines)


def split_overrides(point: Overrides, prefix: str = 'merge.',
                    static: Sequence[str] = ()) -> tuple[Overrides, Overrides]:
  """Splits a point into (structural, numeric) overrides.

  Numeric: float (or tuple-of-float) values under ``prefix``; they become
  traced arguments of one vmapped merge. Everything else is structural, and so
  are the names in ``static`` (floats that set shapes, e.g. Iso-CTS's
  ``common_space_fraction``).
  """
  static = {k.removeprefix('config.') for k in static}
  numeric = {k: v for k, v in point.items()
             if k.startswith(prefix) and _is_numeric(v) and k not in static}
  structural = {k: v for k, v in point.items() if k not in numeric}
  return structural, numeric


Job = Callable[[ml_collections.ConfigDict, dict[str, jax.Array]],
               Sequence[Mapping[str, Any]]]


def run_sweep(config: ml_collections.ConfigDict,
              points: Sequence[Overrides],
              job: Job | None = None,
              *,
              base: Any = None,
              models: Sequence[Any] | None = None,
              evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
              key: jax.Array | None = None,
              workdir: str | os.PathLike[str] | None = None,
              vmap: bool = True,
              static: Sequence[str] = (),
              progress: bool | None = None) -> SweepResult:
  """Runs a sweep: one vmapped call per structural variant, one table.

  Points are grouped by their structural overrides (see `split_overrides`);
  each group runs as one job, which gets the config with the group's
  structural overrides (and its first point's numeric ones) applied, and the
  group's numeric merge hyperparameters stacked into ``{kwarg: [S, ...]}``.

  Without ``job``, the job is "merge ``models`` into ``base`` with
  ``config.merge`` in one vmapped call (`merge_sweep`), then ``evaluate`` each
  merged model" (``evaluate(params) -> {metric: value}``).

  Args:
    config: the (locked) experiment config; must have a ``merge`` section for
      the default job.
    points: the sweep, e.g. from `product`; ``[{}]`` runs the config as is.
    job: ``job(config, numeric) -> [metrics per point]``, for sweeps whose
      structural variants need more than a new merge (e.g. a new zoo).
    base: the base model, for the default job.
    models: the fine-tuned models, for the default job.
    evaluate: ``evaluate(merged_params) -> {metric: value}``, for the default
      job.
    key: a PRNG key for random methods, shared by all points.
    workdir: if given, writes ``sweep.json`` and ``sweep.csv`` there.
    vmap: group numeric points into vmapped calls; False runs one job per point
      (a loop, for comparison).
    static: override names to treat as structural even when they are floats
      (hyperparameters that set shapes or Python control flow).
    progress: show a progress bar over jobs (None: only on a terminal).

  Returns:
    A `SweepResult`.

  Example:
    >>> import jax.numpy as jnp, ml_collections, mergejax as mj
    >>> cfg = ml_collections.ConfigDict(
    ...     {'merge': {'method': 'task_arithmetic', 'lambda_': 1.0}})
    >>> base, fts = {'w': jnp.zeros(1)}, [{'w': jnp.ones(1)}]
    >>> res = run_sweep(cfg, sweep('merge.lambda_', [0.5, 2.0]),
    ...                    base=base, models=fts,
    ...                    evaluate=lambda p: {'w': float(p['w'][0])})
    >>> res.column('w'), res.groups
    ([0.5, 2.0], 1)
  """
  points = [dict(_as_axis([p])[0]) for p in points] or [{}]
  if job is None:
    if models is None or evaluate is None:
      raise ValueError('run_sweep needs either job=..., or models=... and '
                       'evaluate=... (and base=...) for the default merge job.')
    job = functools.partial(_default_job, base=base, models=models,
                            evaluate=evaluate, key=key)

  # Group points by their structural overrides, keeping first-seen order.
  groups: dict[Any, list[int]] = {}
  for i, p in enumerate(points):
    structural, numeric = split_overrides(p, static=static)
    gkey = (_freeze(structural), tuple(sorted(numeric))) if vmap else i
    groups.setdefault(gkey, []).append(i)

  rows: list[dict[str, Any] | None] = [None] * len(points)
  for g, idx in enumerate(progress_lib.progress(
      list(groups.values()), desc='sweep', unit='job', enable=progress)):
    first = points[idx[0]]
    cfg = apply_overrides(config, first)
    _, numeric0 = split_overrides(first, static=static)
    # With vmap=False the job sees the point's full config and no numeric
    # values: a plain loop, one merge per point (for comparison).
    numeric = {k.removeprefix('merge.'):
               jnp.asarray([points[i][k] for i in idx], jnp.float32)
               for k in numeric0} if vmap else {}
    metrics = list(job(cfg, numeric))
    if len(metrics) != len(idx):
      raise ValueError(f'The sweep job returned {len(metrics)} results for a '
                       f'group of {len(idx)} points: return one per point.')
    for i, m in zip(idx, metrics):
      rows[i] = {**points[i], **_to_python(m), 'group': g}

  result = SweepResult(rows=rows, groups=len(groups))
  if workdir is not None:
    result.path = write_table(rows, workdir)
  return result


def _default_job(cfg, numeric, *, base, models, evaluate, key):
  if numeric:
    merged = merge_sweep(cfg.merge, numeric, base, models, key)
    n = next(iter(numeric.values())).shape[0]
    return [evaluate(jax.tree.map(lambda x, i=i: x[i], merged))
            for i in range(n)]
  merged = mj.merge(build_method(cfg.merge), base, models, key)
  return [evaluate(merged)]


def _freeze(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in d.items()))


def _to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in dict(metrics).items():
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
      v = np.asarray(v)
      v = v.item() if v.ndim == 0 else v.tolist()
    out[k] = v
  return out


def write_table(rows: Sequence[Mapping[str, Any]],
                workdir: str | os.PathLike[str],
                name: str = 'sweep') -> str:
  """Writes ``<name>.json``, ``.csv`` and ``.md``; returns the JSON path."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  json_path = workdir / f'{name}.json'
  json_path.write_text(json.dumps(list(rows), indent=1, default=str))
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(workdir / f'{name}.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    for r in rows:
      w.writerow({k: json.dumps(v) if isinstance(v, (list, tuple)) else v
                  for k, v in r.items()})
  (workdir / f'{name}.md').write_text(format_table(rows, columns) + '\n')
  return str(json_path)
