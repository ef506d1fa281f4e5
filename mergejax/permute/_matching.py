"""Weight matching (Git Re-Basin coordinate descent) on the host and in JAX.

Objective: maximise ``sum_leaves <A, perm(B)>`` over the permutation groups of
a `PermutationSpec` by coordinate descent: each sweep visits the groups in a
fresh random order and solves, for one group with all others fixed, the exact
linear assignment problem on ``C = sum_terms mat(A) mat(B~)^T`` (``mat``
moves the group's axis to the front and flattens the rest; ``B~`` is B with
the current permutations of its *other* axes applied). Stop after a sweep
without progress, or after ``max_iter`` sweeps.

Two implementations of the same algorithm:

* **host** (``solver='auto'``, the default, or ``'scipy'`` / ``'lapjv'``):
  NumPy and a host LAP. It keeps, per (group, leaf) term with one other
  permuted axis, the cost contribution and the permutation it was computed
  with, and updates it with a low-rank correction over the rows that moved
  (late sweeps move few units), and it skips a group whose inputs have not
  changed since it was last solved (its answer is known). BLAS runs on one
  thread between the sequential LAPs (`_Blas`). ``'auto'`` uses the ``lap``
  package's C++ LAPJV (a dependency) (~3x faster than SciPy on these nearly
  solved problems, see `solvers.lapjv_lap`), else SciPy. Same trajectory as
  the plain algorithm, far fewer flops.
* **jax** (``solver='hungarian'`` or ``'sinkhorn'``): pure JAX; the whole loop
  (``while_loop`` over sweeps, ``lax.switch`` over groups) runs under ``jit``
  and on accelerators.

Nested (per-head) groups are solved jointly with their parent: for every
pair of heads (i, j) the inner LAPs give the best within-head matching and its
value, and one H x H LAP on those values matches the heads.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths
from mergejax.permute import _solvers as solvers_lib
from mergejax.permute._spec import PermutationSpec
from mergejax.permute import _spec as spec_lib

_TOL = 1e-12


class MatchingResult(NamedTuple):
  """Permutations, final per-group cost matrices, objective and sweeps used."""
  permutations: dict[str, Any]
  costs: dict[str, Any]
  objective: Any
  sweeps: Any


# --------------------------------------------------------------------------- #
# Shared, array-module-generic pieces (xp is numpy or jax.numpy).
# --------------------------------------------------------------------------- #
def _apply_leaf(xp, x, ax, perms, nested, skip=()):
  """Applies every group of ``ax`` except ``skip`` (parents before children)."""
  return spec_lib.permute_axes(x, ax, nested, set(perms) - set(skip),
                               functools.partial(spec_lib.take_group, xp, perms=perms))


def _mat(xp, x, axis):
  return xp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _mat2(xp, x, a, b):
  return xp.moveaxis(x, (a, b), (0, 1)).reshape(x.shape[a], x.shape[b], -1)


class _Plan(NamedTuple):
  """Static description of the coordinate-descent problem."""
  groups: tuple[str, ...]  # top-level groups, sorted (children ride along)
  terms: dict[str, tuple[tuple[str, int], ...]]  # group -> (path, axis)
  deps: dict[str, frozenset[str]]  # groups whose change alters group's cost
  children: dict[str, tuple[str, ...]]
  nested: dict[str, str]


def _plan(spec: PermutationSpec, resolved: Mapping[str, tuple]) -> _Plan:
  nested = spec.nested
  terms: dict[str, list] = {}
  deps: dict[str, set] = {}
  for path, ax in resolved.items():
    for i, g in enumerate(ax):
      if g is None or g in nested:
        continue
      terms.setdefault(g, []).append((path, i))
      deps.setdefault(g, set()).update(
          h for h in ax if h is not None and h != g and nested.get(h) != g)
  groups = tuple(sorted(terms))
  return _Plan(groups, {g: tuple(sorted(t)) for g, t in terms.items()},
               {g: frozenset(d) for g, d in deps.items()},
               {g: spec.children(g) for g in groups}, nested)


def _group_cost(xp, plan, resolved, a_flat, b_flat, perms, g):
  """Cost of group ``g``; for a parent of nested groups also the inner costs."""
  kids = plan.children[g]
  c = None
  inner = {}
  for path, axis in plan.terms[g]:
    ax = resolved[path]
    a = a_flat[path]
    b = _apply_leaf(xp, b_flat[path], ax, perms, plan.nested, skip=(g,) + kids)
    kid = [(i, h) for i, h in enumerate(ax) if h in kids]
    if kid:
      cax, h = kid[0]
      m = xp.einsum('iur,jvr->ijuv', _mat2(xp, a, axis, cax),
                    _mat2(xp, b, axis, cax))
      inner[h] = m if h not in inner else inner[h] + m
    else:
      t = _mat(xp, a, axis) @ _mat(xp, b, axis).T
      c = t if c is None else c + t
  return c, inner


def _solve_nested(xp, c, inner, lap):
  """Joint head + within-head step: returns (cost, {child: best inner [H,H,d]})."""
  best = {}
  for h, m in inner.items():
    hh, _, d, _ = m.shape
    sig = lap(m.reshape(hh * hh, d, d)).reshape(hh, hh, d)
    val = xp.take_along_axis(m, sig[..., None], axis=-1)[..., 0].sum(-1)
    c = val if c is None else c + val
    best[h] = sig
  return c, best


def _nested_value(xp, c_plain, inner, perm, kid_perms):
  """Objective of (heads ``perm``, children ``kid_perms``) given the costs."""
  n = perm.shape[0]
  rows = xp.arange(n)
  v = 0.0 if c_plain is None else c_plain[rows, perm].sum()
  for h, m in inner.items():
    mm = m[rows, perm]  # [H, d, d]
    v = v + xp.take_along_axis(mm, kid_perms[h][..., None], axis=-1).sum()
  return v


# --------------------------------------------------------------------------- #
# Host implementation.
# --------------------------------------------------------------------------- #
class _Blas:
  """Host BLAS thread policy (through ``threadpoolctl``; a no-op without it).

  The host loop alternates small rank-|S| products with a sequential LAP.
  Multi-threaded BLAS gains nothing on those products, and its worker threads
  spin between calls, competing with the LAP. On a 2-core machine this made
  the loop 1.5-2x slower in wall and CPU time. So the loop runs BLAS on one
  thread and lends it every thread only for full products of more than
  ``big_flops``.
  """
  big_flops = 2e9
  _controller = None

  @classmethod
  def _get(cls):
    if cls._controller is None:
      try:
        import threadpoolctl  # pylint: disable=g-import-not-at-top
        cls._controller = threadpoolctl.ThreadpoolController()
      except Exception:  # pylint: disable=broad-except  # a broken install: no thread policy
        cls._controller = False
    return cls._controller

  @classmethod
  def limit(cls, threads):
    ctl = cls._get()
    if not ctl:
      return contextlib.nullcontext()
    if threads is None:  # every thread: the process default
      threads = max([info['num_threads'] for info in _Blas.defaults()] or [1])
    return ctl.limit(limits=threads, user_api='blas')

  _default_info = None

  @classmethod
  def defaults(cls):
    if cls._default_info is None:
      ctl = cls._get()
      cls._default_info = [] if not ctl else [
          i for i in ctl.info() if i.get('user_api') == 'blas']
    return cls._default_info


def _contract(x, y, axis):
  """``mat(x, axis) @ mat(y, axis)^T`` (``[n, n]``) without layout copies.

  ``x`` and ``y`` are C-contiguous with equal shapes. Viewed as
  ``[pre, n, post]``, the product is one GEMM when ``pre`` or ``post`` is 1
  (BLAS reads the transposed operand in place) and a short sum of GEMMs
  otherwise (e.g. a conv kernel's input axis: 9 spatial taps), instead of a
  transposing copy of both operands.
  """
  n = x.shape[axis]
  pre = int(np.prod(x.shape[:axis], dtype=np.int64))
  post = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
  x3, y3 = x.reshape(pre, n, post), y.reshape(pre, n, post)
  if pre == 1:
    return x3[0] @ y3[0].T
  if post == 1:
    return x3[:, :, 0].T @ y3[:, :, 0]
  if pre <= 32:
    c = x3[0] @ y3[0].T
    for i in range(1, pre):
      c += x3[i] @ y3[i].T
    return c
  return _mat(np, x, axis) @ _mat(np, y, axis).T


class _IncrementalTerm:
  """``mat(A) mat(take(B, p, other))^T`` kept up to date as ``p`` changes.

  ``C(p) = sum_k A[.., k, ..] B[.., p[k], ..]^T`` (``k`` on the other axis);
  when ``p`` changes on rows S the cost changes by the same contraction of
  ``A[.., S, ..]`` with ``B[.., p_new[S], ..] - B[.., p_old[S], ..]``, a
  rank-|S| update instead of a full product. The leaves stay in their own
  layout (`_contract`).
  """

  # A full product costs ~2 n m r n flops, an update ~2 n |S| r n plus the
  # gathers; recompute in full only when most units moved.
  full_fraction = 0.6

  def __init__(self, a, b, axis, other_axis):
    self.a = np.ascontiguousarray(a)
    self.b = np.ascontiguousarray(b)
    self.axis, self.other = axis, other_axis
    self.p = None
    self.c = None

  def cost(self, p):
    m = self.a.shape[self.other]
    if self.p is None:
      changed = None
    else:
      changed = np.nonzero(p != self.p)[0]
      if changed.size == 0:
        return self.c
    if changed is None or changed.size > self.full_fraction * m:
      bp = self.b if np.array_equal(p, np.arange(m)) else np.take(
          self.b, p, axis=self.other)
      n = self.a.shape[self.axis]
      big = 2.0 * n * (self.a.size // n) * n > _Blas.big_flops
      with _Blas.limit(None) if big else contextlib.nullcontext():
        c = _contract(self.a, bp, self.axis)
      if self.c is None:
        self.c = c.astype(np.float64)
      else:
        self.c[...] = c  # re-use the float64 buffer
    else:
      a = np.take(self.a, changed, axis=self.other)
      d = (np.take(self.b, p[changed], axis=self.other) -
           np.take(self.b, self.p[changed], axis=self.other))
      self.c += _contract(a, d, self.axis)  # float32 rank-|S|, float64 sum
    self.p = p.copy()
    return self.c


def _host_matching(*args, **kwargs):
  """NumPy coordinate descent (BLAS on one thread, see `_Blas`)."""
  _Blas.defaults()  # record the default thread counts before limiting
  with _Blas.limit(1):
    return _host_matching_impl(*args, **kwargs)


def _host_matching_impl(spec, resolved, a_flat, b_flat, perms, seed, max_iter,
                        incremental=True, lap_solver='auto'):
  """NumPy/SciPy coordinate descent; returns (perms, costs, sweeps)."""
  lap = functools.partial(solvers_lib.host_lap, solver=lap_solver)
  plan = _plan(spec, resolved)
  nested = plan.nested
  a_flat = {p: np.asarray(x, np.float32) for p, x in a_flat.items()}
  b_flat = {p: np.asarray(x, np.float32) for p, x in b_flat.items()}
  perms = {g: np.asarray(p, np.int32) for g, p in perms.items()}
  # Per (group, path): a cached constant, an incremental term, or None (full).
  cache: dict[tuple[str, str], Any] = {}
  if incremental:
    for g in plan.groups:
      if plan.children[g]:
        continue
      for path, axis in plan.terms[g]:
        ax = resolved[path]
        others = [(i, h) for i, h in enumerate(ax) if h is not None and i != axis]
        if not others:
          cache[(g, path)] = (_mat(np, a_flat[path], axis) @
                              _mat(np, b_flat[path], axis).T).astype(np.float64)
        elif len(others) == 1 and others[0][1] not in nested:
          cache[(g, path)] = (_IncrementalTerm(a_flat[path], b_flat[path], axis,
                                               others[0][0]), others[0][1])

  def plain_cost(g):
    c = None
    for path, axis in plan.terms[g]:
      entry = cache.get((g, path))
      if entry is None:
        ax = resolved[path]
        b = _apply_leaf(np, b_flat[path], ax, perms, nested, skip=(g,))
        t = _mat(np, a_flat[path], axis) @ _mat(np, b, axis).T
      elif isinstance(entry, tuple):
        t = entry[0].cost(perms[entry[1]])
      else:
        t = entry
      if c is None:
        c = np.array(t, np.float64)  # a fresh buffer: cached terms stay intact
      else:
        c += t
    return c

  version = {g: 0 for g in perms}
  seen: dict[str, tuple] = {}
  costs = {}
  rng = np.random.default_rng(seed)
  sweeps = 0
  for it in range(max_iter):
    sweeps = it + 1
    progress = False
    for gi in rng.permutation(len(plan.groups)):
      g = plan.groups[gi]
      stamp = tuple(version.get(h, 0) for h in sorted(plan.deps[g]))
      if seen.get(g) == stamp:
        continue  # same cost matrix as last time: same (non-improving) answer
      seen[g] = stamp
      if plan.children[g]:
        c_plain, inner = _group_cost(np, plan, resolved, a_flat, b_flat, perms, g)
        c_plain = None if c_plain is None else c_plain.astype(np.float64)
        inner = {h: m.astype(np.float64) for h, m in inner.items()}
        old = _nested_value(np, c_plain, inner, perms[g],
                            {h: perms[h] for h in inner})
        c, best = _solve_nested(np, c_plain, inner, lap)
        new_p = lap(c)
        new_kids = {h: s[np.arange(len(new_p)), new_p] for h, s in best.items()}
        new = c[np.arange(len(new_p)), new_p].sum()
      else:
        c = plain_cost(g)
        new_p = lap(c)
        rows = np.arange(len(new_p))
        old, new = c[rows, perms[g]].sum(), c[rows, new_p].sum()
        new_kids = {}
      costs[g] = c
      if new > old + _TOL:
        progress = True
      for h, p in [(g, new_p)] + list(new_kids.items()):
        if not np.array_equal(p, perms[h]):
          perms[h] = p.astype(np.int32)
          version[h] += 1
    if not progress:
      break
  return perms, costs, sweeps


# --------------------------------------------------------------------------- #
# JAX implementation.
# --------------------------------------------------------------------------- #
def _jax_matching(spec, resolved, a_flat, b_flat, perms, key, max_iter, solver):
  plan = _plan(spec, resolved)
  lap = solvers_lib.get_solver(solver)
  a_flat = {p: jnp.asarray(x, jnp.float32) for p, x in a_flat.items()}
  b_flat = {p: jnp.asarray(x, jnp.float32) for p, x in b_flat.items()}
  perms = {g: jnp.asarray(p, jnp.int32) for g, p in perms.items()}
  names = tuple(sorted(perms))
  n_groups = len(plan.groups)

  def step_fn(g):
    kids = plan.children[g]

    def step(perms):
      c_plain, inner = _group_cost(jnp, plan, resolved, a_flat, b_flat, perms, g)
      if kids:
        old = _nested_value(jnp, c_plain, inner, perms[g],
                            {h: perms[h] for h in inner})
        c, best = _solve_nested(jnp, c_plain, inner, lap)
        new_p = lap(c)
        rows = jnp.arange(new_p.shape[0])
        new = c[rows, new_p].sum()
        upd = {g: new_p, **{h: s[rows, new_p] for h, s in best.items()}}
      else:
        c = c_plain
        new_p = lap(c)
        rows = jnp.arange(new_p.shape[0])
        old, new = c[rows, perms[g]].sum(), c[rows, new_p].sum()
        upd = {g: new_p}
      out = dict(perms)
      out.update({h: v.astype(jnp.int32) for h, v in upd.items()})
      # Accept only improvements (float32 ties must not cycle).
      better = new > old + 1e-6 * jnp.abs(old)
      out = {h: jnp.where(better, out[h], perms[h]) for h in names}
      return out, better

    return step

  branches = [step_fn(g) for g in plan.groups]

  def sweep(carry):
    perms, _, it = carry
    order = jax.random.permutation(jax.random.fold_in(key, it), n_groups)

    def body(i, c):
      perms, progress = c
      perms, better = jax.lax.switch(order[i], branches, perms)
      return perms, progress | better

    perms, progress = jax.lax.fori_loop(0, n_groups, body,
                                        (perms, jnp.array(False)))
    return perms, progress, it + 1

  def cond(carry):
    _, progress, it = carry
    return progress & (it < max_iter)

  perms, _, sweeps = jax.lax.while_loop(
      cond, sweep, (perms, jnp.array(n_groups > 0), jnp.array(0)))
  return perms, sweeps


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #
def objective(spec: PermutationSpec, reference: Any, other: Any,
              permutations: Mapping[str, Any] | None = None) -> jax.Array:
  """``sum <reference, perm(other)>`` over the leaves with a permuted axis."""
  if permutations is not None:
    other = spec_lib.apply_permutation(spec, permutations, other)
  resolved = spec.resolve(reference)
  a, b = paths.flatten_to_dict(reference), paths.flatten_to_dict(other)
  total = jnp.zeros((), jnp.float32)
  for path, ax in resolved.items():
    if any(g is not None for g in ax):
      total = total + jnp.vdot(a[path].astype(jnp.float32),
                               b[path].astype(jnp.float32))
  return total


def _seed(key) -> int:
  if key is None:
    return 0
  # Host-side hash of the key bits: no device computation (nothing to compile).
  data = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
  return int(np.bitwise_xor.reduce(data * np.uint64(0x9E3779B1)) % (2**32))


def weight_matching(spec: PermutationSpec, reference: Any, other: Any, *,
                    key: jax.Array | None = None, solver: str = 'auto',
                    max_iter: int = 100,
                    init_permutations: Mapping[str, Any] | None = None,
                    return_costs: bool = False, incremental: bool = True):
  """Git Re-Basin weight matching: permutations aligning ``other`` to ``reference``.

  Coordinate descent over the spec's groups in a fresh random order per sweep,
  one exact LAP per group, until a sweep makes no progress (module docstring).

  Args:
    spec: the `PermutationSpec` covering both trees.
    reference: model A (a pytree), e.g. ``params`` or ``variables``.
    other: model B, same structure and shapes.
    key: PRNG key for the group order (None: a fixed order seed).
    solver: a host solver, ``'auto'`` (default: the ``lap`` package's LAPJV
      when installed, else SciPy), ``'scipy'`` or ``'lapjv'`` (the NumPy
      loop with incremental costs; fastest on CPU; not traceable), or
      ``'hungarian'`` / ``'sinkhorn'`` (the loop in pure JAX: works under
      ``jit``/``vmap`` and on accelerators). The exact solvers give the same
      permutations (up to ties).
    max_iter: maximum number of sweeps.
    init_permutations: starting point (default identity), e.g. the previous
      answer (a warm start).
    return_costs: also return the final cost matrix of every group (PLeaS),
      the objective and the number of sweeps, as a `MatchingResult`.
    incremental: host path only; False recomputes every cost from scratch
      (for benchmarking).

  Returns:
    ``{group: int32 permutation}`` such that
    ``apply_permutation(spec, perms, other)`` is aligned to ``reference``; or a
    `MatchingResult` if ``return_costs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.mlp_spec(1)
    >>> a = {'Dense_0': {'kernel': jax.random.normal(jax.random.key(0), (4, 6)),
    ...                  'bias': jnp.zeros(6)},
    ...      'Dense_1': {'kernel': jax.random.normal(jax.random.key(1), (6, 2)),
    ...                  'bias': jnp.zeros(2)}}
    >>> b = permute.apply_permutation(spec, {'P_0': jnp.array([3, 1, 0, 5, 4, 2])}, a)
    >>> perms = permute.weight_matching(spec, a, b, key=jax.random.key(0))
    >>> perms['P_0']
    Array([2, 1, 5, 0, 4, 3], dtype=int32)
  """
  resolved = spec.resolve(reference)
  ref_flat, oth_flat = check_pair(reference, other)
  spec.group_sizes(reference)
  perms0 = spec_lib.start_permutations(spec, reference, init_permutations)
  if solver in solvers_lib.HOST_SOLVERS:
    traced = any(isinstance(x, jax.core.Tracer)
                 for x in jax.tree.leaves((reference, other, key)))
    if traced:
      raise ValueError(
          f'solver={solver!r} runs on the host and cannot be traced; inside '
          "jit use solver='hungarian', or `permute_align` (which wraps the "
          'host solver in jax.pure_callback).')
    perms, costs, sweeps = _host_matching(spec, resolved, ref_flat, oth_flat,
                                          perms0, _seed(key), max_iter,
                                          incremental=incremental,
                                          lap_solver=solver)
    obj = None
    if return_costs:  # diagnostics only: not paid for by plain calls
      obj = _host_objective(resolved, ref_flat, oth_flat, perms, spec.nested)
      costs = {g: jnp.asarray(c, jnp.float32) for g, c in costs.items()}
    perms = {g: jnp.asarray(p) for g, p in perms.items()}
  else:
    key = jax.random.key(0) if key is None else key
    perms, sweeps = _jax_matching(spec, resolved, ref_flat, oth_flat, perms0,
                                  key, max_iter, solver)
    costs = None
    obj = None
    if return_costs:
      obj = objective(spec, reference, other, perms)
      plan = _plan(spec, resolved)
      costs = {}
      for g in plan.groups:
        c, inner = _group_cost(jnp, plan, resolved, ref_flat, oth_flat, perms, g)
        costs[g] = c
  if not return_costs:
    return perms
  return MatchingResult(perms, costs, obj, sweeps)


def check_pair(reference: Any, other: Any) -> tuple[dict, dict]:
  """Checks that two models have the same leaf paths and shapes.

  Returns:
    Both models flattened (`paths.flatten_to_dict`).

  Raises:
    ValueError: naming the leaves only one model has, or a leaf whose shapes
      differ.
  """
  ref_flat = paths.flatten_to_dict(reference)
  oth_flat = paths.flatten_to_dict(other)
  if set(ref_flat) != set(oth_flat):
    raise ValueError('reference and other have different leaves: '
                     f'{sorted(set(ref_flat) ^ set(oth_flat))[:5]}; both must '
                     'have the same structure.')
  for p, x in ref_flat.items():
    if np.shape(x) != np.shape(oth_flat[p]):
      raise ValueError(f'Leaf {p!r}: reference has shape {np.shape(x)} but '
                       f'other has {np.shape(oth_flat[p])}.')
  return ref_flat, oth_flat


def _host_objective(resolved, a_flat, b_flat, perms, nested):
  total = 0.0
  with _Blas.limit(1):
    for path, ax in resolved.items():
      if any(g is not None for g in ax):
        b = _apply_leaf(np, np.asarray(b_flat[path], np.float32), ax, perms,
                        nested)
        a = np.asarray(a_flat[path], np.float32)
        # Same-dtype float64 operands: a mixed-dtype vdot skips BLAS.
        total += float(np.dot(a.ravel().astype(np.float64),
                              b.ravel().astype(np.float64)))
  return np.float32(total)


def host_permutations_callback(spec: PermutationSpec, reference: Any,
                               others: Any, seed: jax.Array, *,
                               max_iter: int = 100,
                               lap_solver: str = 'auto') -> dict[str, jax.Array]:
  """Host weight matching of each stacked model to ``reference`` from inside jit.

  ``others`` has a leading model axis K; returns ``{group: [K, ...] int32}``.
  Runs through ``jax.pure_callback`` (the host blocks; not differentiable).
  """
  resolved = spec.resolve(reference)
  shapes = spec.perm_shapes(reference)
  k = jax.tree.leaves(others)[0].shape[0]
  names = sorted(shapes)
  out_shapes = {g: jax.ShapeDtypeStruct((k,) + shapes[g], jnp.int32)
                for g in names}
  ref_flat = paths.flatten_to_dict(reference)
  oth_flat = paths.flatten_to_dict(others)

  def host(ref_flat, oth_flat, seed):
    res = {g: [] for g in names}
    ident = {g: np.broadcast_to(np.arange(s[-1], dtype=np.int32), s)
             for g, s in shapes.items()}
    for i in range(k):
      perms, _, _ = _host_matching(
          spec, resolved, ref_flat, {p: np.asarray(x)[i] for p, x in
                                     oth_flat.items()},
          dict(ident), int(seed) + i, max_iter, lap_solver=lap_solver)
      for g in names:
        res[g].append(perms[g])
    return {g: np.stack(v).astype(np.int32) for g, v in res.items()}

  return jax.pure_callback(host, out_shapes, ref_flat, oth_flat, seed)


def merge_many(spec: PermutationSpec, models: list[Any], *,
               key: jax.Array | None = None, max_rounds: int = 20,
               solver: str = 'auto') -> list[dict[str, Any]]:
  """Aligns K models jointly (Git Re-Basin's MergeMany): each to the mean of the rest.

  Starting from identity, every round visits the models in a random order and
  re-matches each (unpermuted) model to the average of the other models in
  their current alignment, until a round changes no permutation.

  Args:
    spec: the `PermutationSpec`.
    models: K >= 2 models with the same structure.
    key: PRNG key for the model and group orders.
    max_rounds: maximum number of rounds.
    solver: as in `weight_matching`.

  Returns:
    One permutation dict per model; apply each to its model, then average.
  """
  k = len(models)
  if k < 2:
    raise ValueError(f'merge_many needs at least 2 models, got {k}.')
  perms = [spec_lib.identity_permutations(spec, models[0]) for _ in range(k)]
  aligned = list(models)
  rng = np.random.default_rng(_seed(key))
  for r in range(max_rounds):
    changed = False
    for i in rng.permutation(k):
      others = [aligned[j] for j in range(k) if j != i]
      mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *others)
      sub = None if key is None else jax.random.fold_in(key, r * k + int(i))
      new = weight_matching(spec, mean, models[i], key=sub, solver=solver,
                            init_permutations=perms[i])
      if any(not np.array_equal(new[g], perms[i][g]) for g in new):
        changed = True
        perms[i] = new
        aligned[i] = spec_lib.apply_permutation(spec, new, models[i])
    if not changed:
      break
  return perms

