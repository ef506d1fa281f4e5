"""LoRA adapters in PEFT's format: extraction from a fine-tune, and reading.

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with, per adapted linear layer ``<module>``,
``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``. The layer's weight ``W [out, in]`` (Hugging
Face orientation) becomes ``W + (alpha / r) B A`` (``alpha / sqrt(r)`` with
``use_rslora``; transposed for ``fan_in_fan_out`` layers such as GPT-2's
``Conv1D``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from mergejax.io import _atomic as atomic
from mergejax.io import _safetensors as st

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'
_EMBEDDING = re.compile(r'(^|\.)(embed_tokens|wte|wpe|lm_head|embed_out|'
                        r'word_embeddings)(\.|$)')


class LoraExtraction(NamedTuple):
  """What `extract_lora` wrote.

  Attributes:
    modules: the adapted modules, in checkpoint order.
    errors: ``{module: ||W_ft - W_base - B A||_F / ||W_ft - W_base||_F}``
      (0 where the fine-tune left the weight unchanged).
    skipped: tensors that differ between the models but are not adapted
      (vectors such as norms and biases, embeddings unless included, and
      tensors ``include`` leaves out): the adapter does not carry them.

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
      2022. https://arxiv.org/abs/2106.09685
  """
  modules: list[str]
  errors: dict[str, float]
  skipped: list[str]


def extract_lora(base: str, finetuned: str, out_dir: str, *, rank: int,
                 include: Sequence[str] | None = None,
                 embeddings: bool = False, sv_epsilon: float = 0.0,
                 dtype: Any = None, overwrite: bool = False
                 ) -> LoraExtraction:
  """Extracts a rank-``rank`` LoRA adapter from a fine-tune (PEFT format).

  Every 2-D ``<module>.weight`` that differs between the two checkpoints
  gets ``B A``, the best rank-``rank`` approximation (truncated SVD in fp32,
  singular values split evenly) of its delta ``W_ft - W_base`` (the factorisation of
  `mergejax.transforms.lora_from_delta`, in PEFT's orientation), with
  ``lora_alpha = r`` so the scale is 1.
  Matrices smaller than the rank keep their full rank, and singular values
  at most ``sv_epsilon`` are dropped. As ``mergekit-extract-lora`` does, the
  config's ``r`` and ``lora_alpha`` are the largest rank written, and
  ``rank_pattern`` / ``alpha_pattern`` list the modules of other ranks (so
  every module's scale is 1). The directory is written atomically, like
  every checkpoint.

  Args:
    base: the base model's checkpoint directory.
    finetuned: the fine-tune's, with the same tensors.
    out_dir: the adapter directory to write.
    rank: the adapter's rank (at most each matrix's smaller side).
    include: ``fnmatch`` patterns of module names to adapt (None: all).
    embeddings: adapt embedding and output-head matrices too.
    sv_epsilon: drop singular values at most this (mergekit's
      ``--sv-epsilon``).
    dtype: the factors' dtype (None: the base's).
    overwrite: replace an existing ``out_dir``.

  Returns:
    A `LoraExtraction`.

  Example:
    >>> import tempfile, numpy as np, mergejax.io as mio
    >>> d = tempfile.mkdtemp()
    >>> w = np.eye(4, dtype=np.float32)
    >>> mio.save_checkpoint(d + '/base', {'fc.weight': w})
    >>> mio.save_checkpoint(d + '/ft', {'fc.weight': w + np.outer(w[0], w[1])})
    >>> mio.extract_lora(d + '/base', d + '/ft', d + '/lora', rank=1).errors
    {'fc': 0.0}

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
      2022. https://arxiv.org/abs/2106.09685
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f'extract_lora: rank must be a positive int, got '
                     f'{rank!r}.')
  rb, rf = st.CheckpointReader(base), st.CheckpointReader(finetuned)
  missing = sorted(set(rb.keys()) ^ set(rf.keys()))
  if missing:
    raise ValueError(f'extract_lora: {base} and {finetuned} hold different '
                     f'tensors (e.g. {missing[:3]}); a LoRA adapts the same '
                     'architecture.')
  tensors, modules, errors, ranks, skipped = {}, [], {}, {}, []
  for name in rb.keys():
    if rb.shape(name) != rf.shape(name):
      raise ValueError(f'extract_lora: tensor {name!r} is {rb.shape(name)} in '
                       f'the base and {rf.shape(name)} in the fine-tune.')
    a = rb.read(name).astype(np.float32)
    delta = rf.read(name).astype(np.float32) - a
    changed = bool(np.any(delta != 0))
    module = name[:-len('.weight')] if name.endswith('.weight') else None
    adapt = (module is not None and delta.ndim == 2
             and (embeddings or not _EMBEDDING.search(module))
             and (include is None or any(fnmatch.fnmatch(module, p)
                                         for p in include)))
    if not adapt:
      if changed:
        skipped.append(name)
      continue
    if not changed:
      continue
    r = min(int(rank), *delta.shape)
    # Eckart-Young: the truncated SVD is the best rank-r approximation; the
    # singular values are split evenly between the factors.
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    if sv_epsilon > 0:
      r = max(1, min(r, int(np.sum(s > sv_epsilon))))
    sq = np.sqrt(s[:r])
    lora_b = u[:, :r] * sq[None]  # [out, r]
    lora_a = sq[:, None] * vh[:r]  # [r, in]
    err = np.linalg.norm(delta - lora_b @ lora_a) / np.linalg.norm(delta)
    out_dtype = st.parse_dtype(dtype) if dtype is not None else rb.dtype(name)
    tensors[f'{_PREFIX}{module}.lora_A.weight'] = lora_a.astype(out_dtype)
    tensors[f'{_PREFIX}{module}.lora_B.weight'] = lora_b.astype(out_dtype)
    modules.append(module)
    ranks[module] = r
    errors[module] = float(err)
  if not modules:
    raise ValueError(f'extract_lora: no 2-D weight differs between {base} and '
                     f'{finetuned}; there is nothing to extract.')
  top = max(ranks.values())
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': top,
      'lora_alpha': top, 'lora_dropout': 0.0, 'bias': 'none',
      'fan_in_fan_out': False, 'use_rslora': False,
      'target_modules': sorted({m.rsplit('.', 1)[-1] for m in modules}),
      # Modules of another rank: their own rank, and alpha = that rank.
      'rank_pattern': {m: r for m, r in ranks.items() if r != top},
      'alpha_pattern': {m: r for m, r in ranks.items() if r != top},
      'base_model_name_or_path': os.path.abspath(base),
  }
  specs = [st.TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
  with atomic.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    w = st.ShardedWriter(tmp, specs, max_shard_size=1 << 62,
                         file_name=ADAPTER_WEIGHTS)
    for k, v in tensors.items():
      w.write(k, v)
    with open(os.path.join(tmp, ADAPTER_CONFIG), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    w.finalize()
  return LoraExtraction(modules, errors, skipped)


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
  # PEFT matches a pattern against the end of the module name.
  for pat, v in patterns.items():
    if module == pat or module.endswith('.' + pat) or re.fullmatch(pat,
                                                                   module):
      return v
  return default


def read_lora(path: str) -> tuple[dict[str, Any], dict[str, tuple]]:
  """Reads a PEFT LoRA adapter: its config and ``{module: (A, B, scale)}``.

  Raises:
    ValueError: for a non-LoRA adapter, a missing factor or a shape mismatch.
  """
  cfg_path = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.exists(cfg_path):
    raise ValueError(f'{path} is not a PEFT adapter: no {ADAPTER_CONFIG}.')
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get('peft_type', 'LORA').upper() != 'LORA':
    raise ValueError(f'{path}: peft_type {config["peft_type"]!r} is not '
                     'LORA; only LoRA adapters can be merged.')
  reader = st.CheckpointReader(path)
  factors: dict[str, dict[str, np.ndarray]] = {}
  for k in reader.keys():
    m = re.fullmatch(r'(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?'
                     r'\.weight', k)
    if m is None:
      raise ValueError(f'{path}: tensor {k!r} is not a lora_A / lora_B weight '
                       '(modules_to_save and DoRA are not supported).')
    factors.setdefault(m.group(1), {})[m.group(2)] = reader.read(k)
  out = {}
  for module, ab in factors.items():
    if set(ab) != {'A', 'B'}:
      raise ValueError(f'{path}: module {module!r} has only lora_'
                       f'{"".join(ab)}.')
    a, b = ab['A'], ab['B']
    r = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
      raise ValueError(f'{path}: module {module!r} has lora_A {a.shape} and '
                       f'lora_B {b.shape}; expected [r, in] and [out, r].')
    alpha = _pattern_value(config.get('alpha_pattern') or {}, module,
                           config.get('lora_alpha', r))
    scale = alpha / (np.sqrt(r) if config.get('use_rslora') else r)
    out[module] = (a, b, float(scale))
  return config, out


class LoraCheckpointReader:
  """A `CheckpointReader` of a model with a PEFT LoRA adapter merged in.

  ``read(name)`` returns ``W + scale B A`` (in ``W``'s dtype, computed in
  fp32) for every adapted weight and the model's tensor otherwise, so a
  merge reads ``model+lora`` like any checkpoint.
  """

  def __init__(self, model: str, adapter: str):
    self.inner = st.CheckpointReader(model)
    self.path = f'{model}+{adapter}'
    self.adapter = adapter
    self.config_dict, self.factors = read_lora(adapter)
    self._fan_in_fan_out = bool(self.config_dict.get('fan_in_fan_out'))
    self._by_weight = {}
    for module, fac in self.factors.items():
      name = f'{module}.weight'
      if name not in self.inner:
        raise ValueError(f'LoRA adapter {adapter} adapts {module!r}, but '
                         f'{model} has no tensor {name!r}; is it the '
                         'adapter of this model?')
      a, b, _ = fac
      want = tuple(self.inner.shape(name))
      got = (a.shape[1], b.shape[0]) if self._fan_in_fan_out else (
          b.shape[0], a.shape[1])
      if want != got:
        raise ValueError(f'LoRA adapter {adapter}: {module!r} maps {got} but '
                         f'{name!r} is {want} in {model}.')
      self._by_weight[name] = fac

  def __contains__(self, name: str) -> bool:
    return name in self.inner

  def keys(self) -> list[str]:
    return self.inner.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return self.inner.shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.inner.dtype(name)

  def read(self, name: str, rows: int | None = None) -> np.ndarray:
    w = self.inner.read(name, rows)
    if name not in self._by_weight:
      return w
    a, b, scale = self._by_weight[name]
    delta = scale * (b.astype(np.float32) @ a.astype(np.float32))
    if self._fan_in_fan_out:
      delta = delta.T
    if rows is not None:
      delta = delta[:rows]
    return (w.astype(np.float32) + delta).astype(w.dtype)

  def read_all(self) -> dict[str, np.ndarray]:
    return {k: self.read(k) for k in self.keys()}

  def source_files(self) -> list[str]:
    """The model's files and the adapter's."""
    return self.inner.source_files() + [
        os.path.join(self.adapter, n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]

  def config(self) -> dict[str, Any] | None:
    return self.inner.config()

  def close(self) -> None:
    self.inner.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def split_reference(ref: str) -> list[str]:
  """``[path]``, or ``[model, adapter]`` for a ``model+adapter`` reference."""
  if '+' in ref and not os.path.exists(ref):
    return ref.rsplit('+', 1)
  return [ref]


def open_checkpoint(ref: str) -> Any:
  """A reader for ``path`` or ``path+adapter`` (a model with a LoRA merged in).

  A path that exists as given is a plain checkpoint even if it holds ``+``.
  """
  parts = split_reference(ref)
  if len(parts) == 2:
    return LoraCheckpointReader(*parts)
  return st.CheckpointReader(ref)
