"""PLeaS' layer-wise least squares: block ridge regressions on Gram statistics.

A merged layer reads a group ordered ``[merged | sep_A | sep_B]`` and writes
one ordered the same way (or the two task heads). Its weights are found per
output block from the Gram statistics ``X^T X``, ``X^T Y`` of its inputs and
targets: each output block reads only its allowed input blocks (sep_A and
sep_B never feed each other), in closed form (`solve_blocks`) or with PLeaS'
reference Adam fit (`fit_gradient`). A conv is solved as a Dense layer on its
im2col patches (`patches`).

Example:
  >>> import numpy as np
  >>> from mergejax.permute import _pleas_lstsq as lstsq
  >>> x = np.random.default_rng(0).normal(size=(32, 3))
  >>> w = np.arange(6.0).reshape(3, 2)
  >>> blocks = [(np.arange(2), ('m', 'a', 'b'))]
  >>> fit = lstsq.solve_blocks({None: (x.T @ x, x.T @ x @ w)}, blocks,
  ...                          lstsq.index_blocks([], -1, d_in=3), 0.0, bias=False)
  >>> bool(np.allclose(fit, w))
  True

References:
  Nasery et al., 2024, "PLeaS: Merging Models with Permutations and Least
  Squares", https://arxiv.org/abs/2407.02447
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax._src import optim



def assemble(xa, xb, part):
  """``[(a[m] + b[m]) / 2, a[s], b[s]]`` along the last axis (``part = (m, s)``)."""
  m, s = part
  return jnp.concatenate([(xa[..., m] + xb[..., m]) / 2, xa[..., s], xb[..., s]],
                         axis=-1)


def patches(h, kh, kw, stride=1):
  """im2col ``[N, H, W, C] -> [N H' W', C kh kw]``, channel-major (``c * kh * kw + tap``)."""
  p = jax.lax.conv_general_dilated_patches(
      h, (kh, kw), (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return p.reshape(-1, p.shape[-1])


def rows_first(kernel):
  """A kernel with input units first: Dense ``[in, out]``; conv ``[C_in, kh, kw, C_out]``."""
  k = np.asarray(kernel, np.float64)
  return k.transpose(2, 0, 1, 3) if k.ndim == 4 else k


def index_blocks(groups, k, d_in=None, taps=1):
  """Input index blocks {'m','a','b'} of the layer reading group k (-1: the input).

  With ``taps`` (a conv's ``kh * kw``) every channel ``c`` expands to its
  patch indices ``c * taps … c * taps + taps - 1``.
  """
  if k < 0:  # the shared input
    ch = {'m': np.arange(d_in), 'a': np.zeros(0, int), 'b': np.zeros(0, int)}
  else:
    nm, ns = len(groups[k][0]), len(groups[k][1])
    ch = {'m': np.arange(nm), 'a': nm + np.arange(ns), 'b': nm + ns + np.arange(ns)}
  return {b: (c[:, None] * taps + np.arange(taps)[None]).reshape(-1)
          for b, c in ch.items()}


def out_blocks(groups, l, head, na, nb):  # l: the output group
  """(output columns, allowed input blocks) of merged layer l (heads: na, nb outputs)."""
  if head:  # separate heads
    return [(np.arange(na), ('m', 'a')), (na + np.arange(nb), ('m', 'b'))]
  nm, ns = len(groups[l][0]), len(groups[l][1])
  return [(np.arange(nm), ('m', 'a', 'b')), (nm + np.arange(ns), ('m', 'a')),
          (nm + ns + np.arange(ns), ('m', 'b'))]


def average_blocks(ka, kb, ba, bb, part_in, part_out):
  """PLeaS' block construction without least squares.

  ``ka``, ``kb``: kernels with the input units first and the output units
  last (`rows_first`); ``part_in``/``part_out``: the (merged, separate)
  units of the input / output group (None: the shared input / the heads).
  Returns the merged ``(kernel, bias)`` in that layout (bias None if absent).
  """
  head = part_out is None
  nobias = ba is None
  ba = np.zeros(ka.shape[-1]) if nobias else np.asarray(ba)
  bb = np.zeros(kb.shape[-1]) if nobias else np.asarray(bb)
  if part_in is None:
    mi, si = np.arange(ka.shape[0]), np.zeros(0, int)
  else:
    mi, si = part_in
  zeros = lambda k: np.zeros((len(si),) + k.shape[1:])
  ka_full = np.concatenate([ka[mi], ka[si], zeros(ka)], 0)  # inputs m | a | b
  kb_full = np.concatenate([kb[mi], zeros(kb), kb[si]], 0)
  if head:
    # Heads: A's head reads merged + sep_A; B's head merged + sep_B.
    return np.concatenate([ka_full, kb_full], -1), np.concatenate([ba, bb])
  # Merged outputs: average of A and B (each reading its own separate inputs
  # with half weight, the merged inputs averaged); separate outputs: own model.
  mo, so = part_out
  k_m = (ka_full[..., mo] + kb_full[..., mo]) / 2
  k = np.concatenate([k_m, ka_full[..., so], kb_full[..., so]], -1)
  b = np.concatenate([(ba[mo] + bb[mo]) / 2, ba[so], bb[so]])
  return k, (None if nobias else b)


def block_stats(stats, allowed):
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


def _block_rows(in_blocks, allowed, d_in, bias=True):
  return np.concatenate([in_blocks[a] for a in allowed] +
                        ([[d_in]] if bias else [])).astype(int)


def solve_blocks(stats, blocks, in_blocks, ridge, w0=None, bias=True):
  """Block ridge least squares of one layer from per-source Gram statistics.

  Minimises ``|X W - Y|^2 + lam |W - w0|^2`` per output block (``w0 = 0``
  if None; ``lam`` relative to the mean diagonal of the block's ``X^T X``),
  with the block's weights restricted to its allowed input rows
  (``in_blocks``: patch indices for a conv). Returns the ``[d_in + 1, d_out]``
  float64 solution (last row: the bias; no such row without ``bias``).
  """
  g_all, h_all = block_stats(stats, ('m', 'a', 'b'))
  d_in = g_all.shape[0] - int(bias)
  w = np.zeros((g_all.shape[0], h_all.shape[1]))
  for cols, allowed in blocks:
    g, h = block_stats(stats, allowed)
    lam = ridge * np.mean(np.diag(g))
    rows = _block_rows(in_blocks, allowed, d_in, bias)
    gi = g[np.ix_(rows, rows)] + lam * np.eye(len(rows))
    rhs = h[np.ix_(rows, cols)]
    if w0 is not None:
      rhs = rhs + lam * w0[np.ix_(rows, cols)]
    try:
      w[np.ix_(rows, cols)] = np.linalg.solve(gi, rhs)
    except np.linalg.LinAlgError:
      raise ValueError(
          'pleas: a layer\'s least-squares system is singular (its features '
          f'are rank-deficient at ridge={ridge}); pass a ridge > 0, e.g. '
          'ridge=1e-3, or more data.') from None
  return w


def objective(w, stats, blocks, in_blocks, ridge, w0=None, bias=True):
  """The ridge objective `solve_blocks` minimises, summed over the output blocks."""
  total = 0.0
  d_in = block_stats(stats, ('m', 'a', 'b'))[0].shape[0] - int(bias)
  for cols, allowed in blocks:
    g, h = block_stats(stats, allowed)
    lam = ridge * np.mean(np.diag(g))
    wc = w[:, cols]
    ref = 0.0 if w0 is None else w0[:, cols]
    rows = _block_rows(in_blocks, allowed, d_in, bias)
    total += (np.sum(wc * (g @ wc)) - 2 * np.sum(wc * h[:, cols]) +
              lam * np.sum((wc[rows] - (ref if w0 is None else ref[rows])) ** 2))
  return total


def fit_gradient(stats, blocks, in_blocks, ridge, w0, w_init, steps, lr, bias=True):
  """PLeaS' reference fit: Adam + cosine schedule on the block objective.

  The same objective as `solve_blocks` (per output block, from its Gram
  statistics, i.e. full batch), scaled to a mean over rows and outputs; the
  weights start at ``w_init`` (permute-then-average) and a mask keeps every
  disallowed (sep_A <-> sep_B) entry at zero.
  """
  g_all, h_all = block_stats(stats, ('m', 'a', 'b'))
  d_in, d_out = g_all.shape[0] - int(bias), h_all.shape[1]
  gs, hs, colmask, lams, scale = [], [], [], [], []
  mask = np.zeros((g_all.shape[0], d_out))
  for cols, allowed in blocks:
    g, h = block_stats(stats, allowed)
    mask[np.ix_(_block_rows(in_blocks, allowed, d_in, bias), cols)] = 1.0
    cm = np.zeros(d_out)
    cm[cols] = 1.0
    gs.append(g)
    hs.append(h)
    colmask.append(cm)
    lams.append(ridge * np.mean(np.diag(g)))
    # Rows (the bias column's Gram; without one, the mean diagonal) x outputs.
    scale.append(max(g[-1, -1] if bias else np.mean(np.diag(g)), 1.0) * d_out)
  f32 = lambda v: jnp.asarray(np.asarray(v), jnp.float32)
  w0 = np.zeros_like(mask) if w0 is None else w0
  w = _adam_fit(f32(gs), f32(hs), f32(colmask), f32(lams), f32(scale), f32(mask),
                f32(w_init * mask), f32(w0 * mask), jnp.float32(lr), steps=int(steps))
  return np.asarray(w, np.float64) * mask


@functools.partial(jax.jit, static_argnames=('steps',))
def _adam_fit(gs, hs, colmask, lams, scale, mask, w_init, w0, lr, steps):
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss(w):
    quad = jnp.sum(jnp.einsum('bij,jo->bio', gs, w) * w[None], axis=1)  # [B, d_out]
    lin = jnp.sum(hs * w[None], axis=1)
    reg = jnp.sum(mask * (w - w0) ** 2, axis=0)
    per = (quad - 2 * lin + lams[:, None] * reg[None]) * colmask
    return jnp.sum(per / scale[:, None])

  def step(carry, _):
    w, state = carry
    grad = jax.grad(loss)(w) * mask  # the structural zeros get no update
    return optim.optax_step(opt, grad, state, w), None

  (w, _), _ = jax.lax.scan(step, (w_init, opt.init(w_init)), None, length=steps)
  return w
