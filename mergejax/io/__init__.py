"""Checkpoint IO: Hugging Face safetensors (sharded, lazy, atomic), orbax, layouts.

>>> import tempfile, numpy as np, mergejax.io as mio
>>> d = tempfile.mkdtemp() + '/ckpt'
>>> mio.save_checkpoint(d, {'lm_head.weight': np.ones((4, 2), np.float32)},
...                     dtype='bfloat16')
>>> mio.load_checkpoint(d)['lm_head.weight'].dtype
dtype(bfloat16)
"""

from mergejax._src.io.atomic import atomic_output_dir
from mergejax._src.io.atomic import remove_stale_tmp_dirs
from mergejax._src.io.layout import flax_to_hf
from mergejax._src.io.layout import GENERIC_RULES
from mergejax._src.io.layout import hf_to_flax
from mergejax._src.io.layout import LLAMA_RULES
from mergejax._src.io.layout import NameRule
from mergejax._src.io.orbax_io import load_orbax
from mergejax._src.io.orbax_io import save_orbax
from mergejax._src.io.safetensors_io import CheckpointReader
from mergejax._src.io.safetensors_io import DEFAULT_SHARD_SIZE
from mergejax._src.io.safetensors_io import load_checkpoint
from mergejax._src.io.safetensors_io import parse_dtype
from mergejax._src.io.safetensors_io import save_checkpoint
from mergejax._src.io.safetensors_io import ShardedWriter
from mergejax._src.io.safetensors_io import TensorSpec
