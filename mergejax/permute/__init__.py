"""Permutation alignment: specs, matching, PLeaS, REPAIR and barriers.

Models trained from different initialisations are aligned (their hidden units
permuted onto a reference) before they can be averaged.

>>> import jax, jax.numpy as jnp
>>> from mergejax import permute
>>> spec = permute.mlp_spec(1)
>>> sorted(spec.groups)
['P_0']
"""

from mergejax._src.permute.builders import cnn_spec
from mergejax._src.permute.builders import mlp_spec
from mergejax._src.permute.builders import resnet_spec
from mergejax._src.permute.builders import transformer_spec
from mergejax._src.permute.spec import apply_permutation
from mergejax._src.permute.spec import check_permutations
from mergejax._src.permute.spec import check_spec
from mergejax._src.permute.spec import compose
from mergejax._src.permute.spec import identity_permutations
from mergejax._src.permute.spec import inverse
from mergejax._src.permute.spec import PermutationSpec
from mergejax._src.permute.spec import random_permutations
from mergejax._src.permute import models
from mergejax._src.permute.align import permute_align
from mergejax._src.permute.align import PermuteAlignState
from mergejax._src.permute.matching import MatchingResult
from mergejax._src.permute.matching import objective
from mergejax._src.permute.matching import weight_matching
from mergejax._src.permute.solvers import sinkhorn
from mergejax._src.permute.solvers import solve_assignment
from mergejax._src.permute.infer import describe_difference
from mergejax._src.permute.infer import infer_spec
from mergejax._src.permute.infer import same_groups
from mergejax._src.permute.evaluate import activation_matching
from mergejax._src.permute.evaluate import activation_statistics
from mergejax._src.permute.evaluate import Barrier
from mergejax._src.permute.evaluate import interpolation_barrier
from mergejax._src.permute.evaluate import lerp
from mergejax._src.permute.evaluate import repair
from mergejax._src.permute.evaluate import reset_batch_stats
from mergejax._src.permute.pleas import choose_ratios
from mergejax._src.permute.pleas import LayerDims
from mergejax._src.permute.pleas import merged_size
from mergejax._src.permute.pleas import pleas
from mergejax._src.permute.pleas import PleasResult
from mergejax._src.permute.matching import merge_many
from mergejax._src.permute.learned import permutation_matrices
from mergejax._src.permute.learned import sinkhorn_matching
from mergejax._src.permute.learned import SinkhornMatchingResult
from mergejax._src.permute.learned import soft_apply_permutation
from mergejax._src.permute.learned import ste_matching
