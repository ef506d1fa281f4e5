"""Building blocks: merge transformations and the functions behind them.

Every name here is a primitive that named methods (`mergejax.methods`) compose
with `mergejax.chain` / `mergejax.named_chain`. Factories (``trim``,
``elect_sign``, ``lerp_reduce``, ...) return a `mergejax.MergeTransformation`
whose state is the exported ``*State`` named tuple; plain functions
(``topk_mask``, ``svd_basis``, ``lora_delta``, ...) act on arrays or pytrees.

>>> import jax.numpy as jnp, mergejax as mj
>>> from mergejax import transforms as T
>>> base = {'w': jnp.zeros(4)}
>>> fts = [{'w': jnp.array([1., -2., 3., -4.])}]
>>> tx = mj.chain(T.task_vectors(), T.trim(density=0.5), T.mean(),
...               T.apply_to_base())
>>> mj.merge(tx, base, fts)['w']
Array([ 0.,  0.,  3., -4.], dtype=float32)
"""

# pylint: disable=g-importing-member
from mergejax.transforms._coefficients import coefficient_sum
from mergejax.transforms._coefficients import CoefficientSumState
from mergejax.transforms._coefficients import shared_mask
from mergejax.transforms._coefficients import SharedMaskState
from mergejax.transforms._curvature import factored_second_moments
from mergejax.transforms._curvature import fisher_graft
from mergejax.transforms._curvature import FisherGraftState
from mergejax.transforms._curvature import ota_reduce
from mergejax.transforms._curvature import OtaState
from mergejax.transforms._consensus import disjoint_merge
from mergejax.transforms._consensus import DisjointMergeState
from mergejax.transforms._consensus import elect_sign
from mergejax.transforms._consensus import ElectSignState
from mergejax.transforms._consensus import sign_agreement
from mergejax.transforms._continual import opcm_init
from mergejax.transforms._continual import opcm_params
from mergejax.transforms._continual import opcm_update
from mergejax.transforms._continual import OPCMState
from mergejax.transforms._continual import project_new_task
from mergejax.transforms._doge import doge_delta
from mergejax.transforms._doge import doge_reduce
from mergejax.transforms._doge import DogeState
from mergejax.transforms._fisher import fisher_weighted_sum
from mergejax.transforms._fisher import FisherWeightState
from mergejax.transforms._interpolate import arcee_fusion_reduce
from mergejax.transforms._interpolate import karcher_reduce
from mergejax.transforms._interpolate import KarcherState
from mergejax.transforms._interpolate import lerp_reduce
from mergejax.transforms._interpolate import LerpState
from mergejax.transforms._interpolate import model_stock_ratio
from mergejax.transforms._interpolate import model_stock_reduce
from mergejax.transforms._interpolate import multislerp_reduce
from mergejax.transforms._interpolate import MultislerpState
from mergejax.transforms._interpolate import nearswap_reduce
from mergejax.transforms._interpolate import NearswapState
from mergejax.transforms._interpolate import nuslerp_reduce
from mergejax.transforms._interpolate import NuslerpState
from mergejax.transforms._interpolate import slerp_reduce
from mergejax.transforms._interpolate import SlerpState
from mergejax.transforms._layerwise import layer_scale
from mergejax.transforms._layerwise import LayerScaleState
from mergejax.transforms._lora import check_lora
from mergejax.transforms._lora import LoRA
from mergejax.transforms._lora import lora_delta
from mergejax.transforms._lora import lora_from_delta
from mergejax.transforms._lora import merge_lora
from mergejax.transforms._masks import compute_tall_masks
from mergejax.transforms._masks import consensus_mask
from mergejax.transforms._masks import magnitude_mask
from mergejax.transforms._ram import ram_merge
from mergejax.transforms._ram import RamMergeState
from mergejax.transforms._rcp import rcp_mask
from mergejax.transforms._rcp import rcp_select
from mergejax.transforms._rcp import RcpSelectState
from mergejax.transforms._reduce import apply_to_base
from mergejax.transforms._regmean import regmean_reduce
from mergejax.transforms._regmean import RegMeanState
from mergejax.transforms._reduce import mean
from mergejax.transforms._reduce import scale
from mergejax.transforms._reduce import ScaleState
from mergejax.transforms._reduce import task_vectors
from mergejax.transforms._reduce import weighted_sum
from mergejax.transforms._reduce import WeightedSumState
from mergejax.transforms._rtsvm import outlier_reweight
from mergejax.transforms._rtsvm import OutlierReweightState
from mergejax.transforms._rtsvm import tsv_reduce
from mergejax.transforms._rtsvm import TSVReduceState
from mergejax.transforms._sce import sce_merge
from mergejax.transforms._sce import sce_select
from mergejax.transforms._sce import SceSelectState
from mergejax.transforms._select import batched_topk_masks
from mergejax.transforms._select import kth_largest_magnitude
from mergejax.transforms._select import topk_mask
from mergejax.transforms._select import topk_masks
from mergejax.transforms._sparsify import apply_mask
from mergejax.transforms._sparsify import breadcrumbs_prune
from mergejax.transforms._sparsify import BreadcrumbsState
from mergejax.transforms._sparsify import dare
from mergejax.transforms._sparsify import DareState
from mergejax.transforms._sparsify import della_probs
from mergejax.transforms._sparsify import della_prune
from mergejax.transforms._sparsify import DellaState
from mergejax.transforms._sparsify import keep_count
from mergejax.transforms._sparsify import rescale_l1
from mergejax.transforms._sparsify import trim
from mergejax.transforms._sparsify import TrimState
from mergejax.transforms._subspace import from_basis
from mergejax.transforms._subspace import project
from mergejax.transforms._subspace import svd_basis
from mergejax.transforms._subspace import SVDBasis
from mergejax.transforms._wudi import wudi_reduce
from mergejax.transforms._wudi import WudiState
# pylint: enable=g-importing-member

