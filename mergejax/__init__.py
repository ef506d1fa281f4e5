"""mergejax: composable, jit-compiled model merging in JAX.

A merge is a `MergeTransformation` -- an ``(init, update)`` pair in the style
of optax's ``GradientTransformation`` -- built from the building blocks in
`mergejax.transforms` or taken whole from `mergejax.methods`, and run with
`merge`:

>>> import jax.numpy as jnp, mergejax as mj
>>> base = {'w': jnp.zeros(2)}
>>> fts = [{'w': jnp.array([1., 2.])}, {'w': jnp.array([3., 2.])}]
>>> mj.merge(mj.methods.task_arithmetic(lambda_=0.5), base, fts)['w']
Array([2., 2.], dtype=float32)

Subpackages: `transforms` (building blocks), `methods` (named algorithms),
`stats` (Fisher and Gram statistics for data-informed merges),
`permute` (permutation alignment), `parallel` (meshes, multi-host, streaming),
`search` (populations of merge candidates scored in one compiled call),
`io` (checkpoints), `cli` (the ``mergejax`` command and mergekit YAML) and
`testing` (helpers for tests of merge code).
"""

import importlib as _importlib
import warnings as _warnings

# pylint: disable=g-importing-member
from mergejax._src.base import chain
from mergejax._src.base import EmptyState
from mergejax._src.base import identity
from mergejax._src.base import MergeTransformation
from mergejax._src.base import named_chain
from mergejax._src.base import static_fn
from mergejax._src.checks import check_models
from mergejax._src.checks import hparam as check_hparam
from mergejax._src.combine import masked
from mergejax._src.combine import partition
from mergejax._src.merge import merge
from mergejax._src.merge import stack_models
from mergejax._src.paths import flatten_to_dict
from mergejax._src.paths import layer_index
from mergejax._src.paths import leaf_paths
# pylint: enable=g-importing-member
from mergejax import io  # pylint: disable=g-bad-import-order
from mergejax import methods  # pylint: disable=g-bad-import-order
from mergejax import parallel  # pylint: disable=g-bad-import-order
from mergejax import stats  # pylint: disable=g-bad-import-order
from mergejax import transforms  # pylint: disable=g-bad-import-order

__version__ = '0.2.0'

__all__ = (
    'MergeTransformation', 'EmptyState', 'chain', 'named_chain', 'identity',
    'static_fn', 'masked', 'partition', 'merge', 'stack_models', 'leaf_paths',
    'flatten_to_dict', 'layer_index', 'check_models', 'check_hparam',
    'transforms', 'methods', 'stats', 'permute', 'parallel', 'search', 'io',
    'cli', 'testing',
)

# Subpackages loaded on first use: `permute` pulls in scipy.optimize, flax and
# optax (~0.4 s) and `cli` pyyaml; plain merges need neither, nor `search`.
_LAZY = ('permute', 'search', 'cli', 'testing')

# Names the top level exported before the building blocks moved to
# `mergejax.transforms`; each resolves, with a DeprecationWarning, for one
# release. Values are (module, name) of the new home.
_MOVED = {
    'apply_updates': ('mergejax.transforms', 'apply_to_base'),
    'arcee_fusion': ('mergejax.transforms', 'arcee_fusion_reduce'),
    'breadcrumbs': ('mergejax.transforms', 'breadcrumbs_prune'),
    'della': ('mergejax.transforms', 'della_prune'),
    'karcher': ('mergejax.transforms', 'karcher_reduce'),
    'lerp': ('mergejax.transforms', 'lerp_reduce'),
    'model_stock': ('mergejax.transforms', 'model_stock_reduce'),
    'multislerp': ('mergejax.transforms', 'multislerp_reduce'),
    'nearswap': ('mergejax.transforms', 'nearswap_reduce'),
    'nuslerp': ('mergejax.transforms', 'nuslerp_reduce'),
    'slerp': ('mergejax.transforms', 'slerp_reduce'),
    'tall_masks': ('mergejax.transforms', 'compute_tall_masks'),
    'sharded_merge': ('mergejax.parallel', 'sharded_merge'),
    'sharding': ('mergejax', 'parallel'),
    'distributed': ('mergejax', 'parallel'),
}
_MOVED.update({n: ('mergejax.transforms', n) for n in (
    'check_lora', 'consensus_mask', 'dare', 'disjoint_merge', 'elect_sign',
    'from_basis', 'kth_largest_magnitude', 'layer_scale', 'LoRA',
    'lora_delta', 'lora_from_delta', 'magnitude_mask', 'mean', 'merge_lora',
    'model_stock_ratio', 'opcm_init', 'opcm_params', 'opcm_update',
    'OPCMState', 'outlier_reweight', 'project', 'scale', 'svd_basis',
    'SVDBasis', 'task_vectors', 'topk_mask', 'topk_masks', 'trim',
    'tsv_reduce', 'weighted_sum')})

# Experiment tooling left the installed package.
_REMOVED = {n: 'experiments.tools.sweep' for n in (
    'sweep', 'product', 'zip_', 'zip_sweep', 'run_sweep')}
_REMOVED.update(plotting='experiments.tools.plotting', zoo='experiments.zoo')


def __getattr__(name):
  if name in _LAZY:
    return _importlib.import_module(f'mergejax.{name}')
  if name in _MOVED:
    module, new = _MOVED[name]
    _warnings.warn(f'mergejax.{name} is deprecated; use {module}.{new}.',
                   DeprecationWarning, stacklevel=2)
    return getattr(_importlib.import_module(module), new)
  if name in _REMOVED:
    raise AttributeError(
        f'mergejax.{name} moved out of the installed package to '
        f'{_REMOVED[name]} in the repository checkout (install it with '
        "`pip install -e '.[experiments]'` and import it from there).")
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(__all__))
