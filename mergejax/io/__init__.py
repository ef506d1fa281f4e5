"""Checkpoint IO: Hugging Face safetensors (sharded, lazy, atomic), orbax, layouts.

>>> import tempfile, numpy as np, mergejax.io as mio
>>> d = tempfile.mkdtemp() + '/ckpt'
>>> mio.save_checkpoint(d, {'lm_head.weight': np.ones((4, 2), np.float32)},
...                     dtype='bfloat16')
>>> mio.load_checkpoint(d)['lm_head.weight'].dtype
dtype(bfloat16)
"""

from mergejax.io._atomic import atomic_output_dir
from mergejax.io._atomic import remove_stale_tmp_dirs
from mergejax.io._layout import flax_to_hf
from mergejax.io._layout import GENERIC_RULES
from mergejax.io._layout import hf_to_flax
from mergejax.io._layout import LLAMA_RULES
from mergejax.io._layout import NameRule
from mergejax.io._lora import extract_lora
from mergejax.io._lora import LoraCheckpointReader
from mergejax.io._lora import LoraExtraction
from mergejax.io._lora import open_checkpoint
from mergejax.io._lora import read_lora
from mergejax.io._orbax import load_orbax
from mergejax.io._orbax import save_orbax
from mergejax.io._safetensors import CheckpointReader
from mergejax.io._safetensors import DEFAULT_SHARD_SIZE
from mergejax.io._safetensors import load_checkpoint
from mergejax.io._safetensors import parse_dtype
from mergejax.io._safetensors import save_checkpoint
from mergejax.io._safetensors import ShardedWriter
from mergejax.io._safetensors import TensorSpec
from mergejax.io._safetensors import verify_checkpoint

__all__ = (
    'atomic_output_dir', 'CheckpointReader', 'DEFAULT_SHARD_SIZE',
    'extract_lora', 'flax_to_hf', 'GENERIC_RULES', 'hf_to_flax', 'LLAMA_RULES',
    'LoraCheckpointReader', 'LoraExtraction', 'open_checkpoint', 'read_lora',
    'load_checkpoint', 'load_orbax', 'NameRule', 'parse_dtype',
    'remove_stale_tmp_dirs', 'save_checkpoint', 'save_orbax', 'ShardedWriter',
    'TensorSpec', 'verify_checkpoint',
)
