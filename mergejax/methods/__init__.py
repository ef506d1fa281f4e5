"""Named merge methods, each composed from `mergejax.transforms` building blocks.

Hyperparameter names and defaults follow mergekit (``weight``, ``density``,
``gamma``, ``epsilon``, ``lambda_`` for mergekit's ``lambda``, ``normalize``,
``rescale``, ``t``), so a mergekit YAML maps over one to one. Every method
returns a `mergejax.MergeTransformation`; run it with `mergejax.merge`.

>>> import jax.numpy as jnp, mergejax as mj
>>> base = {'w': jnp.zeros(2)}
>>> fts = [{'w': jnp.array([1., -2.])}, {'w': jnp.array([3., 1.])}]
>>> mj.merge(mj.methods.ties(density=1.0), base, fts)['w']  # sign election
Array([ 2., -2.], dtype=float32)
"""

# pylint: disable=g-importing-member
# Classic averaging and task arithmetic.
from mergejax.methods._classic import average
from mergejax.methods._classic import linear
from mergejax.methods._classic import passthrough
from mergejax.methods._classic import task_arithmetic
# Interpolation (slerp, nuslerp, multislerp, karcher, model stock, ...).
from mergejax.methods._interp import arcee_fusion
from mergejax.methods._interp import karcher
from mergejax.methods._interp import model_stock
from mergejax.methods._interp import multislerp
from mergejax.methods._interp import nearswap
from mergejax.methods._interp import nuslerp
from mergejax.methods._interp import slerp
# TIES family (trim, sign election, disjoint merge and their variants).
from mergejax.methods._ties import breadcrumbs
from mergejax.methods._ties import breadcrumbs_ties
from mergejax.methods._ties import dare_linear
from mergejax.methods._ties import dare_ties
from mergejax.methods._ties import della
from mergejax.methods._ties import della_linear
from mergejax.methods._ties import magmax
from mergejax.methods._ties import ram
from mergejax.methods._ties import ramplus_tl
from mergejax.methods._ties import sce
from mergejax.methods._ties import ties
# Subspace merges, one module per paper.
from mergejax.methods._emr import emr
from mergejax.methods._iso import iso_c
from mergejax.methods._iso import iso_cts
from mergejax.methods._knots import knots
from mergejax.methods._lines import lines
from mergejax.methods._pcb import pcb
from mergejax.methods._reversible import reversible
from mergejax.methods._rtsvm import rtsvm
from mergejax.methods._tall_masks import consensus
from mergejax.methods._tall_masks import tall_masks
from mergejax.methods._tsv import tsv
from mergejax.methods._widen import widen
from mergejax.methods._wudi import wudi
# Per-task reconstruction and routing (EMR, reversible, Twin).
from mergejax.methods._common import reconstruct
from mergejax.methods._twin import twin
from mergejax.methods._twin import twin_mix
from mergejax.methods._twin_router import twin_apply
from mergejax.methods._twin_router import twin_dense
from mergejax.methods._twin_router import twin_route
from mergejax.methods._twin_router import twin_train_router
# Data-informed merges (statistics from `mergejax.stats`).
from mergejax.methods._adamerging import adamerging
from mergejax.methods._adamerging import AdaMergingResult
from mergejax.methods._adamerging import fit_adamerging
from mergejax.methods._common import prediction_entropy
from mergejax.methods._concrete import concrete
from mergejax.methods._concrete import concrete_adamerging
from mergejax.methods._concrete import ConcreteAdaMergingResult
from mergejax.methods._concrete import fit_concrete_adamerging
from mergejax.methods._concrete import concrete_mask
from mergejax.methods._concrete import ConcreteResult
from mergejax.methods._concrete import fit_concrete
from mergejax.methods._dam import DamResult
from mergejax.methods._dam import fit_dam
from mergejax.methods._data import fisher_merging
from mergejax.methods._data import regmean
from mergejax.methods._data import regmean_plusplus
from mergejax.methods._ota import ota
from mergejax.methods._expert_merging import ExpertMergingResult
from mergejax.methods._expert_merging import fit_expert_merging
from mergejax.methods._expert_merging import importance_chunks
from mergejax.methods._surgery import fit_surgery
from mergejax.methods._surgery import surgery_apply
from mergejax.methods._surgery import SurgeryResult
# LoRA adapters and continual merging.
from mergejax.methods._lora import lora_lego
from mergejax.methods._lora import lora_svd
from mergejax.methods._opcm import opcm
# Dynamic, test-time and pool-scale merges.
from mergejax.methods._wemoe import fit_wemoe
from mergejax.methods._wemoe import PrunedTaskVectors
from mergejax.methods._wemoe import WEMoERouter
from mergejax.methods._wemoe import wemoe_apply
from mergejax.methods._wemoe import wemoe_dense
from mergejax.methods._wemoe import wemoe_gates
from mergejax.methods._wemoe import wemoe_init
from mergejax.methods._wemoe import WEMoEResult
from mergejax.methods._wemoe import WEMoEState
# (DOGE-TA, RCP-Merging)
from mergejax.methods._doge import doge_ta
from mergejax.methods._rcp import rcp_merging
# (MWA)
from mergejax.methods._mwa import mwa
from mergejax.methods._mwa import mwa_optax
from mergejax.methods._mwa import mwa_tracker
from mergejax.methods._mwa import mwa_weights
from mergejax.methods._mwa import MWAOptaxState
from mergejax.methods._mwa import MWAState
from mergejax.methods._mwa import MWATracker
from mergejax.methods._mwa import MWATrackerState
# (FW-Merging)
from mergejax.methods._fw import CandidatePool
from mergejax.methods._fw import fit_fw_merging
from mergejax.methods._fw import FWResult
# (T3)
from mergejax.methods._t3 import js_divergence
from mergejax.methods._t3 import t3_apply
from mergejax.methods._t3 import t3_coefficients
from mergejax.methods._t3 import T3Output
# pylint: enable=g-importing-member

