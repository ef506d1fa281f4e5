"""Named merge methods, each composed from `mergejax` primitives.

Hyperparameter names and defaults follow mergekit (``weight``, ``density``,
``gamma``, ``epsilon``, ``lambda_`` for mergekit's ``lambda``, ``normalize``,
``rescale``, ``t``), so a mergekit YAML maps over one to one.
"""

from mergejax._src.methods_classic import linear
from mergejax._src.methods_classic import task_arithmetic
from mergejax._src.methods_classic import average
# --- TIES family (ties, dare_*, breadcrumbs*, della*, sce, magmax, ram)
# --- interpolation methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap)
from mergejax._src.methods_interp import slerp
from mergejax._src.methods_interp import nuslerp
from mergejax._src.methods_interp import multislerp
from mergejax._src.methods_interp import karcher
from mergejax._src.methods_interp import model_stock
from mergejax._src.methods_interp import nearswap
from mergejax._src.methods_interp import arcee_fusion
# --- subspace / mask methods (issue: subspace merges)
# --- end of methods
