"""Per-matrix SVD bases and subspace projections.

Which leaves are matrices is a *static, explicit* rule, never a silent guess:

* a leaf whose per-model shape is 2-D is a matrix;
* with ``conv='reshape'`` a leaf of rank >= 3 (a Flax conv kernel
  ``(kh, kw, in, out)``) is viewed as the matrix ``(kh*kw*in, out)``;
* ``include`` / ``exclude`` path regexes narrow the set further. A leaf that
  ``include`` names explicitly but that is not a matrix is an error naming the
  leaf (a matrix-only step was pointed at a vector).

Leaves outside the set are handled by the caller's ``non_matrix`` rule:
``'error'`` (the default for primitives), ``'keep'`` (pass through unchanged)
or, in the merge methods, ``other='mean' | 'sum' | 'zero'``.

Orientation. A Flax kernel is ``(in, out)`` (layout ``'in_out'``); PyTorch
and Hugging Face store linear weights ``(out, in)`` (``'out_in'``). SVD
truncation, polar factors and Iso-C are transpose-equivariant; steps that act
on one side (``project(side=...)``, Iso-CTS, KnOTS, WIDEN) take a layout,
``'auto'`` by default: each leaf's orientation comes from its name, which
travels with the tensor — ``…weight`` (PyTorch, Hugging Face checkpoints as
`mergejax.io` loads them) is ``(out, in)``, any other name (Flax ``kernel``)
``(in, out)``.

All SVDs run in float32, batched over the model axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import base
from mergejax._src import paths

CONV_MODES = ('none', 'reshape')
LAYOUTS = ('auto', 'in_out', 'out_in')


class SVDBasis(NamedTuple):
  """Truncated SVD factors of a (batched) matrix: ``x ~= u @ diag(s) @ vh``.

  Shapes (with the model axis): ``u [K, m, r]``, ``s [K, r]``, ``vh [K, r, n]``.
  """
  u: jax.Array
  s: jax.Array
  vh: jax.Array


# ----------------------------------------------------------------------------
# Matrix views of leaves.


def matrix_shape(shape: tuple[int, ...], conv: str) -> tuple[int, int] | None:
  """The ``(m, n)`` matrix view of a per-model leaf shape, or None."""
  if conv not in CONV_MODES:
    raise ValueError(f'conv must be one of {CONV_MODES}, got {conv!r}.')
  if len(shape) == 2:
    return int(shape[0]), int(shape[1])
  if len(shape) >= 3 and conv == 'reshape':
    m = 1
    for d in shape[:-1]:
      m *= int(d)
    return m, int(shape[-1])
  return None


def matrix_paths(flat: dict[str, Any], *, include: Any = None,
                 exclude: Any = None, conv: str = 'none',
                 model_axis: bool = True, what: str = 'this step'
                 ) -> tuple[str, ...]:
  """Paths of the leaves treated as matrices (see the module docstring).

  Args:
    flat: ``{path: leaf}``.
    include: None (every matrix-shaped leaf) or a path mask; leaves it selects
      must be matrices.
    exclude: None or a path mask of leaves never treated as matrices.
    conv: ``'none'`` or ``'reshape'`` (conv kernels as ``(kh*kw*in, out)``).
    model_axis: whether leaves carry a leading model axis.
    what: the step's name, for error messages.

  Raises:
    ValueError: if ``include`` selects a leaf that is not a matrix.
  """
  inc = None if include is None else paths.make_predicate(include)
  exc = None if exclude is None else paths.make_predicate(exclude)
  out = []
  for p, x in flat.items():
    if exc is not None and exc(p):
      continue
    shape = tuple(x.shape[1:] if model_axis else x.shape)
    is_mat = matrix_shape(shape, conv) is not None
    if inc is not None:
      if not inc(p):
        continue
      if not is_mat:
        hint = (" (pass conv='reshape' to treat it as a matrix)"
                if len(shape) > 2 else '')
        raise ValueError(
            f'{what}: leaf {p!r} has shape {shape}, which is not a matrix, but '
            f'`include` selects it{hint}. Narrow `include` (e.g. '
            r"r'kernel$') or add the leaf to `exclude`.")
    if is_mat:
      out.append(p)
  return tuple(out)


def to_matrix(x: jax.Array, conv: str, *, batch_dims: int = 1) -> jax.Array:
  """Reshapes ``x [*batch, *shape]`` to ``[*batch, m, n]``."""
  lead = x.shape[:batch_dims]
  m, n = matrix_shape(tuple(x.shape[batch_dims:]), conv)
  return x.reshape(*lead, m, n)


def check_rank(rank: int, m: int, n: int, path: str, what: str) -> int:
  """Validates a static rank for an ``m x n`` matrix and returns it."""
  if not isinstance(rank, int) or isinstance(rank, bool):
    raise ValueError(f'{what}: rank must be a Python int (it sets array '
                     f'shapes), got {rank!r}.')
  if rank < 1 or rank > min(m, n):
    raise ValueError(
        f'{what}: rank {rank} is impossible for leaf {path!r}, a {m}x{n} '
        f'matrix (rank must be in [1, {min(m, n)}]). Lower the rank, use a '
        'fraction (e.g. rank=0.1), or exclude the leaf.')
  return rank


def resolve_rank(rank: int | float | None, m: int, n: int, path: str,
                 what: str) -> int:
  """Rank from an int, a fraction in (0, 1] of ``min(m, n)``, or None (full)."""
  r = min(m, n)
  if rank is None:
    return r
  if isinstance(rank, float):
    if not 0.0 < rank <= 1.0:
      raise ValueError(f'{what}: a fractional rank must lie in (0, 1], got '
                       f'{rank}.')
    return max(1, int(r * rank))
  return check_rank(rank, m, n, path, what)


# ----------------------------------------------------------------------------
# Dense linear algebra helpers (float32, batched over leading axes).


def one_matrix_at_a_time(fn):
  """Wraps a LAPACK-backed ``fn`` of ``[m, n]`` to map batches sequentially.

  jaxlib's CPU LAPACK kernels split a *batched* call over XLA's intra-op
  thread pool and block a pool thread until the pieces finish; when every
  pool thread is inside such a call (two batched SVDs running side by side
  on a 2-core machine), none is left to run the pieces and the process
  hangs with all threads idle (seen in the default experiment, jaxlib
  0.10.2). Calling LAPACK on one matrix at a time, also under ``vmap``,
  never blocks a pool thread.

  Args:
    fn: a function of one matrix (last two axes), e.g. ``jnp.linalg.svd``.

  Returns:
    ``fn`` for ``[..., m, n]`` inputs: leading axes (and ``vmap`` axes) are
    mapped with ``lax.map``.
  """
  @jax.custom_batching.custom_vmap
  def one(x):
    return fn(x)

  @one.def_vmap
  def _batched(axis_size, in_batched, x):  # pylint: disable=unused-variable
    del axis_size, in_batched
    out = jax.lax.map(one, x)
    return out, jax.tree.map(lambda _: True, out)

  def apply(x):
    if x.ndim == 2:
      return one(x)
    lead = x.shape[:-2]
    out = jax.lax.map(one, x.reshape((-1,) + x.shape[-2:]))
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)

  return apply


_svd = one_matrix_at_a_time(
    lambda m: jnp.linalg.svd(m, full_matrices=False))
qr = one_matrix_at_a_time(jnp.linalg.qr)
eigh = one_matrix_at_a_time(jnp.linalg.eigh)


def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD in float32: ``x = u @ diag(s) @ vh`` over the last two axes.

  Batches run one matrix per LAPACK call (see `one_matrix_at_a_time`).
  """
  return tuple(_svd(x.astype(jnp.float32)))


