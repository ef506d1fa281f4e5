"""The ``mergejax`` command line: mergekit-compatible YAML merges, streamed.

``mergejax merge config.yml out_dir`` (or ``python -m mergejax.cli``) reads a
mergekit YAML config, merges the checkpoints it names tensor by tensor with the
matching `mergejax.methods` transformation and writes a sharded safetensors
checkpoint atomically. `run_merge` is the same from Python.

>>> from mergejax import cli
>>> cli.parse_size('2GB')
2000000000
"""

from mergejax.cli._main import build_jobs
from mergejax.cli._main import default_compile_cache
from mergejax.cli._main import main
from mergejax.cli._main import parse_size
from mergejax.cli._main import run_merge

__all__ = [
    'build_jobs', 'default_compile_cache', 'main', 'parse_size', 'run_merge',
]
