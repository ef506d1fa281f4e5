"""PLeaS' size model and ratio choice: how wide the merged model is.

Per hidden group a ratio ``r`` of the units is kept separate (one copy from
each model) and the other ``1 - r`` are merged, so the group's width becomes
``n (1 + r)``. `merged_size` counts the parameters (or FLOPs) this gives
relative to one model; `choose_ratios` picks ratios for a budget.

Example:
  >>> from mergejax import permute
  >>> round(permute.merged_size([(4, 8), (8, 2)], [0.5]), 3)
  1.655

References:
  Nasery et al., 2024, "PLeaS: Merging Models with Permutations and Least
  Squares", https://arxiv.org/abs/2407.02447
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import numpy as np


MEASURES = ('params', 'flops')


class LayerDims(NamedTuple):
  """Sizes of one layer for `merged_size` (a plain ``(n_in, n_out)`` is a Dense).

  Attributes:
    n_in: input units (channels).
    n_out: output units (channels).
    taps: kernel taps per input channel (``kh * kw`` for a conv, 1 for Dense).
    positions: output positions per example (``H * W`` for a conv): FLOPs only.
    per_unit: parameters per output unit besides the weights (bias, norm scale
      and bias).
  """
  n_in: int
  n_out: int
  taps: int = 1
  positions: int = 1
  per_unit: int = 1




def merged_size(dims: Sequence[tuple[int, ...]], ratios: Sequence[float], *,
                measure: str = 'params') -> float:
  """Size of the merged model relative to one model (heads kept separate).

  A layer between groups with ratios ``r_in``, ``r_out`` has
  ``taps n_in n_out ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` weights (the
  zero sep_A/sep_B cross blocks removed) plus ``per_unit n_out (1 + r_out)``
  biases and norm parameters; the input is shared (``r = 0``) and the heads
  are separate (``r = 1``). ``measure='flops'`` counts multiply-adds, PLeaS'
  model ``base ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` with
  ``base = positions taps n_in n_out``, so conv layers weigh by their spatial
  positions.

  Args:
    dims: per layer ``(n_in, n_out)`` (Dense) or a `LayerDims`.
    ratios: fraction of units kept separate per hidden group (one fewer than
      layers).
    measure: ``'params'`` or ``'flops'``.

  Example:
    >>> from mergejax import permute
    >>> permute.merged_size([(4, 8), (8, 2)], [1.0])
    2.0
    >>> conv = permute.LayerDims(1, 8, taps=9, positions=64, per_unit=1)
    >>> round(permute.merged_size([conv, (8, 2)], [0.0], measure='flops'), 3)
    1.003
  """
  if measure not in MEASURES:
    raise ValueError(f"measure must be 'params' or 'flops', got {measure!r}.")
  if len(ratios) != len(dims) - 1:
    raise ValueError(f'merged_size: {len(dims)} layers need {len(dims) - 1} ratios '
                     f'(one per hidden group), got {len(ratios)}.')
  r = [0.0] + list(ratios) + [1.0]
  return layers_size([(d, r[l], r[l + 1]) for l, d in enumerate(dims)], measure)


def layers_size(layers, measure: str) -> float:
  """Merged / one-model size of ``[(dims, r_in, r_out)]`` (`merged_size`)."""
  total = one = 0.0
  for d, ri, ro in layers:
    d = LayerDims(*d)
    f = (1 + ri) * (1 + ro) - 2 * ri * ro
    if measure == 'params':
      w = d.n_in * d.n_out * d.taps
      total += w * f + d.per_unit * d.n_out * (1 + ro)
      one += w + d.per_unit * d.n_out
    else:
      w = d.positions * d.taps * d.n_in * d.n_out
      total += w * f
      one += w
  return total / one


def choose_ratios(similarities: Sequence[np.ndarray], dims: Sequence[tuple[int, ...]],
                  size: float, *, step: int | None = None,
                  measure: str = 'params') -> tuple[float, ...]:
  """Greedy ratios for a size budget: separate the worst-matched units first.

  Each move separates ``step`` more units of one group (default 1/16 of its
  width); among the moves that fit the budget it takes the one with the largest
  summed dissimilarity ``sum (1 - c_i)`` of the units it separates per
  parameter (or FLOP) added. Stops when no move fits.

  Args:
    similarities: per hidden group, a score per unit, higher = better to
      merge (the matched correlation, or ``1 - cost / max cost``); the gain of
      separating a unit is ``1 - score``.
    dims: per layer ``(n_in, n_out)`` or `LayerDims` (one more than groups).
    size: target size relative to one model, at least 1; up to the
      all-merged size (heads stay separate) every unit is merged.
    step: units per move (default ``max(1, n // 16)``).
    measure: ``'params'`` or ``'flops'`` (`merged_size`).

  Returns:
    The ratios ``r_k`` (fraction of units kept separate) per hidden group.

  Raises:
    ValueError: if ``size`` is below 1 or NaN, ``step`` is not a positive
      int, or ``measure`` is unknown.
  """
  return greedy_ratios(similarities, functools.partial(merged_size, dims,
                                                       measure=measure), size, step)


def greedy_ratios(similarities: Sequence[np.ndarray],
                  size_of: Callable[[Sequence[float]], float], size: float,
                  step: int | None = None) -> tuple[float, ...]:
  """`choose_ratios` for any ``size_of(ratios)`` (per group of ``similarities``).

  Used directly when ratios are tied across groups (e.g. one per ResNet
  stage), so that ``size_of`` maps the free ratios to a size.
  """
  sims = [np.sort(np.asarray(s, np.float64)) for s in similarities]  # worst first
  widths = [len(s) for s in sims]
  kept = [0] * len(sims)
  if step is not None and (not isinstance(step, (int, np.integer)) or step < 1):
    raise ValueError(f'step must be a positive int (units per move), got '
                     f'{step!r}.')
  # Sizes from 1 (one model) up to the all-merged size (above 1: the heads
  # stay separate) ask for a fully merged body: every ratio 0.
  if not np.isfinite(size) or size < 1.0:
    raise ValueError(f'size must be at least 1.0 (one model; 2.0 keeps both '
                     f'whole), got {size!r}.')
  while True:
    best, best_gain = None, -np.inf
    for k, n in enumerate(widths):
      st = step or max(1, n // 16)
      if kept[k] >= n:
        continue
      new = list(kept)
      new[k] = min(n, kept[k] + st)
      ratios = [c / w for c, w in zip(new, widths)]
      cur = size_of([c / w for c, w in zip(kept, widths)])
      nxt = size_of(ratios)
      if nxt > size + 1e-9:
        continue
      gain = np.sum(1.0 - sims[k][kept[k]:new[k]]) / max(nxt - cur, 1e-12)
      if gain > best_gain:
        best, best_gain = new, gain
    if best is None:
      return tuple(c / w for c, w in zip(kept, widths))
    kept = best