def truncated_svd(x: jax.Array, rank: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-``rank`` singular triplets of ``x [..., m, n]`` (float32)."""
  u, s, vh = svd(x)
  return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def polar(x: jax.Array) -> jax.Array:
  """Orthogonal polar factor ``P Q^T`` of ``x = P S Q^T`` (closest orthonormal).

  Commutes with transposition, so it is layout-independent.
  """
  p, _, qh = svd(x)
  return p @ qh


def low_rank(x: jax.Array, rank: int) -> jax.Array:
  """Best rank-``rank`` approximation (Eckart-Young) of ``x [..., m, n]``."""
  u, s, vh = truncated_svd(x, rank)
  return (u * s[..., None, :]) @ vh


def swap_layout(x: jax.Array) -> jax.Array:
  """Transposes the last two axes (``(in, out)`` <-> ``(out, in)``)."""
  return jnp.swapaxes(x, -1, -2)


def check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  return layout


def leaf_layout(path: str, layout: str) -> str:
  """The orientation of the leaf at ``path``: ``layout``, or from its name.

  With ``'auto'``, a leaf whose name ends in ``weight`` (PyTorch /
  Hugging Face: ``model.layers.0.mlp.up_proj.weight``) is ``'out_in'``;
  every other leaf (Flax ``…/kernel``) is ``'in_out'``.

  Example:
    >>> leaf_layout('model.layers.0.mlp.up_proj.weight', 'auto')
    'out_in'
    >>> leaf_layout('Dense_0/kernel', 'auto'), leaf_layout('w', 'out_in')
    ('in_out', 'out_in')
  """
  if check_layout(layout) != 'auto':
    return layout
  name = path.rsplit('/', 1)[-1].rsplit('.', 1)[-1]
  return 'out_in' if name == 'weight' else 'in_out'


def to_out_in(x: jax.Array, layout: str) -> jax.Array:
  """Views a matrix in PyTorch orientation ``(out, in)`` (a resolved layout)."""
  if layout not in ('in_out', 'out_in'):
    raise ValueError(f"to_out_in needs 'in_out' or 'out_in' (resolve 'auto' "
                     f'with leaf_layout), got {layout!r}.')
  return swap_layout(x) if layout == 'in_out' else x


from_out_in = to_out_in  # The transpose is its own inverse.


def project_matrix(x: jax.Array, basis: jax.Array, *, side: str,
                   mode: str) -> jax.Array:
  """Projects ``x [..., m, n]`` onto / orthogonally to ``span(basis)``.

  Args:
    x: the matrices.
    basis: orthonormal columns; ``[..., m, r]`` for ``side='left'`` (column
      space of x), ``[..., n, r]`` for ``side='right'`` (row space).
    side: ``'left'`` or ``'right'``.
    mode: ``'onto'`` (``B B^T x``) or ``'orthogonal'`` (``x - B B^T x``).
  """
  if side == 'left':
    p = basis @ (swap_layout(basis) @ x)
  elif side == 'right':
    p = (x @ basis) @ swap_layout(basis)
  else:
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  if mode == 'onto':
    return p
  if mode == 'orthogonal':
    return x - p
  raise ValueError(f"mode must be 'onto' or 'orthogonal', got {mode!r}.")


# ----------------------------------------------------------------------------
# Transformations.


def svd_basis(rank: int | float | None, *, include: Any = None,
              exclude: Any = None, conv: str = 'none',
              non_matrix: str = 'error') -> base.MergeTransformation:
  """Replaces every matrix leaf by its per-model truncated SVD (`SVDBasis`).

  ``[K, m, n] -> SVDBasis(u [K, m, r], s [K, r], vh [K, r, n])``, batched over
  the model axis, in float32. Conv kernels become ``(kh*kw*in, out)`` matrices
  with ``conv='reshape'``. Follow it with `from_basis` (or a custom step) to
  get dense tensors back.

  Args:
    rank: static rank: an int (error if a matrix cannot have it), a fraction
      of ``min(m, n)`` as a float in (0, 1], or None for full rank.
    include: path mask of the leaves to decompose (None: every matrix).
    exclude: path mask of leaves to leave out.
    conv: ``'none'`` or ``'reshape'``.
    non_matrix: what to do with leaves that are not decomposed: ``'error'``
      (default; names the leaf) or ``'keep'`` (pass them through unchanged).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.svd_basis(1)
    >>> out, _ = tx.update({'w': jnp.ones((3, 4, 2))}, tx.init(None))
    >>> out['w'].u.shape, out['w'].s.shape, out['w'].vh.shape
    ((3, 4, 1), (3, 1), (3, 1, 2))
  """
  if non_matrix not in ('error', 'keep'):
    raise ValueError(f"non_matrix must be 'error' or 'keep', got {non_matrix!r}.")
  return base.stateless(_svd_basis, rank=rank, include=include, exclude=exclude,
                        conv=conv, non_matrix=non_matrix)


def _svd_basis(updates, params, *, key, rank, include, exclude, conv,
               non_matrix):
  del params, key
  flat = paths.flatten_to_dict(updates)
  mats = set(matrix_paths(flat, include=include, exclude=exclude, conv=conv,
                          what='svd_basis'))
  out = {}
  for p, x in flat.items():
    if p not in mats:
      if non_matrix == 'error':
        raise ValueError(
            f'svd_basis: leaf {p!r} (per-model shape {tuple(x.shape[1:])}) is '
            "not a matrix. Pass non_matrix='keep' to pass it through, "
            "exclude it, or conv='reshape' for conv kernels.")
      out[p] = x
      continue
    mat = to_matrix(x, conv)
    r = resolve_rank(rank, mat.shape[-2], mat.shape[-1], p, 'svd_basis')
    out[p] = SVDBasis(*truncated_svd(mat, r))
  return paths.unflatten_like(updates, out)


def from_basis(*, conv: str = 'none') -> base.MergeTransformation:
  """Turns `SVDBasis` leaves back into dense tensors (``u diag(s) vh``).

  With ``conv='reshape'`` the base model (``params``) supplies the original
  kernel shapes; otherwise the dense leaves are matrices.
  """
  return base.stateless(_from_basis, conv=conv)


def _is_basis(x):
  return isinstance(x, SVDBasis)


def _from_basis(updates, params, *, key, conv):
  del key

  def dense(b, p=None):
    if not isinstance(b, SVDBasis):
      return b
    m = (b.u * b.s[..., None, :]) @ b.vh
    if p is not None and conv == 'reshape':
      m = m.reshape(*m.shape[:-2], *p.shape)
    return m

  if params is None:
    return jax.tree.map(dense, updates, is_leaf=_is_basis)
  return jax.tree.map(dense, updates, params, is_leaf=_is_basis)


def project(rank: int | float, *, side: str = 'output', mode: str = 'orthogonal',
            source: str = 'sum', layout: str = 'auto', include: Any = None,
            exclude: Any = None, conv: str = 'none',
            non_matrix: str = 'error') -> base.MergeTransformation:
  """Projects every model's matrix onto / orthogonally to a shared subspace.

  Per matrix leaf, the subspace is spanned by the top-``rank`` singular
  vectors of ``sum_i x_i`` (``source='sum'``) on the chosen ``side``; each
  model's matrix is then projected. Keeps the model axis. Iso-CTS's first step
  is ``project(int(0.8 r), side='output', mode='orthogonal')``.

  Args:
    rank: static subspace rank (int, or fraction of ``min(m, n)``).
    side: ``'output'`` or ``'input'``: which space the subspace lives in.
    mode: ``'onto'`` or ``'orthogonal'``.
    source: ``'sum'`` (sum over models) — the only source for now.
    layout: ``'auto'`` (default: from each leaf's name, `leaf_layout`),
      ``'in_out'`` (Flax kernels) or ``'out_in'`` (PyTorch).
    include: path mask of leaves to project (None: every matrix).
    exclude: path mask of leaves to leave out.
    conv: ``'none'`` or ``'reshape'``.
    non_matrix: ``'error'`` or ``'keep'`` for leaves that are not projected.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> tx = mj.transforms.project(1, mode='onto')
    >>> x = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)]).at[:, 0, 0].mul(3.)
    >>> tx.update({'w': x}, tx.init(None))[0]['w'][1]
    Array([[6., 0.],
           [0., 0.]], dtype=float32)
  """
  if side not in ('output', 'input'):
    raise ValueError(f"side must be 'output' or 'input', got {side!r}.")
  if source != 'sum':
    raise ValueError(f"source must be 'sum', got {source!r}.")
  check_layout(layout)
  if mode not in ('onto', 'orthogonal'):
    raise ValueError(f"mode must be 'onto' or 'orthogonal', got {mode!r}.")
  return base.stateless(_project, rank=rank, side=side, mode=mode,
                        layout=layout, include=include, exclude=exclude,
                        conv=conv, non_matrix=non_matrix)


def _project(updates, params, *, key, rank, side, mode, layout, include,
             exclude, conv, non_matrix):
  del params, key
  flat = paths.flatten_to_dict(updates)
  mats = set(matrix_paths(flat, include=include, exclude=exclude, conv=conv,
                          what='project'))
  # In (in, out) layout the output space is the row space (right side).
  sides = {('output', 'in_out'): 'right', ('input', 'in_out'): 'left',
           ('output', 'out_in'): 'left', ('input', 'out_in'): 'right'}
  out = {}
  for p, x in flat.items():
    mat_side = sides[(side, leaf_layout(p, layout))]
    if p not in mats:
      if non_matrix == 'error':
        raise ValueError(
            f'project: leaf {p!r} (per-model shape {tuple(x.shape[1:])}) is '
            "not a matrix. Pass non_matrix='keep' or exclude it.")
      out[p] = x
      continue
    mat = to_matrix(x, conv)
    r = resolve_rank(rank, mat.shape[-2], mat.shape[-1], p, 'project')
    u, _, vh = truncated_svd(jnp.sum(mat, axis=0), r)
    basis = u if mat_side == 'left' else swap_layout(vh)
    y = project_matrix(mat, basis[None], side=mat_side, mode=mode)
    out[p] = y.reshape(x.shape)
  return paths.unflatten_like(updates, out)
