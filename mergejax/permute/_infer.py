"""`infer_spec`: derive a `PermutationSpec` by tracing a Flax module's jaxpr.

Every axis of every intermediate value is a node of a union-find. Each
primitive either *links* axes that must be permuted together (the two sides of
a ``dot_general`` contraction, corresponding axes of an elementwise op or a
residual add, a broadcast's mapped axes, the feature axes of a convolution) or
*pins* axes whose order matters (spatial axes of a convolution, the
concatenated axis, ``iota`` positions, anything an unknown primitive touches).
Axes linked to the model's inputs or outputs are pinned as well. Every class
of parameter axes that is not pinned is a permutation group: permuting all of
its axes together provably leaves the function unchanged (for the primitives
handled; unknown primitives are treated conservatively).

The jaxpr-based approach is the JAX analogue of PLeaS' torch.fx compiler and
needs no hand-written graph.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend import core as jcore
import numpy as np

from mergejax._src import nnx_util
from mergejax._src import paths
from mergejax.permute._spec import PermutationSpec

# Primitives that have one output of the same shape as every array input but
# are *not* permutation-equivariant along some axis.
_ORDER_SENSITIVE = {
    'cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp', 'sort', 'rev',
    'fft', 'argsort', 'top_k', 'triangular_solve', 'cholesky', 'eigh', 'svd',
    'qr', 'lu', 'conv_general_dilated', 'reduce_window_sum', 'reduce_window',
    'reduce_window_max', 'reduce_window_min', 'select_and_scatter_add',
    'dynamic_update_slice', 'scatter', 'scatter-add', 'scatter_add', 'gather',
    'while', 'cond', 'scan', 'random_bits', 'random_wrap', 'random_seed',
    'threefry2x32', 'iota', 'rng_bit_generator', 'roll', 'pad', 'slice',
    'dynamic_slice', 'concatenate', 'split', 'argmax', 'argmin',
}
_REDUCTIONS = {'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod',
               'reduce_and', 'reduce_or', 'reduce_xor', 'argmax', 'argmin'}


class _UnionFind:

  def __init__(self):
    self.parent: dict[Any, Any] = {}
    self.pinned: set[Any] = set()

  def find(self, x):
    self.parent.setdefault(x, x)
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a, b):
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    self.parent[rb] = ra
    if rb in self.pinned:
      self.pinned.add(ra)

  def pin(self, a):
    self.pinned.add(self.find(a))

  def is_pinned(self, a):
    return self.find(a) in self.pinned


def _is_var(v):
  return not isinstance(v, jcore.Literal)


def _shape(v):
  return tuple(getattr(v.aval, 'shape', ()))


class _Tracer:
  """Walks a jaxpr, linking and pinning axes."""

  def __init__(self):
    self.uf = _UnionFind()
    # Shared sub-jaxprs (e.g. one `relu` jaxpr called at every layer) reuse
    # their Var objects, so nodes are keyed by (call scope, var, axis).
    self.scope = 0
    self._scopes = 0

  def node(self, v, d, scope=None):
    return (self.scope if scope is None else scope, id(v), d)

  def link(self, a, da, b, db, sa=None, sb=None):
    if _is_var(a) and _is_var(b):
      self.uf.union(self.node(a, da, sa), self.node(b, db, sb))

  def pin_all(self, v):
    if _is_var(v):
      for d in range(len(_shape(v))):
        self.uf.pin(self.node(v, d))

  def pin(self, v, d):
    if _is_var(v):
      self.uf.pin(self.node(v, d))

  def keep(self, v):
    # Keep Var objects alive so that their ids stay unique.
    self._alive.append(v)

  def run(self, jaxpr):
    self._alive = getattr(self, '_alive', [])
    for eqn in jaxpr.eqns:
      for v in list(eqn.invars) + list(eqn.outvars):
        self.keep(v)
      self.eqn(eqn)

  def eqn(self, eqn):
    name = eqn.primitive.name
    ins, outs, prm = eqn.invars, eqn.outvars, eqn.params
    sub = None
    for k in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
      if k in prm and name not in ('while', 'cond', 'scan'):
        sub = prm[k]
        break
    if sub is not None:
      inner = getattr(sub, 'jaxpr', sub)
      if len(inner.invars) == len(ins) and len(inner.outvars) == len(outs):
        outer = self.scope
        self._scopes += 1
        self.scope = self._scopes
        for a, b in zip(inner.invars, ins):
          self.keep(a)
          for d in range(len(_shape(a))):
            self.link(a, d, b, d, sb=outer)
        for v in inner.constvars:
          self.pin_all(v)
        self.run(inner)
        for a, b in zip(inner.outvars, outs):
          self.keep(a)
          for d in range(len(_shape(a))):
            self.link(a, d, b, d, sb=outer)
        self.scope = outer
        return
    if name == 'dot_general':
      (lc, rc), (lb, rb) = prm['dimension_numbers']
      lhs, rhs = ins
      out = outs[0]
      for i, j in zip(lc, rc):
        self.link(lhs, i, rhs, j)
      for k, (i, j) in enumerate(zip(lb, rb)):
        self.link(lhs, i, rhs, j)
        self.link(lhs, i, out, k)
      nb = len(lb)
      lfree = [d for d in range(len(_shape(lhs))) if d not in lc and d not in lb]
      rfree = [d for d in range(len(_shape(rhs))) if d not in rc and d not in rb]
      for k, d in enumerate(lfree):
        self.link(lhs, d, out, nb + k)
      for k, d in enumerate(rfree):
        self.link(rhs, d, out, nb + len(lfree) + k)
      return
    if name == 'conv_general_dilated':
      lhs, rhs = ins
      out = outs[0]
      dn = prm['dimension_numbers']
      ls, rs, os = dn.lhs_spec, dn.rhs_spec, dn.out_spec
      self.link(lhs, ls[0], out, os[0])
      if prm.get('feature_group_count', 1) == 1 and prm.get(
          'batch_group_count', 1) == 1:
        self.link(lhs, ls[1], rhs, rs[1])
        self.link(rhs, rs[0], out, os[0 + 1])
      else:
        for v, s in ((lhs, ls), (rhs, rs), (out, os)):
          self.pin(v, s[1])
        self.pin(rhs, rs[0])
      for v, s in ((lhs, ls), (rhs, rs), (out, os)):
        for d in s[2:]:
          self.pin(v, d)
      return
    if name == 'broadcast_in_dim':
      x, out = ins[0], outs[0]
      for i, d in enumerate(prm['broadcast_dimensions']):
        if _shape(x)[i] == _shape(out)[d]:
          self.link(x, i, out, d)
      return
    if name == 'transpose':
      x, out = ins[0], outs[0]
      for i, d in enumerate(prm['permutation']):
        self.link(x, d, out, i)
      return
    if name == 'squeeze':
      x, out = ins[0], outs[0]
      kept = [d for d in range(len(_shape(x))) if d not in prm['dimensions']]
      for i, d in enumerate(kept):
        self.link(x, d, out, i)
      return
    if name == 'reshape':
      self._reshape(ins[0], outs[0])
      return
    if name in _REDUCTIONS:
      x, out = ins[0], outs[0]
      axes = prm['axes']
      kept = [d for d in range(len(_shape(x))) if d not in axes]
      for i, d in enumerate(kept):
        self.link(x, d, out, i)
      if name in ('argmax', 'argmin'):
        for d in axes:
          self.pin(x, d)
      return
    if name not in _ORDER_SENSITIVE and len(outs) == 1:
      out = outs[0]
      so = _shape(out)
      arrays = [v for v in ins if _is_var(v) and _shape(v)]
      if all(len(_shape(v)) == len(so) and all(
          a in (b, 1) for a, b in zip(_shape(v), so)) for v in arrays):
        for v in arrays:  # elementwise, possibly broadcasting size-1 axes
          for d in range(len(so)):
            if _shape(v)[d] == so[d]:
              self.link(v, d, out, d)
        return
    # Unknown or order-sensitive: pin everything it touches.
    for v in list(ins) + list(outs):
      self.pin_all(v)

  def _reshape(self, x, out):
    si, so = _shape(x), _shape(out)
    i = j = 0
    while i < len(si) and j < len(so):
      if si[i] == 1:
        i += 1
        continue
      if so[j] == 1:
        j += 1
        continue
      if si[i] == so[j]:
        self.link(x, i, out, j)
        i += 1
        j += 1
        continue
      # A merge or split of axes: pin the axes involved.
      pi, pj = si[i], so[j]
      gi, gj = [i], [j]
      while pi != pj:
        if pi < pj:
          i += 1
          pi *= si[i]
          gi.append(i)
        else:
          j += 1
          pj *= so[j]
          gj.append(j)
      for d in gi:
        if si[d] != 1:
          self.pin(x, d)
      for d in gj:
        if so[d] != 1:
          self.pin(out, d)
      i += 1
      j += 1


def _trace_fn(module, example_inputs, key, variables):
  """Returns (fn(variables, *inputs), variables) for linen or nnx modules."""
  if nnx_util.is_nnx_module(module):
    fn, pure = nnx_util.functional(module)
    return fn, pure if variables is None else variables
  if variables is None:
    key = jax.random.key(0) if key is None else key
    variables = module.init(key, *example_inputs)
  return (lambda vs, *xs: module.apply(vs, *xs)), variables


def infer_spec(module: Any, *example_inputs: Any, key: jax.Array | None = None,
               variables: Any = None,
               apply_fn: Callable[..., Any] | None = None,
               strip_collection: bool = True) -> PermutationSpec:
  """Derives a `PermutationSpec` from a Flax module by tracing its jaxpr.

  Args:
    module: a Flax linen module (``module.apply(variables, *inputs)``) or an
      nnx module (called as ``module(*inputs)``); ignored if ``apply_fn``.
    *example_inputs: inputs to trace with (shapes only matter).
    key: PRNG key for ``module.init`` when ``variables`` is None.
    variables: the variables to trace with (default: freshly initialised).
    apply_fn: ``apply_fn(variables, *inputs)`` to trace instead of the module.
    strip_collection: key the spec by paths without the leading collection
      name (``'Dense_0/kernel'`` rather than ``'params/Dense_0/kernel'``), as
      the builders do; the spec still applies to the full variables.

  Returns:
    A spec whose groups are named after their first ``(path, axis)`` member;
    compare specs up to renaming with `same_groups`.

  Example:
    >>> import jax.numpy as jnp
    >>> from mergejax import permute
    >>> spec = permute.infer_spec(permute.models.MLP((8,)), jnp.ones((1, 4)))
    >>> permute.same_groups(spec, permute.mlp_spec(1))
    True
  """
  if apply_fn is None:
    fn, variables = _trace_fn(module, example_inputs, key, variables)
  else:
    fn = apply_fn
  closed = jax.make_jaxpr(fn)(variables, *example_inputs)
  jaxpr = closed.jaxpr
  n_vars = len(jax.tree.leaves(variables))
  t = _Tracer()
  t.run(jaxpr)
  for v in jaxpr.invars[n_vars:]:
    t.pin_all(v)
  for v in jaxpr.constvars:
    t.pin_all(v)
  for v in jaxpr.outvars:
    t.pin_all(v)
  flat = paths.flatten_to_dict(variables)
  names = list(flat)
  roots: dict[Any, list[tuple[str, int]]] = {}
  axes = {}
  for path, v in zip(names, jaxpr.invars[:n_vars]):
    key_path = path.partition('/')[2] if strip_collection and '/' in path else path
    ax = []
    for d, size in enumerate(_shape(v)):
      node = t.node(v, d)
      if size <= 1 or t.uf.is_pinned(node):
        ax.append(None)
      else:
        r = t.uf.find(node)
        roots.setdefault(r, []).append((key_path, d))
        ax.append(r)
    axes[key_path] = ax
  group_name = {r: f'{min(members)[0]}:{min(members)[1]}'
                for r, members in roots.items()}
  return PermutationSpec({p: tuple(None if g is None else group_name[g]
                                   for g in ax) for p, ax in axes.items()})


def _partition(spec: PermutationSpec):
  return frozenset(frozenset(v) for v in spec.groups.values())


def same_groups(a: PermutationSpec, b: PermutationSpec) -> bool:
  """True if two specs cover the same leaves with the same groups (names aside)."""
  if set(a.axes) != set(b.axes):
    return False
  return _partition(a) == _partition(b) and len(a.nested) == len(b.nested)


def describe_difference(a: PermutationSpec, b: PermutationSpec) -> str:
  """A readable account of how two specs' groups differ (for test failures)."""
  pa, pb = _partition(a), _partition(b)
  lines = [f'only in first: {sorted(sorted(g) for g in pa - pb)}',
           f'only in second: {sorted(sorted(g) for g in pb - pa)}']
  if set(a.axes) != set(b.axes):
    lines.append(f'leaves differ: {sorted(set(a.axes) ^ set(b.axes))}')
  return '\n'.join(lines)


del np
