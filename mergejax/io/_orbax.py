"""Flax/orbax checkpoints, and restoring them (or safetensors) onto shardings."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


def save_orbax(path: str, params: Any, *, overwrite: bool = False) -> None:
  """Saves a pytree with orbax (``StandardCheckpointer``; atomic by orbax).

  Orbax writes into a temporary directory and renames it when the write is
  complete, so a killed save leaves no checkpoint that restores. Dangerous
  paths are refused (`atomic.check_output_path`), and ``overwrite`` replaces
  only an existing orbax checkpoint, never another directory.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mergejax.io import _atomic as atomic  # pylint: disable=g-import-not-at-top
  path = atomic.check_output_path(path)
  if (overwrite and os.path.isdir(path) and os.listdir(path) and
      not any(os.path.exists(os.path.join(path, m))
              for m in ('_CHECKPOINT_METADATA', '_METADATA'))):
    raise FileExistsError(
        f'{path} exists and is not an orbax checkpoint, so overwrite=True '
        'will not delete it; remove it yourself or choose a new path.')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
    ckptr.wait_until_finished()


def load_orbax(path: str, abstract: Any = None, *, shardings: Any = None
               ) -> Any:
  """Restores an orbax checkpoint, optionally straight onto shardings.

  Args:
    path: the checkpoint directory written by `save_orbax`.
    abstract: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding=``) or of
      arrays giving the structure; None restores with the stored metadata.
    shardings: when ``abstract`` is None, a ``Sharding`` for every leaf or a
      function ``(path, shape) -> Sharding``; each leaf is restored onto it.

  Returns:
    The restored pytree.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mergejax._src import paths  # pylint: disable=g-import-not-at-top
  from mergejax.io import _safetensors as safetensors_io  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    if abstract is None:
      meta = ckptr.metadata(path)
      tree = getattr(meta, 'item_metadata', meta)
      tree = getattr(tree, 'tree', tree)
      if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])

      def to_abstract(p, m):
        return jax.ShapeDtypeStruct(
            tuple(m.shape), m.dtype,
            sharding=safetensors_io.resolve_sharding(shardings, p, tuple(m.shape)))
      abstract = paths.tree_map_with_path(to_abstract, tree)
    else:
      abstract = jax.tree.map(
          lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
          jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                               sharding=getattr(x, 'sharding', None)), abstract)
    return ckptr.restore(path, abstract)
