"""PLeaS: partial permutations and layer-wise least squares, for MLP chains.

Two models of one architecture (``Dense_0 … Dense_L`` as `models.MLP`, hidden
groups ``P_0 … P_{L-1}``), e.g. trained on different tasks, are merged into one
wider model of a chosen size between 1x and 2x:

1. **Matching**: activation matching (correlation) aligns B's hidden units to
   A's; the matched similarity ``c_i`` of every unit pair is kept.
2. **Partial permutation**: per hidden group a ratio ``r_k`` of units is kept
   *separate* (one copy from each model) and the best-matched ``1 - r_k`` are
   merged; the group's width becomes ``n_k (1 + r_k)``, ordered
   ``[merged | sep_A | sep_B]``. `choose_ratios` picks the ratios for a
   parameter budget with a greedy solver (no commercial optimiser): it
   repeatedly separates the worst-matched units per parameter spent.
3. **Least squares**: every layer is solved in closed form. Its targets
   ``Y~ = [(Y_A[m] + Y_B[m])/2, Y_A[s], Y_B[s]]`` are the original layers'
   pre-activations, assembled by blocks. Its inputs are, by default, the
   merged network's own features (layers solved in order); PLeaS' reference
   uses the original models' features
   ``X~ = [(X_A[m] + X_B[m])/2, X_A[s], X_B[s]]`` instead (``inputs=
   'original'``). The Gram matrices ``X^T X``, ``X^T Y~`` are accumulated
   over batches; each output block is a ridge regression on its allowed
   input blocks (sep_A and sep_B never feed each other). The task heads stay
   separate: the merged model outputs ``[logits_A | logits_B]``.

``least_squares=False`` gives the permute-then-average baseline at the same
widths (PLeaS' block construction), ``align=False`` the no-alignment one. The
data-free variant (PLeaS-free) passes generic inputs (e.g. Gaussian noise)
instead of task data.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src.permute import evaluate
from mergejax._src.permute.builders import mlp_spec
from mergejax._src.permute.spec import apply_permutation


class PleasResult(NamedTuple):
  """The merged ``params`` (`models.MLP` layout), hidden ``widths``, ``ratios``, ``size``.

  ``ridges``: the ridge used per layer (None without least squares).
  """
  params: Any
  widths: tuple[int, ...]
  ratios: tuple[float, ...]
  size: float
  ridges: tuple[float, ...] | None = None


# With a grid of ridges, every _HOLDOUT-th data row is held out to choose one.
_HOLDOUT = 5


def _layer_dims(params, num_hidden):
  return [params[f'Dense_{l}']['kernel'].shape for l in range(num_hidden + 1)]


def merged_size(dims: Sequence[tuple[int, int]], ratios: Sequence[float]) -> float:
  """Parameters of the merged model relative to one model (heads kept separate).

  A layer between groups with ratios ``r_in``, ``r_out`` has
  ``n_in n_out ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` weights (the zero
  sep_A/sep_B cross blocks removed) plus ``n_out (1 + r_out)`` biases; the
  input is shared (``r = 0``) and the heads are separate (``r = 1``).
  """
  r = [0.0] + list(ratios) + [1.0]
  total = one = 0.0
  for l, (n_in, n_out) in enumerate(dims):
    ri, ro = r[l], r[l + 1]
    total += n_in * n_out * ((1 + ri) * (1 + ro) - 2 * ri * ro) + n_out * (1 + ro)
    one += n_in * n_out + n_out
  return total / one


def choose_ratios(similarities: Sequence[np.ndarray], dims: Sequence[tuple[int, int]],
                  size: float, *, step: int | None = None) -> tuple[float, ...]:
  """Greedy ratios for a size budget: separate the worst-matched units first.

  Each move separates ``step`` more units of one group (default 1/16 of its
  width); among the moves that fit the budget it takes the one with the largest
  summed dissimilarity ``sum (1 - c_i)`` of the units it separates per
  parameter added. Stops when no move fits.

  Args:
    similarities: per hidden group, the matched similarity of every unit.
    dims: ``(n_in, n_out)`` of every Dense layer (L + 1 of them).
    size: target size relative to one model (>= the all-merged size).
    step: units per move (default ``max(1, n // 16)``).

  Returns:
    The ratios ``r_k`` (fraction of units kept separate) per hidden group.
  """
  sims = [np.sort(np.asarray(s, np.float64)) for s in similarities]  # worst first
  widths = [len(s) for s in sims]
  kept = [0] * len(sims)
  while True:
    best, best_gain = None, -np.inf
    for k, n in enumerate(widths):
      st = step or max(1, n // 16)
      if kept[k] >= n:
        continue
      new = list(kept)
      new[k] = min(n, kept[k] + st)
      ratios = [c / w for c, w in zip(new, widths)]
      cur = merged_size(dims, [c / w for c, w in zip(kept, widths)])
      nxt = merged_size(dims, ratios)
      if nxt > size + 1e-9:
        continue
      gain = np.sum(1.0 - sims[k][kept[k]:new[k]]) / max(nxt - cur, 1e-12)
      if gain > best_gain:
        best, best_gain = new, gain
    if best is None:
      return tuple(c / w for c, w in zip(kept, widths))
    kept = best


def _hidden_and_preacts(params, x, num_hidden):
  hs, zs = [], []
  h = x
  for l in range(num_hidden + 1):
    d = params[f'Dense_{l}']
    z = h @ d['kernel'] + d['bias'][None]
    zs.append(z)
    h = jax.nn.relu(z)
    if l < num_hidden:
      hs.append(h)
  return hs, zs


def _blocks(n, merged_idx, sep_idx):
  return np.asarray(merged_idx), np.asarray(sep_idx)


def pleas(params_a: Any, params_b: Any, batches: Iterable[Any] | Any, *,
          num_hidden: int, size: float,
          ridge: float | Sequence[float] = 1e-3,
          least_squares: bool = True, align: bool = True,
          ratios: Sequence[float] | None = None,
          inputs: str = 'merged', ridge_to: str = 'zero',
          batch_tasks: Sequence[int | None] | None = None) -> PleasResult:
  """Merges two MLPs into one of ``size`` x one model's parameters (module docstring).

  Args:
    params_a: model A (``Dense_0 … Dense_L`` params, e.g. `models.MLP`).
    params_b: model B, same architecture (its own head).
    batches: a list of input batches ``[N, d_in]`` for matching and the
      least-squares statistics (task data, or generic data for PLeaS-free).
    num_hidden: number of hidden layers L.
    size: target size relative to one model (the minimum is the all-merged
      trunk plus two heads; 2.0 keeps both models whole).
    ridge: ridge strength relative to the mean diagonal of each Gram matrix;
      or a sequence of candidates: then every 5th data row is held out, each
      layer takes the candidate with the smallest held-out squared error and
      is refitted on all rows with it (`PleasResult.ridges`).
    least_squares: solve the weights (PLeaS); False averages the blocks
      (permute-then-average at the same widths).
    align: match units first; False keeps B's order (no-alignment baseline).
    ratios: explicit ratios per hidden group (overrides ``size``).
    inputs: the features each layer's least squares is fitted on.
      ``'merged'`` (default): the merged network's own features, layer by
      layer in order, so each layer is fitted to what it will actually read
      (the errors of earlier merged layers are absorbed instead of
      compounding). ``'original'``: PLeaS' reference, the assembled features
      of the original models, every layer independently.
    ridge_to: ``'zero'`` (plain ridge) or ``'average'``: the ridge pulls
      towards the permute-then-average weights, so a large ridge falls back
      to them (with a grid of ridges, per layer, as the held-out rows
      decide).
    batch_tasks: optional task of each batch: 0 (A's task), 1 (B's) or
      None. Merged outputs are fitted on every row; A's separate outputs and
      head (they serve only task A) on A's and untagged rows, B's likewise.

  Returns:
    A `PleasResult`; evaluate ``params`` with
    ``models.MLP(result.widths, num_outputs=out_a + out_b)``.
  """
  if inputs not in ('merged', 'original'):
    raise ValueError(f"inputs must be 'merged' or 'original', got {inputs!r}.")
  batches = list(batches)
  sources = [None] * len(batches) if batch_tasks is None else list(batch_tasks)
  if len(sources) != len(batches) or any(t not in (None, 0, 1) for t in sources):
    raise ValueError('batch_tasks must give 0 (task A), 1 (task B) or None for '
                     f'each of the {len(batches)} batches, got {batch_tasks!r}.')
  if ridge_to not in ('zero', 'average'):
    raise ValueError(f"ridge_to must be 'zero' or 'average', got {ridge_to!r}.")
  spec = mlp_spec(num_hidden)
  fn = lambda p, x: {f'P_{k}': h for k, h in
                     enumerate(_hidden_and_preacts(p, x, num_hidden)[0])}
  perms, costs = evaluate.activation_matching(fn, params_a, params_b, batches,
                                              return_costs=True)
  if not align:
    perms = {g: jnp.arange(p.shape[0], dtype=jnp.int32) for g, p in perms.items()}
  pb = apply_permutation(spec, perms, params_b)
  sims = [np.asarray(costs[f'P_{k}'])[np.arange(len(perms[f'P_{k}'])),
                                      np.asarray(perms[f'P_{k}'])]
          for k in range(num_hidden)]
  dims = _layer_dims(params_a, num_hidden)
  if ratios is None:
    ratios = choose_ratios(sims, dims, size)
  # Units: merged = best matched (1 - r) fraction, separate = the rest.
  groups = []
  for k in range(num_hidden):
    n = len(sims[k])
    n_sep = int(round(ratios[k] * n))
    order = np.argsort(-sims[k], kind='stable')
    groups.append((np.sort(order[:n - n_sep]), np.sort(order[n - n_sep:])))
  widths = tuple(len(m) + 2 * len(s) for m, s in groups)

  def assemble(xa, xb, k):
    """[(a[m] + b[m])/2, a[s], b[s]] along the last axis for group k."""
    m, s = groups[k]
    return jnp.concatenate([(xa[:, m] + xb[:, m]) / 2, xa[:, s], xb[:, s]], axis=1)

  out = {}
  chosen = []
  grid = tuple(float(r) for r in np.atleast_1d(np.asarray(ridge, np.float64)))
  if least_squares:
    for l in range(num_hidden + 1):  # in order: layer l reads layers < l
      fit, val = {}, {}  # per data source: (X^T X, X^T Y), fitting / held out
      offset = 0
      for x, src in zip(batches, sources):
        _, za = _hidden_and_preacts(params_a, x, num_hidden)
        hb, zb = _hidden_and_preacts(pb, x, num_hidden)
        if l == 0:
          xin = x
        elif inputs == 'merged':  # what merged layer l will actually read
          xin = _merged_hidden(out, x, l)
        else:  # PLeaS' reference: the original models' features
          ha, _ = _hidden_and_preacts(params_a, x, num_hidden)
          xin = assemble(ha[l - 1], hb[l - 1], l - 1)
        xin = jnp.concatenate([xin, jnp.ones((xin.shape[0], 1), xin.dtype)], 1)
        y = (assemble(za[l], zb[l], l) if l < num_hidden
             else jnp.concatenate([za[l], zb[l]], 1))
        xin, y = np.asarray(xin, np.float64), np.asarray(y, np.float64)
        # Every `_HOLDOUT`-th row (counted across batches) is held out.
        held = (offset + np.arange(xin.shape[0])) % _HOLDOUT == 0
        offset += xin.shape[0]
        if len(grid) == 1:
          held[:] = False
        for acc, rows in ((fit, ~held), (val, held)):
          st = (xin[rows].T @ xin[rows], xin[rows].T @ y[rows])
          acc[src] = st if src not in acc else (acc[src][0] + st[0],
                                                acc[src][1] + st[1])
      w0 = None
      if ridge_to == 'average':  # permute-then-average weights, same layout
        avg = _average_blocks(params_a[f'Dense_{l}'], pb[f'Dense_{l}'], groups,
                              l, num_hidden)
        w0 = np.concatenate([np.asarray(avg['kernel'], np.float64),
                             np.asarray(avg['bias'], np.float64)[None]], 0)
      blocks = _out_blocks(groups, l, num_hidden, params_a, params_b)
      solve = lambda st, r: _solve_blocks(st, blocks, groups, l, r, w0)
      lam = grid[0]
      if len(grid) > 1:  # choose the ridge on the held-out rows, refit on all
        errs = [_held_out_error(solve(fit, r), val, blocks) for r in grid]
        lam = grid[int(np.argmin(errs))]
        for src, (g, h) in val.items():
          f = fit.get(src)
          fit[src] = (g, h) if f is None else (f[0] + g, f[1] + h)
      chosen.append(lam)
      w = solve(fit, lam)
      out[f'Dense_{l}'] = {'kernel': jnp.asarray(w[:-1], jnp.float32),
                           'bias': jnp.asarray(w[-1], jnp.float32)}
  else:
    for l in range(num_hidden + 1):
      out[f'Dense_{l}'] = _average_blocks(params_a[f'Dense_{l}'], pb[f'Dense_{l}'],
                                          groups, l, num_hidden)
  return PleasResult(out, widths, tuple(float(r) for r in ratios),
                     merged_size(dims, ratios), tuple(chosen) or None)


def _merged_hidden(out, x, l):
  """Hidden features of the merged layers ``0 … l-1`` (already solved)."""
  h = x
  for k in range(l):
    d = out[f'Dense_{k}']
    h = jax.nn.relu(h @ d['kernel'] + d['bias'][None])
  return h


def _block_stats(stats, allowed):
  """``(X^T X, X^T Y)`` of the data sources an output block is fitted on.

  Merged outputs use every row; a model's separate outputs and head (they
  read no input of the other model) only rows of that model's task and
  untagged rows, when tagged rows exist.
  """
  own = {('m', 'a'): 0, ('m', 'b'): 1}.get(tuple(allowed))
  keys = [k for k in stats if own is None or k in (None, own)]
  if not keys:
    keys = list(stats)
  g = sum(stats[k][0] for k in keys)
  h = sum(stats[k][1] for k in keys)
  return g, h


def _solve_blocks(stats, blocks, groups, l, ridge, w0=None):
  """Block ridge least squares of layer l from per-source Gram statistics.

  Minimises ``|X W - Y|^2 + lam |W - w0|^2`` per output block (``w0 = 0``
  if None; ``lam`` relative to the mean diagonal of the block's ``X^T X``).
  Returns the ``[d_in + 1, d_out]`` float64 solution (last row: the bias).
  """
  g_all, h_all = _block_stats(stats, ('m', 'a', 'b'))
  d_in = g_all.shape[0] - 1
  in_blocks = _index_blocks(groups, l - 1, d_in)
  w = np.zeros((d_in + 1, h_all.shape[1]))
  for cols, allowed in blocks:
    g, h = _block_stats(stats, allowed)
    lam = ridge * np.mean(np.diag(g))
    rows = np.concatenate([in_blocks[a] for a in allowed] + [[d_in]]).astype(int)
    gi = g[np.ix_(rows, rows)] + lam * np.eye(len(rows))
    rhs = h[np.ix_(rows, cols)]
    if w0 is not None:
      rhs = rhs + lam * w0[np.ix_(rows, cols)]
    w[np.ix_(rows, cols)] = np.linalg.solve(gi, rhs)
  return w


def _held_out_error(w, val, blocks):
  """``sum_blocks |X_v W - Y_v|^2`` up to constants, on each block's rows."""
  err = 0.0
  for cols, allowed in blocks:
    g, h = _block_stats(val, allowed)
    wc = w[:, cols]
    err += np.sum(wc * (g @ wc)) - 2 * np.sum(wc * h[:, cols])
  return err


def _index_blocks(groups, k, d_in):
  """Input index blocks {'m','a','b'} of the merged layer reading group k."""
  if k < 0:  # the shared input
    return {'m': np.arange(d_in), 'a': np.zeros(0, int), 'b': np.zeros(0, int)}
  nm, ns = len(groups[k][0]), len(groups[k][1])
  return {'m': np.arange(nm), 'a': nm + np.arange(ns), 'b': nm + ns + np.arange(ns)}


def _out_blocks(groups, l, num_hidden, pa, pb):
  """(output columns, allowed input blocks) of merged layer l."""
  if l == num_hidden:  # separate heads
    na = pa[f'Dense_{l}']['kernel'].shape[1]
    nb = pb[f'Dense_{l}']['kernel'].shape[1]
    return [(np.arange(na), ('m', 'a')), (na + np.arange(nb), ('m', 'b'))]
  nm, ns = len(groups[l][0]), len(groups[l][1])
  return [(np.arange(nm), ('m', 'a', 'b')), (nm + np.arange(ns), ('m', 'a')),
          (nm + ns + np.arange(ns), ('m', 'b'))]


def _average_blocks(da, db, groups, l, num_hidden):
  """PLeaS' block construction without least squares (Flax (in, out) layout)."""
  ka, kb = np.asarray(da['kernel']), np.asarray(db['kernel'])
  ba, bb = np.asarray(da['bias']), np.asarray(db['bias'])
  if l == 0:
    mi, si = np.arange(ka.shape[0]), np.zeros(0, int)
  else:
    mi, si = groups[l - 1]
  if l == num_hidden:
    mo, so = np.zeros(0, int), None
  else:
    mo, so = groups[l]
  rows_a = [ka[mi], ka[si], np.zeros((len(si), ka.shape[1]))]  # inputs m|a|b
  rows_b = [kb[mi], np.zeros((len(si), kb.shape[1])), kb[si]]
  ka_full = np.concatenate(rows_a, 0)  # A's layer on the merged input layout
  kb_full = np.concatenate(rows_b, 0)
  if l == num_hidden:
    # Heads: A's head reads merged + sep_A; B's head merged + sep_B.
    k = np.concatenate([ka_full, kb_full], 1)
    return {'kernel': jnp.asarray(k, jnp.float32),
            'bias': jnp.asarray(np.concatenate([ba, bb]), jnp.float32)}
  # Merged outputs: average of A and B (each reading its own separate inputs
  # with half weight, the merged inputs averaged); separate outputs: own model.
  k_m = (ka_full[:, mo] + kb_full[:, mo]) / 2
  k = np.concatenate([k_m, ka_full[:, so], kb_full[:, so]], 1)
  b = np.concatenate([(ba[mo] + bb[mo]) / 2, ba[so], bb[so]])
  return {'kernel': jnp.asarray(k, jnp.float32), 'bias': jnp.asarray(b, jnp.float32)}