__all__ = (
    'average', 'linear', 'passthrough', 'task_arithmetic',
    'arcee_fusion', 'karcher', 'model_stock', 'multislerp', 'nearswap',
    'nuslerp', 'slerp',
    'breadcrumbs', 'breadcrumbs_ties', 'dare_linear', 'dare_ties', 'della',
    'della_linear', 'magmax', 'ram', 'ramplus_tl', 'sce', 'ties',
    'consensus', 'emr', 'iso_c', 'iso_cts', 'knots', 'lines', 'pcb',
    'reversible', 'rtsvm', 'tall_masks', 'tsv', 'widen', 'wudi',
    'reconstruct', 'twin', 'twin_mix', 'twin_apply', 'twin_dense',
    'twin_route', 'twin_train_router',
    'fisher_merging', 'regmean', 'regmean_plusplus', 'ota',
    'adamerging', 'fit_adamerging', 'AdaMergingResult', 'prediction_entropy',
    'concrete', 'concrete_mask', 'fit_concrete', 'ConcreteResult',
    'concrete_adamerging', 'fit_concrete_adamerging',
    'ConcreteAdaMergingResult',
    'fit_dam', 'DamResult',
    'fit_surgery', 'surgery_apply', 'SurgeryResult',
    'fit_expert_merging', 'ExpertMergingResult', 'importance_chunks',
    'lora_lego', 'lora_svd', 'opcm',
    'wemoe_init', 'wemoe_apply', 'wemoe_gates', 'wemoe_dense', 'fit_wemoe',
    'WEMoEState', 'WEMoEResult', 'WEMoERouter', 'PrunedTaskVectors',
    # (DOGE-TA, RCP-Merging)
    'doge_ta', 'rcp_merging',
    # (MWA)
    'mwa', 'mwa_weights', 'mwa_tracker', 'mwa_optax', 'MWAState',
    'MWATracker', 'MWATrackerState', 'MWAOptaxState',
    # (FW-Merging)
    'fit_fw_merging', 'FWResult', 'CandidatePool',
    # (T3)
    't3_apply', 't3_coefficients', 'T3Output', 'js_divergence',
)
