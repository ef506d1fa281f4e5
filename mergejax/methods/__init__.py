"""Named merge methods, each composed from `mergejax` primitives.

Hyperparameter names and defaults follow mergekit (``weight``, ``density``,
``gamma``, ``epsilon``, ``lambda_`` for mergekit's ``lambda``, ``normalize``,
``rescale``, ``t``), so a mergekit YAML maps over one to one.
"""

from mergejax._src.methods_classic import linear
from mergejax._src.methods_classic import task_arithmetic
from mergejax._src.methods_classic import average
# --- TIES family (ties, dare_*, breadcrumbs*, della*, sce, magmax, ram)
from mergejax._src.methods_ties import breadcrumbs
from mergejax._src.methods_ties import breadcrumbs_ties
from mergejax._src.methods_ties import dare_linear
from mergejax._src.methods_ties import dare_ties
from mergejax._src.methods_ties import della
from mergejax._src.methods_ties import della_linear
from mergejax._src.methods_ties import magmax
from mergejax._src.methods_ties import ram
from mergejax._src.methods_ties import ramplus_tl
from mergejax._src.methods_ties import sce
from mergejax._src.methods_ties import ties
# --- interpolation methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap)
from mergejax._src.methods_interp import slerp
from mergejax._src.methods_interp import nuslerp
from mergejax._src.methods_interp import multislerp
from mergejax._src.methods_interp import karcher
from mergejax._src.methods_interp import model_stock
from mergejax._src.methods_interp import nearswap
from mergejax._src.methods_interp import arcee_fusion
# --- subspace / mask methods (issue: subspace merges)
from mergejax._src.continual import opcm
from mergejax._src.lora import lora_lego
from mergejax._src.lora import lora_svd
from mergejax._src.methods_subspace import consensus
from mergejax._src.methods_subspace import emr
from mergejax._src.methods_subspace import iso_c
from mergejax._src.methods_subspace import iso_cts
from mergejax._src.methods_subspace import knots
from mergejax._src.methods_subspace import lines
from mergejax._src.methods_subspace import pcb
from mergejax._src.methods_subspace import reconstruct
from mergejax._src.methods_subspace import reversible
from mergejax._src.methods_subspace import tall_masks
from mergejax._src.methods_subspace import tsv
from mergejax._src.methods_subspace import twin
from mergejax._src.methods_subspace import twin_mix
from mergejax._src.methods_subspace import widen
from mergejax._src.rtsvm import rtsvm
from mergejax._src.twin_router import twin_apply
from mergejax._src.twin_router import twin_dense
from mergejax._src.twin_router import twin_route
from mergejax._src.twin_router import twin_train_router
# --- end of methods
