"""Permutation alignment: specs, matching, PLeaS, REPAIR and barriers.

Models trained from different initialisations are aligned (their hidden units
permuted onto a reference) before they can be averaged.

>>> import jax, jax.numpy as jnp
>>> from mergejax import permute
>>> spec = permute.mlp_spec(1)
>>> sorted(spec.groups)
['P_0']
"""

from mergejax.permute._builders import cnn_spec
from mergejax.permute._builders import mlp_spec
from mergejax.permute._builders import resnet_spec
from mergejax.permute._builders import transformer_spec
from mergejax.permute._spec import apply_permutation
from mergejax.permute._spec import check_permutations
from mergejax.permute._spec import check_spec
from mergejax.permute._spec import compose
from mergejax.permute._spec import identity_permutations
from mergejax.permute._spec import inverse
from mergejax.permute._spec import PermutationSpec
from mergejax.permute._spec import random_permutations
from mergejax.permute import models
from mergejax.permute._align import permute_align
from mergejax.permute._align import PermuteAlignState
from mergejax.permute._matching import MatchingResult
from mergejax.permute._matching import objective
from mergejax.permute._matching import weight_matching
from mergejax.permute._solvers import sinkhorn
from mergejax.permute._solvers import solve_assignment
from mergejax.permute._infer import describe_difference
from mergejax.permute._infer import infer_spec
from mergejax.permute._infer import same_groups
from mergejax.permute._evaluate import activation_matching
from mergejax.permute._evaluate import activation_statistics
from mergejax.permute._evaluate import Barrier
from mergejax.permute._evaluate import interpolation_barrier
from mergejax.permute._evaluate import lerp_params
from mergejax.permute._evaluate import repair
from mergejax.permute._evaluate import reset_batch_stats
from mergejax.permute._lock import lock_report
from mergejax.permute._lock import LockReport
from mergejax.permute._lock import merge_lock
from mergejax.permute._lock import MergeLockResult
from mergejax.permute._lock import unlock
from mergejax.permute._pleas import pleas
from mergejax.permute._pleas import PleasResult
from mergejax.permute._pleas_networks import cnn_network
from mergejax.permute._pleas_networks import mlp_network
from mergejax.permute._pleas_networks import PleasLayer
from mergejax.permute._pleas_networks import PleasNetwork
from mergejax.permute._pleas_networks import resnet_network
from mergejax.permute._pleas_ratios import choose_ratios
from mergejax.permute._pleas_ratios import LayerDims
from mergejax.permute._pleas_ratios import merged_size
from mergejax.permute._matching import merge_many
from mergejax.permute._learned import permutation_matrices
from mergejax.permute._learned import sinkhorn_matching
from mergejax.permute._learned import SinkhornMatchingResult
from mergejax.permute._learned import soft_apply_permutation
from mergejax.permute._learned import ste_matching

__all__ = (
    'activation_matching', 'activation_statistics', 'apply_permutation',
    'Barrier', 'check_permutations', 'check_spec', 'choose_ratios',
    'cnn_network', 'cnn_spec',
    'compose', 'describe_difference', 'identity_permutations', 'infer_spec',
    'interpolation_barrier', 'inverse', 'LayerDims', 'lerp_params',
    'lock_report', 'LockReport', 'merge_lock', 'MergeLockResult',
    'MatchingResult', 'merge_many', 'merged_size', 'mlp_network', 'mlp_spec',
    'models',
    'objective', 'permutation_matrices', 'PermutationSpec', 'permute_align',
    'PermuteAlignState', 'pleas', 'PleasLayer', 'PleasNetwork', 'PleasResult',
    'random_permutations', 'repair', 'reset_batch_stats', 'resnet_network',
    'resnet_spec', 'same_groups', 'sinkhorn',
    'sinkhorn_matching', 'SinkhornMatchingResult', 'soft_apply_permutation',
    'solve_assignment', 'ste_matching', 'transformer_spec', 'unlock', 'weight_matching',
)


def __getattr__(name):
  if name == 'lerp':  # renamed: `lerp` alone reads as the lerp building block
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn('mergejax.permute.lerp is deprecated; use '
                  'mergejax.permute.lerp_params.', DeprecationWarning,
                  stacklevel=2)
    return lerp_params
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
