"""A reader for mergekit's YAML merge configurations, and a per-tensor plan.

Semantics follow mergekit 0.1.5 (``config.py``, ``parameter_resolver.py``,
``plan.py``; summarised in ``shared/reference/arithmetic-methods.md`` §20):

* ``models:`` is one slice over all layers, with the base appended as a source
  if it is not listed; ``slices:`` list sources with half-open
  ``layer_range``\\ s, output layers are numbered consecutively, and ``t``
  restarts at 0 in every slice (``t = i / (L - 1)``, 1 for one layer).
* Non-layer tensors use ``t = 0``; pre-weights (embeddings) are planned with
  the first slice's sources and parameters, post-weights (final norm,
  ``lm_head``) with the last slice's.
* A setting is a scalar, a gradient list (interpolated at ``t``), or a
  (list of) ``{filter, value}`` conditionals (first entry whose filter is a
  substring of the tensor name, absent, or ``'*'`` wins).
* Per-model parameters: source ``parameters`` > slice ``parameters`` > top-level
  ``parameters`` > default, matched against that model's *input* tensor name;
  shared parameters skip the source scope and match the *output* name.
* Unknown parameter names are ignored by mergekit; here they warn.

A tensor is a layer tensor if its name has a ``.<digits>.`` component (the
first one is the layer index), mergekit's rule for architectures it has no
definition for; it is exact for Llama-style names.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import yaml

REQUIRED = object()
_LAYER_RE = re.compile(r'\.(\d+)\.')
_PRE_RE = re.compile(r'embed|wte|wpe|tok_embeddings|word_embeddings')


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """How a mergekit method maps onto a `mergejax.methods` factory.

  Attributes:
    base: ``'required'``, ``'optional'`` or ``'ignored'`` (the base, if any, is
      merged as one more input).
    shared: shared parameters and their defaults (`REQUIRED` if none).
    per_model: per-model parameters and their defaults.
    per_model_scope: ``'non_base'`` (not resolved for the base) or ``'input'``.
    factory: name of the `mergejax.methods` factory.
    static: parameters that configure the computation (booleans, integers)
      rather than numeric values; they are passed as Python values, everything
      else as float32 arrays so that one compile serves every tensor.
    random: the method draws random numbers (needs a key).
    n_inputs: exact number of inputs (base included), or None.
    ignored: parameters mergekit declares but never uses for this method
      (e.g. ``density`` without a sparsifier); dropped silently.
  """
  base: str
  shared: Mapping[str, Any]
  per_model: Mapping[str, Any]
  per_model_scope: str = 'non_base'
  factory: str | None = None
  static: tuple[str, ...] = ()
  random: bool = False
  n_inputs: int | None = None
  ignored: tuple[str, ...] = ()


def _gta(normalize: bool, rescale: bool, extra: Mapping[str, Any] = (),
         random: bool = False, ignored: tuple[str, ...] = ()) -> MethodSpec:
  return MethodSpec(
      base='required',
      shared={'int8_mask': False, 'normalize': normalize, 'rescale': rescale,
              'lambda': 1.0},
      per_model={'weight': REQUIRED, 'density': 1.0, **dict(extra)},
      static=('int8_mask', 'normalize', 'rescale'), random=random,
      ignored=('int8_mask',) + ignored)


METHODS: dict[str, MethodSpec] = {
    'linear': MethodSpec('ignored', {'normalize': True}, {'weight': REQUIRED},
                         per_model_scope='input', static=('normalize',)),
    'task_arithmetic': _gta(False, False, ignored=('density', 'rescale')),
    'ties': _gta(True, False),
    'dare_ties': _gta(False, True, random=True),
    'dare_linear': _gta(False, True, random=True),
    'breadcrumbs': _gta(False, False, {'gamma': 0.01}),
    'breadcrumbs_ties': _gta(False, False, {'gamma': 0.01}),
    'della': _gta(True, True, {'epsilon': 0.15}, random=True),
    'della_linear': _gta(False, True, {'epsilon': 0.15}, random=True),
    'slerp': MethodSpec('required', {'t': REQUIRED}, {}, n_inputs=2),
    'nuslerp': MethodSpec('optional', {'nuslerp_row_wise': False,
                                       'nuslerp_flatten': True},
                          {'weight': REQUIRED},
                          static=('nuslerp_row_wise', 'nuslerp_flatten')),
    'multislerp': MethodSpec('optional', {'normalize_weights': True,
                                          'eps': 1e-8}, {'weight': REQUIRED},
                             static=('normalize_weights',)),
    'karcher': MethodSpec('ignored', {'max_iter': 10, 'tol': 1e-5}, {},
                          static=('max_iter',)),
    'model_stock': MethodSpec('required', {'filter_wise': False}, {},
                              static=('filter_wise',)),
    'sce': MethodSpec('required', {'select_topk': 1.0, 'int8_mask': False}, {},
                      static=('int8_mask',), ignored=('int8_mask',)),
    'nearswap': MethodSpec('required', {'t': REQUIRED}, {}, n_inputs=2),
    'arcee_fusion': MethodSpec('required', {}, {}, n_inputs=2),
    'ram': MethodSpec('required', {'epsilon': 1e-5}, {}),
    'ramplus_tl': MethodSpec('required', {'r': 0.1, 'alpha': 0.2,
                                          'epsilon': 1e-5}, {}),
    'passthrough': MethodSpec('ignored', {}, {'scale': None},
                              per_model_scope='input'),
}

# Options that only mergejax understands (given under top-level `parameters`).
MERGEJAX_SHARED = {'trim_scope': 'tensor'}


@dataclasses.dataclass
class Source:
  model: str  # resolved local path
  layer_range: tuple[int, int] | None
  parameters: dict[str, Any]
  name: str  # as written in the YAML


@dataclasses.dataclass
class Slice:
  sources: list[Source]
  base_model: str | None
  parameters: dict[str, Any]


@dataclasses.dataclass
class MergeConfig:
  """A parsed mergekit configuration (paths resolved, forms normalised later)."""
  merge_method: str
  base_model: str | None
  parameters: dict[str, Any]
  slices: list[Slice] | None
  models: list[Source] | None
  dtype: str | None
  out_dtype: str | None
  raw: dict[str, Any]

  @property
  def spec(self) -> MethodSpec:
    return METHODS[self.merge_method]

  def referenced_models(self) -> list[str]:
    out = []
    def add(m):
      if m is not None and m not in out:
        out.append(m)
    add(self.base_model)
    for s in self.models or []:
      add(s.model)
    for sl in self.slices or []:
      add(sl.base_model)
      for s in sl.sources:
        add(s.model)
    return out


def _resolve_model(ref: Any, base_dir: str | None) -> tuple[str, str]:
  if isinstance(ref, Mapping):
    if ref.get('lora'):  # {model: ..., lora: ...}, the same as "model+lora"
      lora = ref['lora']
      lora = lora.get('path', lora) if isinstance(lora, Mapping) else lora
      ref = f"{ref['model']}+{lora}"
    else:
      ref = ref['model']
  if not isinstance(ref, str):
    raise ValueError(f'Model reference {ref!r} is not a string.')
  if '+' in ref and not os.path.exists(ref):
    # A LoRA adapter merged into the model before the merge, as mergekit does.
    model, adapter = ref.rsplit('+', 1)
    model_path, _ = _resolve_model(model, base_dir)
    adapter_path, _ = _resolve_model(adapter, base_dir)
    return f'{model_path}+{adapter_path}', ref
  if '@' in ref and not os.path.exists(ref):
    raise ValueError(f'Model {ref!r}: revisions ("path@rev") need the Hugging '
                     'Face hub; download the revision and give its local path.')
  candidates = [ref]
  if base_dir and not os.path.isabs(ref):
    candidates.append(os.path.join(base_dir, ref))
  for c in candidates:
    if os.path.exists(c):
      return os.path.abspath(c), ref
  hub = os.path.expanduser(os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub'))
  snap = os.path.join(hub, 'models--' + ref.replace('/', '--'), 'snapshots')
  if os.path.isdir(snap) and os.listdir(snap):
    return os.path.join(snap, sorted(os.listdir(snap))[-1]), ref
  raise FileNotFoundError(
      f'Model {ref!r} not found: not a local path (looked in '
      f'{[os.path.abspath(c) for c in candidates]}) nor in the Hugging Face '
      f'cache {hub}. mergejax does not download models; fetch it first, e.g. '
      f'`huggingface-cli download {ref}`.')


def _warn_unknown(params: Mapping[str, Any], method: str, where: str) -> None:
  spec = METHODS[method]
  known = set(spec.shared) | set(spec.per_model) | set(MERGEJAX_SHARED)
  for k in params:
    if k not in known:
      warnings.warn(
          f'{where}: parameter {k!r} is not used by merge_method {method!r} '
          f'(it accepts {sorted(known)}); mergekit silently ignores it, so '
          'check for a typo.', UserWarning, stacklevel=3)


def _check_values(value: Any, where: str) -> None:
  """Rejects empty lists and non-finite numbers in a parameter value."""
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return
  if isinstance(value, (int, float)):
    if not math.isfinite(value):
      raise ValueError(f'{where} is {value}: parameter values must be finite.')
    return
  if isinstance(value, Mapping):
    for k, v in value.items():
      _check_values(v, f'{where}.{k}')
    return
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f'{where} is an empty list: give a value, a gradient '
                       '(a list of values) or a list of {filter, value}.')
    for i, v in enumerate(value):
      _check_values(v, f'{where}[{i}]')
    return
  raise ValueError(f'{where} has a {type(value).__name__} value {value!r}; '
                   'expected a number, a list or a mapping.')


def load_config(config: str | Mapping[str, Any], *,
                base_dir: str | None = None,
                resolve_paths: bool = True) -> MergeConfig:
  """Reads a mergekit YAML file (or an already-parsed dict).

  Args:
    config: path to a ``.yml`` file, YAML text, or a dict.
    base_dir: directory for relative model paths that do not exist relative to
      the working directory (default: the YAML file's directory).
    resolve_paths: check that models exist and resolve their paths.

  Returns:
    A `MergeConfig`.

  Raises:
    ValueError: for malformed files, with the offending key.

  Example:
    >>> cfg = load_config({'merge_method': 'linear', 'models': [
    ...     {'model': 'a', 'parameters': {'weight': 0.5}}]}, resolve_paths=False)
    >>> cfg.merge_method, cfg.models[0].parameters
    ('linear', {'weight': 0.5})
  """
  source = 'the config'
  if isinstance(config, str):
    try:
      if os.path.exists(config):
        source = config
        base_dir = base_dir or os.path.dirname(os.path.abspath(config))
        with open(config) as f:
          raw = yaml.safe_load(f)
      else:
        raw = yaml.safe_load(config)
    except yaml.YAMLError as e:
      raise ValueError(f'{source} is not valid YAML: {e}') from None
  else:
    raw = dict(config)
  if not isinstance(raw, Mapping):
    raise ValueError(f'{source} must be a YAML mapping (merge_method:, '
                     f'models: or slices:, ...), got {type(raw).__name__}.')
  if 'modules' in raw:
    raise ValueError('`modules:` (multi-module models such as VLMs) is not '
                     'supported yet; use `models:` or `slices:`.')
  forms = [k for k in ('models', 'slices') if raw.get(k) is not None]
  if len(forms) != 1:
    raise ValueError('A merge config needs exactly one of `models:` or '
                     f'`slices:`, got {forms or "neither"}.')
  method = raw.get('merge_method')
  if method is None:
    raise ValueError(f'{source} has no `merge_method:`; add one of '
                     f'{sorted(METHODS)}.')
  if method not in METHODS:
    raise ValueError(f'Unknown merge_method {method!r}; known: '
                     f'{sorted(METHODS)}.')
  for key in ('tokenizer', 'tokenizer_source'):
    if raw.get(key) is not None:
      warnings.warn(f'`{key}` is not supported: tensors are merged by index '
                    'and the tokenizer files are not copied. Vocabulary sizes '
                    'must agree (see --unsafe-truncate-embeddings).',
                    UserWarning, stacklevel=2)
  known_top = {'merge_method', 'base_model', 'parameters', 'models', 'slices',
               'dtype', 'out_dtype', 'tokenizer', 'tokenizer_source',
               'chat_template', 'name', 'modules'}
  for k in raw:
    if k not in known_top:
      warnings.warn(f'Unknown top-level key {k!r} ignored.', UserWarning,
                    stacklevel=2)

  def model_path(ref):
    if ref is None:
      return None, None
    if not resolve_paths:
      r = ref['model'] if isinstance(ref, Mapping) else ref
      return r, r
    return _resolve_model(ref, base_dir)

  def params_of(d, where):
    p = d.get('parameters') or {}
    label = 'parameters' if where == 'parameters' else f'{where}.parameters'
    if not isinstance(p, Mapping):
      raise ValueError(f'{label} must be a mapping of name: value, got {p!r}.')
    p = dict(p)
    for k, v in p.items():
      _check_values(v, f'{label}.{k}')
    _warn_unknown(p, method, where)
    return p

  base, _ = model_path(raw.get('base_model'))
  top = params_of(raw, 'parameters')
  models = slices = None
  if raw.get('models') is not None:
    models = []
    for i, m in enumerate(raw['models']):
      path, name = model_path(m['model'])
      models.append(Source(path, None, params_of(m, f'models[{i}]'), name))
  else:
    slices = []
    for i, s in enumerate(raw['slices']):
      srcs = []
      for j, src in enumerate(s['sources']):
        path, name = model_path(src['model'])
        lr = src.get('layer_range')
        srcs.append(Source(path, None if lr is None else (int(lr[0]), int(lr[1])),
                           params_of(src, f'slices[{i}].sources[{j}]'), name))
      sb, _ = model_path(s.get('base_model'))
      slices.append(Slice(srcs, sb, params_of(s, f'slices[{i}]')))
  for key in ('dtype', 'out_dtype'):
    if raw.get(key) is not None:
      from mergejax.io import _safetensors as safetensors_io  # pylint: disable=g-import-not-at-top
      safetensors_io.parse_dtype(raw[key])  # validate early
  return MergeConfig(method, base, top, slices, models, raw.get('dtype'),
                     raw.get('out_dtype'), raw)


# ----------------------------------------------------------------- settings --

_MISSING = object()


def evaluate_setting(setting: Any, t: float, tensor_name: str) -> Any:
  """Evaluates a mergekit parameter setting for one tensor at position ``t``.

  Returns ``_MISSING`` when nothing applies at this scope (an empty list or no
  matching filter), so the caller falls through to the next scope.

  Example:
    >>> evaluate_setting([0.0, 1.0, 0.5], 0.75, 'model.layers.3.mlp')
    0.75
    >>> evaluate_setting([{'filter': 'mlp', 'value': 0.5}, {'value': 0}], 0,
    ...                  'model.layers.0.mlp.up_proj.weight')
    0.5
  """
  if isinstance(setting, Mapping) and 'value' in setting:
    setting = [setting]
  if setting is None:
    return _MISSING
  if isinstance(setting, (bool, int, float, str)):
    return setting
  if isinstance(setting, list):
    if not setting:
      return _MISSING
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
      if not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                 for e in setting):
        return setting[int(t * (len(setting) - 1))]
      scaled = t * (len(setting) - 1)
      i0 = int(scaled)
      i1 = min(len(setting) - 1, i0 + 1)
      frac = scaled - i0
      return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
      if not isinstance(cond, Mapping) or 'value' not in cond:
        raise ValueError(f'Setting {setting!r}: a list must hold only scalars '
                         '(a gradient) or only {filter, value} conditionals.')
      f = cond.get('filter')
      if f is None or f == '*' or (tensor_name and f in tensor_name):
        return evaluate_setting(cond['value'], t, tensor_name)
    return _MISSING
  raise ValueError(f'Cannot evaluate parameter setting {setting!r}.')


def _validate(name: str, value: Any, default: Any) -> Any:
  if isinstance(default, bool):
    if isinstance(value, str):
      return value.lower() in ('1', 'true', 'yes')
    return bool(value)
  if isinstance(default, int) and not isinstance(default, bool):
    if isinstance(value, float) and not value.is_integer():
      raise ValueError(f'Parameter {name!r} must be an integer, got {value}.')
    return int(value)
  if isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      return value
  return value


# --------------------------------------------------------------------- plan --

@dataclasses.dataclass
class TensorTask:
  """Everything needed to merge one output tensor.

  Attributes:
    out_name: output tensor name.
    inputs: ``(model_path, input_tensor_name)`` per input, in config order.
    base_index: position of the base model in ``inputs``, or None.
    t: position in the slice (0 for non-layer tensors).
    shared: resolved shared parameters.
    per_model: resolved per-model parameters, one dict per input (empty for
      the base of a ``non_base`` method).
  """
  out_name: str
  inputs: list[tuple[str, str]]
  base_index: int | None
  t: float
  shared: dict[str, Any]
  per_model: list[dict[str, Any]]


def split_layer_name(name: str) -> tuple[str, int, str] | None:
  """``'model.layers.3.mlp.w'`` -> ``('model.layers.', 3, '.mlp.w')``."""
  m = _LAYER_RE.search(name)
  if m is None:
    return None
  return name[:m.start() + 1], int(m.group(1)), name[m.end() - 1:]


def num_layers(names: Sequence[str], config: Mapping[str, Any] | None) -> int:
  for key in LAYER_COUNT_KEYS:
    if config and isinstance(config.get(key), int):
      return config[key]
  idx = [s[1] for s in map(split_layer_name, names) if s is not None]
  return max(idx) + 1 if idx else 0


def normalize_slices(cfg: MergeConfig, layer_counts: Mapping[str, int]
                     ) -> list[Slice]:
  """The ``models:`` form as one slice over all layers (base appended)."""
  if cfg.slices is not None:
    for i, sl in enumerate(cfg.slices):
      for s in sl.sources:
        if s.layer_range is None:
          s.layer_range = (0, layer_counts[s.model])
      lens = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
      if len(lens) != 1:
        raise ValueError(f'slices[{i}]: all sources must cover the same number '
                         f'of layers, got layer_ranges '
                         f'{[s.layer_range for s in sl.sources]}.')
      for s in sl.sources:
        if s.layer_range[0] < 0 or s.layer_range[1] > layer_counts[s.model]:
          raise ValueError(f'slices[{i}]: layer_range {list(s.layer_range)} is '
                           f'outside {s.name!r}, which has '
                           f'{layer_counts[s.model]} layers.')
    return cfg.slices
  sources = []
  for s in cfg.models:
    sources.append(Source(s.model, (0, layer_counts[s.model]), s.parameters,
                          s.name))
  if cfg.base_model and all(s.model != cfg.base_model for s in sources):
    sources.append(Source(cfg.base_model, (0, layer_counts[cfg.base_model]),
                          {}, cfg.base_model))
  counts = {s.name: s.layer_range[1] for s in sources}
  if len(set(counts.values())) > 1:
    raise ValueError(f'All models must have the same number of layers in the '
                     f'`models:` form, got {counts}; use `slices:` to pick '
                     'layer ranges.')
  return [Slice(sources, None, {})]


def _first_setting(param: str, scopes: Sequence[Mapping[str, Any]], t: float,
                   name: str) -> Any:
  """The value of ``param`` from the first scope that yields one (§20.5).

  Scopes go from most to least specific; a scope whose setting evaluates to
  nothing for this tensor (e.g. no filter matches) falls through to the next.
  Returns `_MISSING` if none yields a value.
  """
  for scope in scopes:
    if param in scope:
      val = evaluate_setting(scope[param], t, name)
      if val is not _MISSING:
        return val
  return _MISSING


def _resolve_tensor_params(spec: MethodSpec, cfg: MergeConfig, sl: Slice,
                           out_name: str, in_names: Sequence[str],
                           base_index: int | None, t: float,
                           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  shared = {}
  all_shared = {**spec.shared, **MERGEJAX_SHARED}
  for p, default in all_shared.items():
    val = _first_setting(p, (sl.parameters, cfg.parameters), t, out_name)
    if val is _MISSING:
      if default is REQUIRED:
        raise ValueError(f'merge_method {cfg.merge_method!r} needs parameter '
                         f'{p!r} (tensor {out_name}); set it under '
                         '`parameters:`.')
      val = default
    shared[p] = _validate(p, val, default)
  per_model = []
  for i, (src, name) in enumerate(zip(sl.sources, in_names)):
    vals = {}
    if spec.per_model_scope == 'non_base' and i == base_index:
      per_model.append(vals)
      continue
    for p, default in spec.per_model.items():
      val = _first_setting(p, (src.parameters, sl.parameters, cfg.parameters),
                           t, name)
      if val is _MISSING:
        if default is REQUIRED:
          raise ValueError(f'merge_method {cfg.merge_method!r} needs '
                           f'parameter {p!r} for model {src.name!r} (tensor '
                           f'{name}); set it in that model\'s `parameters:` '
                           'or at the top level.')
        val = default
      vals[p] = val if default is None else _validate(p, val, default)
    per_model.append(vals)
  return shared, per_model


def plan(cfg: MergeConfig, tensor_names: Callable[[str], Sequence[str]],
         model_configs: Callable[[str], Mapping[str, Any] | None]
         ) -> tuple[list[TensorTask], int]:
  """Expands a config into one `TensorTask` per output tensor.

  Args:
    cfg: the parsed config.
    tensor_names: ``model_path -> names of its tensors``.
    model_configs: ``model_path -> config.json dict`` (or None).

  Returns:
    ``(tasks, n_layers)``: the tasks in output order (pre-weights, layers,
    post-weights) and the number of output layers.
  """
  spec = cfg.spec
  counts = {m: num_layers(tensor_names(m), model_configs(m))
            for m in cfg.referenced_models()}
  slices = normalize_slices(cfg, counts)
  tasks = []

  def base_index(sl):
    b = sl.base_model or cfg.base_model
    if spec.base == 'ignored' or b is None:
      if spec.base == 'required':
        raise ValueError(f'merge_method {cfg.merge_method!r} needs a '
                         'base_model.')
      return None
    for i, s in enumerate(sl.sources):
      if s.model == b:
        return i
    raise ValueError(f'The base model {b!r} is not among the sources of a '
                     'slice; list it with the same layer_range as the others.')

  def check_inputs(sl):
    if spec.n_inputs is not None and len(sl.sources) != spec.n_inputs:
      raise ValueError(f'merge_method {cfg.merge_method!r} takes exactly '
                       f'{spec.n_inputs} models (base included), got '
                       f'{[s.name for s in sl.sources]}.')

  def add(out_name, sl, in_names, t):
    bi = base_index(sl)
    shared, per_model = _resolve_tensor_params(spec, cfg, sl, out_name,
                                               in_names, bi, t)
    tasks.append(TensorTask(out_name, [(s.model, n) for s, n in
                                       zip(sl.sources, in_names)], bi, t,
                            shared, per_model))

  for sl in slices:
    check_inputs(sl)
  # Non-layer tensors, from the reference model of the first slice.
  ref_first = (slices[0].base_model or cfg.base_model
               if spec.base != 'ignored' else None) or slices[0].sources[0].model
  ref_last = (slices[-1].base_model or cfg.base_model
              if spec.base != 'ignored' else None) or slices[-1].sources[0].model
  names_first = list(tensor_names(ref_first))
  non_layer = [n for n in names_first if split_layer_name(n) is None]
  pre = [n for n in non_layer if _PRE_RE.search(n)]
  post = [n for n in non_layer if not _PRE_RE.search(n)]
  for n in pre:
    add(n, slices[0], [n] * len(slices[0].sources), 0.0)
  offset = 0
  for sl in slices:
    ref = (sl.base_model or cfg.base_model
           if spec.base != 'ignored' else None) or sl.sources[0].model
    ref_src = next(s for s in sl.sources if s.model == ref)
    by_layer: dict[int, list[tuple[str, str]]] = {}
    for n in tensor_names(ref):
      parts = split_layer_name(n)
      if parts is not None:
        by_layer.setdefault(parts[1], []).append((parts[0], parts[2]))
    length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    for i in range(length):
      t = i / (length - 1) if length > 1 else 1.0
      for prefix, suffix in by_layer.get(ref_src.layer_range[0] + i, []):
        out = f'{prefix}{offset + i}{suffix}'
        ins = [f'{prefix}{s.layer_range[0] + i}{suffix}' for s in sl.sources]
        add(out, sl, ins, t)
    offset += length
  if ref_last != ref_first:
    post = [n for n in tensor_names(ref_last)
            if split_layer_name(n) is None and not _PRE_RE.search(n)]
  for n in post:
    add(n, slices[-1], [n] * len(slices[-1].sources), 0.0)
  return tasks, offset


# The config keys that hold the number of transformer layers.
LAYER_COUNT_KEYS = ('num_hidden_layers', 'n_layer', 'num_layers', 'n_layers')


def output_config(cfg: MergeConfig, model_configs: Callable[[str], Any],
                  n_layers: int, out_dtype: str | None) -> dict[str, Any] | None:
  """``config.json`` for the output: the base's (else the first model's), with
  ``num_hidden_layers`` and ``torch_dtype`` updated as mergekit does."""
  ref = cfg.base_model or cfg.referenced_models()[0]
  conf = model_configs(ref)
  if conf is None:
    return None
  conf = copy.deepcopy(dict(conf))
  if out_dtype is not None:
    conf['torch_dtype'] = out_dtype
    if 'dtype' in conf:  # transformers >= 4.56 spelling
      conf['dtype'] = out_dtype
  if cfg.slices is not None:
    # Every spelling of the layer count (GPT-2's n_layer, ...), so a stacked
    # model's config describes the tensors written; also in nested configs
    # (text_config of multimodal models).
    for c in [conf] + [v for v in conf.values() if isinstance(v, dict)]:
      for key in LAYER_COUNT_KEYS:
        if isinstance(c.get(key), int):
          c[key] = n_layers
  return conf
