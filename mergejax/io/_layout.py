"""Hugging Face (PyTorch) <-> Flax parameter names and layouts, kept as data.

PyTorch ``nn.Linear.weight`` is ``(out, in)``; a Flax ``Dense`` kernel is
``(in, out)``. Convolutions are ``(out, in, kh, kw)`` vs ``(kh, kw, in, out)``.
Embeddings are ``(vocab, hidden)`` in both. Each `NameRule` pairs an HF name
template with a Flax path template and the axis permutation that takes the HF
array to the Flax one; the inverse mapping is derived from the same rule, so
``flax_to_hf(hf_to_flax(x)) == x`` holds by construction (and is tested).

Template fields are written ``{name}``; a field matches one name segment
(no ``.`` or ``/``), and ``{name*}`` matches several, with ``.`` in HF names
and ``/`` in Flax paths.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class NameRule:
  """One HF-name <-> Flax-path correspondence.

  Attributes:
    hf: HF name template, e.g. ``'model.layers.{i}.mlp.{proj}.weight'``.
    flax: Flax path template, e.g. ``'model/layers_{i}/mlp/{proj}/kernel'``.
    perm: axes permutation from the HF array to the Flax array (``(1, 0)``
      transposes a linear weight), or None to keep the layout.
    ndim: only match tensors of this rank (None: any).
  """
  hf: str
  flax: str
  perm: tuple[int, ...] | None = None
  ndim: int | None = None


def _template_regex(template: str, sep: str) -> re.Pattern[str]:
  out, pos = [], 0
  for m in re.finditer(r'\{(\w+)(\*?)\}', template):
    out.append(re.escape(template[pos:m.start()]))
    star = m.group(2) == '*'
    out.append(f'(?P<{m.group(1)}>.+?)' if star else f'(?P<{m.group(1)}>[^./]+)')
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile('^' + ''.join(out) + '$')


def _fill(template: str, fields: Mapping[str, str], src_sep: str,
          dst_sep: str) -> str:
  def sub(m):
    v = fields[m.group(1)]
    return v.replace(src_sep, dst_sep) if m.group(2) else v
  return re.sub(r'\{(\w+)(\*?)\}', sub, template)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(perm))


# Llama / Mistral / Qwen2-style decoder (transformers' LlamaForCausalLM names;
# the Flax side follows transformers' FlaxLlamaForCausalLM module names).
LLAMA_RULES: tuple[NameRule, ...] = (
    NameRule('model.embed_tokens.weight', 'model/embed_tokens/embedding'),
    NameRule('model.layers.{i}.self_attn.{proj}.weight',
             'model/layers/{i}/self_attn/{proj}/kernel', (1, 0), 2),
    NameRule('model.layers.{i}.self_attn.{proj}.bias',
             'model/layers/{i}/self_attn/{proj}/bias', None, 1),
    NameRule('model.layers.{i}.mlp.{proj}.weight',
             'model/layers/{i}/mlp/{proj}/kernel', (1, 0), 2),
    NameRule('model.layers.{i}.{norm}.weight',
             'model/layers/{i}/{norm}/weight', None, 1),
    NameRule('model.norm.weight', 'model/norm/weight', None, 1),
    NameRule('lm_head.weight', 'lm_head/kernel', (1, 0), 2),
)

# Fallbacks for other architectures: linear weights transpose, conv weights
# move channels last, embeddings and 1-D tensors keep their layout.
GENERIC_RULES: tuple[NameRule, ...] = (
    NameRule('{m*}.embed_tokens.weight', '{m*}/embed_tokens/embedding'),
    NameRule('{m*}.embeddings.weight', '{m*}/embeddings/embedding'),
    NameRule('{m*}.weight', '{m*}/kernel', (1, 0), 2),
    NameRule('{m*}.weight', '{m*}/kernel', (2, 3, 1, 0), 4),
    NameRule('{m*}.weight', '{m*}/weight', None, None),
    NameRule('{m*}.bias', '{m*}/bias'),
    NameRule('{m*}', '{m*}'),
)


def _apply(name: str, shape: Sequence[int], rules: Sequence[NameRule],
           to_flax: bool) -> tuple[str, tuple[int, ...] | None]:
  for r in rules:
    src, dst = (r.hf, r.flax) if to_flax else (r.flax, r.hf)
    src_sep, dst_sep = ('.', '/') if to_flax else ('/', '.')
    m = _template_regex(src, src_sep).match(name)
    if m is None or (r.ndim is not None and len(shape) != r.ndim):
      continue
    perm = r.perm if (r.perm is None or to_flax) else _inverse(r.perm)
    return _fill(dst, m.groupdict(), src_sep, dst_sep), perm
  raise ValueError(f'No layout rule maps {"HF name" if to_flax else "Flax path"}'
                   f' {name!r} (shape {tuple(shape)}); add a NameRule for it.')


def hf_to_flax(tensors: Mapping[str, Any],
               rules: Sequence[NameRule] = LLAMA_RULES + GENERIC_RULES
               ) -> dict[str, Any]:
  """Maps ``{hf_name: array}`` to a nested Flax params dict.

  Example:
    >>> import numpy as np
    >>> p = hf_to_flax({'model.layers.0.mlp.up_proj.weight': np.zeros((8, 4))})
    >>> p['model']['layers']['0']['mlp']['up_proj']['kernel'].shape
    (4, 8)
  """
  nested: dict[str, Any] = {}
  for name, x in tensors.items():
    path, perm = _apply(name, np.shape(x), rules, to_flax=True)
    if perm is not None:
      x = x.transpose(perm)
    node = nested
    *parents, leaf = path.split('/')
    for i, p in enumerate(parents):
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(
            f'HF tensor {name!r} maps to Flax path {path!r}, below '
            f'{"/".join(parents[:i + 1])!r}, which another tensor maps to: a '
            'Flax tree cannot hold both; rename one with a NameRule.')
    if leaf in node:
      raise ValueError(f'Two HF tensors map to Flax path {path!r} (the second '
                       f'is {name!r}); rename one with a NameRule.')
    node[leaf] = x
  return nested


def flax_to_hf(params: Any,
               rules: Sequence[NameRule] = LLAMA_RULES + GENERIC_RULES
               ) -> dict[str, Any]:
  """Inverse of `hf_to_flax`: a (nested) Flax params tree to ``{hf_name: array}``."""
  from mergejax._src import paths  # pylint: disable=g-import-not-at-top
  out = {}
  for path, x in paths.flatten_to_dict(params).items():
    name, perm = _apply(path, np.shape(x), rules, to_flax=False)
    if perm is not None:
      x = x.transpose(perm)
    if name in out:
      raise ValueError(f'Two Flax leaves map to HF name {name!r}.')
    out[name] = x
  return out
