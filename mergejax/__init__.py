"""mergejax: composable, jit-compiled model merging in JAX.

A merge is a `MergeTransformation` built from primitives and run with `merge`:

>>> import jax.numpy as jnp, mergejax as mj
>>> base = {'w': jnp.zeros(2)}
>>> fts = [{'w': jnp.array([1., 2.])}, {'w': jnp.array([3., 2.])}]
>>> mj.merge(mj.methods.task_arithmetic(lambda_=0.5), base, fts)['w']
Array([2., 2.], dtype=float32)
"""

from mergejax._src.base import chain
from mergejax._src.base import EmptyState
from mergejax._src.base import identity
from mergejax._src.base import MergeTransformation
from mergejax._src.base import named_chain
from mergejax._src.base import static_fn
from mergejax._src.combine import masked
from mergejax._src.combine import partition
from mergejax._src.merge import merge
from mergejax._src.merge import stack_models
from mergejax._src.paths import layer_index
from mergejax._src.paths import leaf_paths
from mergejax._src.reduce import apply_updates
from mergejax._src.reduce import mean
from mergejax._src.reduce import scale
from mergejax._src.reduce import task_vectors
from mergejax._src.reduce import weighted_sum
from mergejax._src.select import kth_largest_magnitude
from mergejax._src.select import topk_mask
# --- sparsify / consensus primitives (trim, elect_sign, disjoint_merge, dare, ...)
from mergejax._src.consensus import disjoint_merge
from mergejax._src.consensus import elect_sign
from mergejax._src.select import topk_masks
from mergejax._src.sparsify import breadcrumbs
from mergejax._src.sparsify import dare
from mergejax._src.sparsify import della
from mergejax._src.sparsify import trim
# --- interpolation primitives (lerp, slerp, nuslerp, multislerp, karcher, ...)
from mergejax._src.interpolate import arcee_fusion
from mergejax._src.interpolate import karcher
from mergejax._src.interpolate import lerp
from mergejax._src.interpolate import model_stock
from mergejax._src.interpolate import model_stock_ratio
from mergejax._src.interpolate import multislerp
from mergejax._src.interpolate import nearswap
from mergejax._src.interpolate import nuslerp
from mergejax._src.interpolate import slerp
# --- sweeps (config overrides, vmapped hyperparameter sweeps)
from mergejax._src.sweep import product
from mergejax._src.sweep import run_sweep
from mergejax._src.sweep import sweep
from mergejax._src.sweep import zip_
from mergejax._src.sweep import zip_sweep
# --- subspace / mask primitives (svd_basis, project, layer_scale, masks)
from mergejax._src.continual import opcm_init
from mergejax._src.continual import opcm_params
from mergejax._src.continual import opcm_update
from mergejax._src.continual import OPCMState
from mergejax._src.layerwise import layer_scale
from mergejax._src.lora import check_lora
from mergejax._src.lora import LoRA
from mergejax._src.lora import lora_delta
from mergejax._src.lora import lora_from_delta
from mergejax._src.lora import merge_lora
from mergejax._src.masks import consensus_mask
from mergejax._src.masks import magnitude_mask
from mergejax._src.masks import tall_masks
from mergejax._src.rtsvm import outlier_reweight
from mergejax._src.rtsvm import tsv_reduce
from mergejax._src.subspace import from_basis
from mergejax._src.subspace import project
from mergejax._src.subspace import svd_basis
from mergejax._src.subspace import SVDBasis
# --- end of primitives

from mergejax import methods  # pylint: disable=g-bad-import-order
from mergejax import distributed  # pylint: disable=g-bad-import-order
from mergejax import sharding  # pylint: disable=g-bad-import-order
from mergejax._src.sharding import sharded_merge  # pylint: disable=g-bad-import-order

__version__ = '0.1.0'


def __getattr__(name):
  # `mergejax.permute` pulls in scipy.optimize, flax and optax (~0.4 s); the
  # CLI and plain merges do not need it, so it loads on first use.
  if name == 'permute':
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module('mergejax.permute')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
