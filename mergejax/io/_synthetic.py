"""Random Llama-shaped Hugging Face checkpoints, for tests and benchmarks.

Written tensor by tensor, so a multi-GB checkpoint never sits in memory.
``config.json`` names ``LlamaForCausalLM`` so that mergekit recognises the
architecture.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergejax.io import _atomic as atomic
from mergejax.io import _safetensors as st


def llama_config(hidden: int = 64, layers: int = 4, intermediate: int = 128,
                 vocab: int = 256, heads: int = 4, kv_heads: int | None = None,
                 tie_embeddings: bool = False, dtype: str = 'bfloat16'
                 ) -> dict[str, Any]:
  """A transformers ``LlamaConfig`` dict."""
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'hidden_size': hidden, 'intermediate_size': intermediate,
      'num_hidden_layers': layers, 'num_attention_heads': heads,
      'num_key_value_heads': kv_heads or heads, 'vocab_size': vocab,
      'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5,
      'hidden_act': 'silu', 'tie_word_embeddings': tie_embeddings,
      'torch_dtype': dtype, 'rope_theta': 10000.0,
      'bos_token_id': 1, 'eos_token_id': 2,
  }


def llama_specs(config: dict[str, Any], dtype: Any = None
                ) -> list[st.TensorSpec]:
  """Tensor names and (PyTorch-layout) shapes of a Llama checkpoint."""
  h, i = config['hidden_size'], config['intermediate_size']
  v, n = config['vocab_size'], config['num_hidden_layers']
  hd = h // config['num_attention_heads']
  kv = config['num_key_value_heads'] * hd
  dt = np.dtype(st.parse_dtype(dtype or config.get('torch_dtype', 'float32')))
  specs = [st.TensorSpec('model.embed_tokens.weight', (v, h), dt)]
  for l in range(n):
    p = f'model.layers.{l}.'
    specs += [
        st.TensorSpec(p + 'input_layernorm.weight', (h,), dt),
        st.TensorSpec(p + 'self_attn.q_proj.weight', (h, h), dt),
        st.TensorSpec(p + 'self_attn.k_proj.weight', (kv, h), dt),
        st.TensorSpec(p + 'self_attn.v_proj.weight', (kv, h), dt),
        st.TensorSpec(p + 'self_attn.o_proj.weight', (h, h), dt),
        st.TensorSpec(p + 'post_attention_layernorm.weight', (h,), dt),
        st.TensorSpec(p + 'mlp.gate_proj.weight', (i, h), dt),
        st.TensorSpec(p + 'mlp.up_proj.weight', (i, h), dt),
        st.TensorSpec(p + 'mlp.down_proj.weight', (h, i), dt),
    ]
  specs.append(st.TensorSpec('model.norm.weight', (h,), dt))
  if not config.get('tie_word_embeddings'):
    specs.append(st.TensorSpec('lm_head.weight', (v, h), dt))
  return specs


def write_random_llama(path: str, config: dict[str, Any], *, seed: int = 0,
                       base_seed: int | None = None, delta_scale: float = 0.1,
                       max_shard_size: int = st.DEFAULT_SHARD_SIZE) -> None:
  """Writes a random Llama checkpoint to ``path`` (atomically).

  Args:
    path: output directory.
    config: from `llama_config`.
    seed: this model's seed.
    base_seed: if given, the tensors are the ``base_seed`` model's plus
      ``delta_scale`` times fresh noise (a "fine-tune" of that base).
    delta_scale: relative size of the fine-tune deltas.
    max_shard_size: bytes per shard.
  """
  specs = llama_specs(config)
  with atomic.atomic_output_dir(path, overwrite=True) as tmp:
    w = st.ShardedWriter(tmp, specs, max_shard_size=max_shard_size)
    for j, s in enumerate(specs):
      if base_seed is None:
        x = _tensor(seed, j, s.shape)
      else:
        x = _tensor(base_seed, j, s.shape) + delta_scale * _tensor(
            seed + 7919, j, s.shape)
      w.write(s.name, x.astype(s.dtype))
    w.finalize(config)


def _tensor(seed: int, j: int, shape) -> np.ndarray:
  rng = np.random.default_rng([seed, j])
  scale = 1.0 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
  out = rng.standard_normal(shape, dtype=np.float32)
  out *= scale
  return out