__all__ = (
    # task vectors and reductions
    'task_vectors', 'weighted_sum', 'WeightedSumState', 'mean', 'scale',
    'ScaleState', 'apply_to_base', 'coefficient_sum', 'CoefficientSumState',
    'shared_mask', 'SharedMaskState',
    # exact top-k selection
    'kth_largest_magnitude', 'topk_mask', 'topk_masks', 'batched_topk_masks',
    # sparsification
    'trim', 'TrimState', 'dare', 'DareState', 'breadcrumbs_prune',
    'BreadcrumbsState', 'della_prune', 'DellaState', 'della_probs',
    'keep_count', 'rescale_l1', 'apply_mask',
    # sign consensus
    'elect_sign', 'ElectSignState', 'disjoint_merge', 'DisjointMergeState',
    'sign_agreement', 'sce_select', 'SceSelectState', 'sce_merge',
    'ram_merge', 'RamMergeState',
    # interpolation
    'lerp_reduce', 'LerpState', 'slerp_reduce', 'SlerpState',
    'nuslerp_reduce', 'NuslerpState', 'multislerp_reduce', 'MultislerpState',
    'karcher_reduce', 'KarcherState', 'model_stock_reduce',
    'model_stock_ratio', 'nearswap_reduce', 'NearswapState',
    'arcee_fusion_reduce',
    # subspaces, masks and layer scaling
    'svd_basis', 'SVDBasis', 'from_basis', 'project', 'magnitude_mask',
    'consensus_mask', 'compute_tall_masks', 'layer_scale', 'LayerScaleState',
    'outlier_reweight', 'OutlierReweightState', 'tsv_reduce',
    'TSVReduceState',
    # data-informed reductions (statistics from mergejax.stats)
    'fisher_weighted_sum', 'FisherWeightState', 'regmean_reduce',
    'RegMeanState',
    'rcp_select', 'RcpSelectState', 'rcp_mask',
    # data-free optimisation (task vectors as input proxies)
    'wudi_reduce', 'WudiState',
    'doge_reduce', 'DogeState', 'doge_delta',
    # curvature from saved optimizer state (Adam second moments)
    'fisher_graft', 'FisherGraftState', 'ota_reduce', 'OtaState',
    'factored_second_moments',
    # LoRA adapters
    'LoRA', 'lora_delta', 'lora_from_delta', 'check_lora', 'merge_lora',
    # continual merging
    'opcm_init', 'opcm_update', 'opcm_params', 'OPCMState',
    'project_new_task',
)
