"""MergeLock-style protection: function-preserving maps that break mergeability.

A model's function is unchanged by many reparametrisations: permuting the
hidden units of a group (and the rows that read them), scaling the units of
a group followed by a positively homogeneous activation (ReLU) by ``d > 0``
and the reading rows by ``1 / d``, and, inside attention, any invertible
``A`` per head on the query/key pair (``q A`` and ``k A^-T`` leave ``q k^T``
unchanged) and ``B`` on the value/output pair (``v B`` then ``B^-1 W_o``).
`merge_lock` draws such maps at random: the locked model computes the same
function, but it has left the basin it shares with its siblings, so averaging
it with them (task arithmetic, TIES, ...) mixes unrelated coordinates.

`unlock` is the matching counter-measure given a reference model from the
shared basin (e.g. the public base model): per group a scale-invariant
assignment of units (cosine of their incoming weights) and a least-squares
scale, and per attention head the least-squares maps back onto the
reference's query and value projections. `lock_report` measures how far a
model is from the reference before and after `unlock`, which detects a
transformed model.

MergeLock is known here from its abstract (invertible maps on the
query-key and value-output branches); the per-head maps, the unit
permutations and scales outside attention, and the recovery are designed
from that description and tested against the invariances they rely on.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mergejax import permute
  >>> from mergejax.permute import models
  >>> mlp = models.MLP((16,), num_outputs=3)
  >>> x = jax.random.normal(jax.random.key(0), (4, 5))
  >>> p = mlp.init(jax.random.key(1), x)['params']
  >>> locked = permute.merge_lock(jax.random.key(2), p, permute.mlp_spec(1),
  ...                             scaled=('P_0',)).params
  >>> bool(jnp.allclose(mlp.apply({'params': locked}, x),
  ...                   mlp.apply({'params': p}, x), atol=1e-5))
  True

References:
  Wang et al., 2025, "Model Unmerging: Making Your Models Unmergeable for
  Secure Model Sharing" (MergeLock), https://arxiv.org/abs/2509.01548
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax._src import paths
from mergejax.permute._solvers import solve_assignment
from mergejax.permute._spec import apply_permutation
from mergejax.permute._spec import PermutationSpec
from mergejax.permute._spec import random_permutations

_PROJ = ('query', 'key', 'value', 'out')


class MergeLockResult(NamedTuple):
  """A locked model and the maps that locked it (keep them private).

  Attributes:
    params: the locked params; same function as the input.
    perms: the unit permutation per group (`apply_permutation` convention).
    scales: per scaled group, the positive scale of every (permuted) unit.
    maps: per attention path, ``(A, B)``: the ``[H, dh, dh]`` query/key and
      value/output maps.
  """
  params: Any
  perms: dict[str, jax.Array]
  scales: dict[str, jax.Array]
  maps: dict[str, tuple[jax.Array, jax.Array]]


class LockReport(NamedTuple):
  """How far a model is from a reference, before and after `unlock`.

  Attributes:
    distance: ``|theta - theta_ref| / |theta_ref|`` over all leaves.
    unlocked_distance: the same after `unlock` (function unchanged).
    moved: per group outside attention, the fraction of units `unlock` moved
      to another index.
    scale_spread: per scaled group, the standard deviation of ``log`` of the
      scales `unlock` applied (0 for an unscaled model).
    transformed: the model looks reparametrised: `unlock` at least halves
      its distance to the reference.
  """
  distance: float
  unlocked_distance: float
  moved: dict[str, float]
  scale_spread: dict[str, float]
  transformed: bool


def _roles(spec: PermutationSpec, tree: Any, scaled: Sequence[str]):
  """Per scaled group, the leaves that write it (last axis) and read it.

  Scaling is defined for Dense / Conv kernels (input axis ``-2``, output axis
  ``-1``) and biases; any other use of a scaled group is an error.
  """
  resolved = spec.resolve(tree)
  unknown = set(scaled) - set(spec.groups)
  if unknown:
    raise ValueError(f'merge_lock: scaled groups {sorted(unknown)} are not in the '
                     f'spec (groups {sorted(spec.groups)}).')
  nested = [g for g in scaled if g in spec.nested]
  if nested:
    raise ValueError(f'merge_lock: scaling nested (per-head) groups {nested} is '
                     'not supported; leave them out of `scaled`.')
  roles = {g: {'write': [], 'read': []} for g in scaled}
  for path, ax in resolved.items():
    for i, g in enumerate(ax):
      if g not in roles:
        continue
      leaf = path.rsplit('/', 1)[-1]
      if i == len(ax) - 1 and leaf in ('kernel', 'bias'):
        roles[g]['write'].append(path)
      elif i == len(ax) - 2 and leaf == 'kernel':
        roles[g]['read'].append(path)
      else:
        raise ValueError(
            f'merge_lock: cannot scale group {g!r}: leaf {path!r} uses it on '
            f'axis {i} of {len(ax)}. Scaling keeps the function only for units '
            'between Dense/Conv layers with a positively homogeneous activation '
            '(ReLU) and no norm; leave this group out of `scaled`.')
  return roles


def _scale(tree, roles, scales):
  """Writers' output axis times ``d``, readers' input axis divided by ``d``."""
  ops = {}
  for g, r in roles.items():
    for p in r['write']:
      ops.setdefault(p, []).append((-1, scales[g]))
    for p in r['read']:
      ops.setdefault(p, []).append((-2, 1.0 / scales[g]))

  def leaf(path, x):
    if path not in ops:
      return x
    y = jnp.asarray(x, jnp.float32)
    for axis, d in ops[path]:
      shape = [1] * y.ndim
      shape[axis] = -1
      y = y * jnp.reshape(d, shape)
    return y.astype(jnp.result_type(x))

  return paths.tree_map_with_path(leaf, tree)


def _attention_leaves(flat, path):
  """The query/key/value/out kernels and biases of a Flax attention at ``path``."""
  need = [f'{path}/{p}/kernel' for p in _PROJ]
  missing = [k for k in need if k not in flat]
  if missing:
    raise ValueError(f'merge_lock: attention {path!r} must be a Flax '
                     'MultiHeadDotProductAttention with query/key/value/out '
                     f'kernels; missing {missing}.')
  q = np.shape(flat[f'{path}/query/kernel'])
  if len(q) != 3 or np.shape(flat[f'{path}/out/kernel'])[:2] != q[1:]:
    raise ValueError(f'merge_lock: attention {path!r} kernels must be query '
                     f'[D, H, dh] and out [H, dh, D]; got query {q}, out '
                     f'{np.shape(flat[f"{path}/out/kernel"])}.')
  return q[1], q[2]


def _random_maps(rng, heads, dh, condition):
  """``[H, dh, dh]`` maps ``U diag(s) V^T``, singular values within ``condition``."""
  u = np.linalg.qr(rng.normal(size=(heads, dh, dh)))[0]
  v = np.linalg.qr(rng.normal(size=(heads, dh, dh)))[0]
  s = np.exp(rng.uniform(-0.5, 0.5, size=(heads, 1, dh)) * np.log(condition))
  return (u * s) @ np.swapaxes(v, -1, -2)


def _map_attention(flat, path, a, b):
  """``q A``, ``k A^-T``, ``v B``, ``B^-1 W_o`` per head (a, b: ``[H, dh, dh]``)."""
  out = dict(flat)
  a_inv_t = np.swapaxes(np.linalg.inv(a), -1, -2)
  b_inv = np.linalg.inv(b)
  for proj, m in (('query', a), ('key', a_inv_t), ('value', b)):
    for leaf, eq in (('kernel', 'dhk,hkj->dhj'), ('bias', 'hk,hkj->hj')):
      key = f'{path}/{proj}/{leaf}'
      if key in flat:
        x = flat[key]
        out[key] = jnp.einsum(eq, jnp.asarray(x, jnp.float32),
                              jnp.asarray(m, jnp.float32)).astype(x.dtype)
  key = f'{path}/out/kernel'
  x = flat[key]
  out[key] = jnp.einsum('hjk,hkd->hjd', jnp.asarray(b_inv, jnp.float32),
                        jnp.asarray(x, jnp.float32)).astype(x.dtype)
  return out


def merge_lock(key: jax.Array, params: Any, spec: PermutationSpec, *,
               scaled: Sequence[str] = (), scale_range: float = 8.0,
               attention: Sequence[str] = (),
               condition: float = 8.0) -> MergeLockResult:
  """Locks ``params`` with random function-preserving maps (module docstring).

  Args:
    key: PRNG key for the maps.
    params: the model's params; ``spec`` must describe them exactly.
    spec: the hidden unit groups (`PermutationSpec`); every group is
      permuted at random.
    scaled: groups whose units are also scaled by ``d`` in
      ``[1 / scale_range, scale_range]`` (log-uniform): only units between
      Dense/Conv layers with a positively homogeneous activation (ReLU) and
      no norm, where scaling keeps the function.
    scale_range: the largest scale factor.
    attention: paths of Flax ``MultiHeadDotProductAttention`` modules whose
      query/key and value/output pairs get random invertible maps per head
      (no rotary embedding between the projections and the dot product).
    condition: condition number bound of the attention maps.

  Returns:
    A `MergeLockResult`.
  """
  if not scale_range >= 1.0 or not condition >= 1.0:
    raise ValueError(f'merge_lock: scale_range and condition must be >= 1, got '
                     f'{scale_range} and {condition}.')
  k_perm, k_scale, k_attn = jax.random.split(key, 3)
  perms = random_permutations(spec, params, k_perm)
  locked = apply_permutation(spec, perms, params)
  roles = _roles(spec, params, scaled)
  sizes = spec.group_sizes(params)
  scales = {}
  for i, g in enumerate(sorted(roles)):
    u = jax.random.uniform(jax.random.fold_in(k_scale, i), (sizes[g],),
                           minval=-1.0, maxval=1.0)
    scales[g] = jnp.exp(u * jnp.log(float(scale_range)))
  locked = _scale(locked, roles, scales)
  maps = {}
  if attention:
    flat = paths.flatten_to_dict(locked)
    data = np.asarray(jax.random.key_data(k_attn)).astype(np.uint64).ravel()
    rng = np.random.default_rng([int(x) for x in data])
    for path in attention:
      heads, dh = _attention_leaves(flat, path)
      a = _random_maps(rng, heads, dh, condition)
      b = _random_maps(rng, heads, dh, condition)
      flat = _map_attention(flat, path, a, b)
      maps[path] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    locked = paths.unflatten_like(locked, flat)
  return MergeLockResult(locked, perms, scales, maps)


def _writer_rows(flat, resolved, g, known=None):
  """``[n, m]``: every unit's incoming weights (leaves writing g), float64.

  With ``known``, only leaves whose other axes are None or in ``known`` (so
  already in the reference's coordinates) count.
  """
  cols = []
  for path, ax in sorted(resolved.items()):
    if not ax or ax[-1] != g:
      continue
    if known is not None and any(h is not None and h not in known for h in ax[:-1]):
      continue
    x = np.asarray(flat[path], np.float64)
    cols.append(np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1))
  return np.concatenate(cols, 1) if cols else None


def _unit(w):
  return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)


def _head_map(src, ref):
  """Per head the least-squares ``M`` with ``src @ M ~ ref`` (``[H, rows, dh]``)."""
  return np.stack([np.linalg.lstsq(s, r, rcond=None)[0] for s, r in zip(src, ref)])


def _projection_rows(flat, path, proj):
  """``[H, D (+1), dh]``: a projection's kernel rows per head (bias as a row)."""
  k = np.asarray(flat[f'{path}/{proj}/kernel'], np.float64).transpose(1, 0, 2)
  b = flat.get(f'{path}/{proj}/bias')
  if b is not None:
    k = np.concatenate([k, np.asarray(b, np.float64)[:, None]], 1)
  return k


def _attention_groups(spec, resolved, attention):
  """Groups used only inside the attention modules (recovered with them)."""
  inside, outside = set(), set()
  for path, ax in resolved.items():
    where = inside if any(path.startswith(a + '/') for a in attention) else outside
    where.update(g for g in ax if g is not None)
  return inside - outside


def _match_heads(flat, ref_flat, path):
  """Permutes the heads of ``path`` onto the reference's, by their invariants.

  Per head, ``W_Q W_K^T`` and ``W_V W_O`` (``[D, D]``) are unchanged by the
  per-head maps, so heads are matched on them (cosine, one assignment).
  """
  def invariants(f):
    q = np.asarray(f[f'{path}/query/kernel'], np.float64)
    k = np.asarray(f[f'{path}/key/kernel'], np.float64)
    v = np.asarray(f[f'{path}/value/kernel'], np.float64)
    o = np.asarray(f[f'{path}/out/kernel'], np.float64)
    qk = np.einsum('dhk,ehk->hde', q, k).reshape(q.shape[1], -1)
    vo = np.einsum('dhk,hke->hde', v, o).reshape(q.shape[1], -1)
    return np.concatenate([_unit(qk), _unit(vo)], 1)
  perm = np.asarray(solve_assignment(jnp.asarray(
      invariants(ref_flat) @ invariants(flat).T, jnp.float32)))
  out = dict(flat)
  for proj in ('query', 'key', 'value'):
    for leaf, axis in (('kernel', 1), ('bias', 0)):
      key = f'{path}/{proj}/{leaf}'
      if key in flat:
        out[key] = jnp.take(flat[key], perm, axis=axis)
  out[f'{path}/out/kernel'] = jnp.take(flat[f'{path}/out/kernel'], perm, axis=0)
  return out


def unlock(params: Any, reference: Any, spec: PermutationSpec, *,
           scaled: Sequence[str] = (), attention: Sequence[str] = ()) -> Any:
  """Maps ``params`` back towards ``reference`` with function-preserving maps.

  Groups outside attention are recovered one at a time, each from the
  leaves that write it and read only groups already recovered: a
  maximum-cosine assignment of the units' incoming weights to the
  reference's (invariant to each unit's scale) and, for ``scaled`` groups,
  the least-squares positive scale per unit. In each attention module the
  heads are matched on their invariants ``W_Q W_K^T`` and ``W_V W_O``, then
  each head's query and value maps are the least-squares maps onto the
  reference's projections (the key and output get their inverses), so the
  attention output is unchanged. Exact for a locked copy of the reference;
  for a locked fine-tune it recovers as much as the fine-tune still
  resembles the reference.

  Args:
    params: the (possibly locked) model.
    reference: a model of the same architecture from the shared basin.
    spec: the unit groups, as for `merge_lock`.
    scaled: groups whose unit scales are also recovered.
    attention: Flax attention paths whose heads and per-head maps are
      recovered (groups used only inside them are recovered this way).

  Returns:
    The params, same function, in the reference's coordinates as far as the
    maps recover them.
  """
  return _unlock(params, reference, spec, scaled, attention)[0]


def _unlock(params, reference, spec, scaled, attention):
  """`unlock`, also returning the recovered permutations and scales per group."""
  resolved = spec.resolve(params)
  spec.resolve(reference)
  roles = _roles(spec, params, scaled)
  shapes = spec.perm_shapes(params)
  found_perms, found_scales = {}, {}
  in_attention = _attention_groups(spec, resolved, attention)
  todo = [g for g in spec.groups if g not in in_attention]
  nested = [g for g in todo if g in spec.nested]
  if nested:
    raise ValueError(f'unlock: nested groups {nested} outside the attention '
                     'modules are not supported; pass their attention paths.')
  out = params
  ref_flat = paths.flatten_to_dict(reference)
  done = set()
  while todo:
    flat = paths.flatten_to_dict(out)
    # Next: the group with the largest share of its incoming weights already
    # in the reference's coordinates (all of them, outside cycles such as a
    # residual stream); only those weights are compared.
    ready = lambda h, known: (0 if (w := _writer_rows(flat, resolved, h, known))
                              is None else w.shape[1])
    g = max(todo, key=lambda h: ready(h, done) / max(ready(h, None), 1))
    if ready(g, None) == 0:
      raise ValueError(f'unlock: no leaf writes group {g!r} on its last axis, so '
                       'its units cannot be matched.')
    known = done if ready(g, done) else None
    src = _writer_rows(flat, resolved, g, known)
    ref = _writer_rows(ref_flat, resolved, g, known)
    perm = solve_assignment(jnp.asarray(_unit(ref) @ _unit(src).T, jnp.float32))
    perms = {h: jnp.broadcast_to(jnp.arange(s[-1], dtype=jnp.int32), s)
             for h, s in shapes.items()}
    perms[g] = found_perms[g] = perm
    out = apply_permutation(spec, perms, out)
    if g in roles:
      src = src[np.asarray(perm)]
      d = np.sum(src * ref, 1) / np.maximum(np.sum(src * src, 1), 1e-30)
      # A non-positive fit says nothing about the scale: keep the norm ratio.
      ratio = np.linalg.norm(ref, axis=1) / np.maximum(np.linalg.norm(src, axis=1),
                                                       1e-30)
      d = found_scales[g] = np.where(d > 0, d, ratio)
      out = _scale(out, {g: roles[g]}, {g: jnp.asarray(d, jnp.float32)})
    todo.remove(g)
    done.add(g)
  if attention:
    flat = paths.flatten_to_dict(out)
    for path in attention:
      _attention_leaves(flat, path)
      flat = _match_heads(flat, ref_flat, path)
      a = _head_map(_projection_rows(flat, path, 'query'),
                    _projection_rows(ref_flat, path, 'query'))
      b = _head_map(_projection_rows(flat, path, 'value'),
                    _projection_rows(ref_flat, path, 'value'))
      flat = _map_attention(flat, path, a, b)
    out = paths.unflatten_like(out, flat)
  return out, found_perms, found_scales


def _distance(a, b):
  fa, fb = paths.flatten_to_dict(a), paths.flatten_to_dict(b)
  num = sum(float(np.sum((np.asarray(fa[k], np.float64) -
                          np.asarray(fb[k], np.float64)) ** 2)) for k in fa)
  den = sum(float(np.sum(np.asarray(fb[k], np.float64) ** 2)) for k in fa)
  return float(np.sqrt(num / max(den, 1e-30)))


def lock_report(params: Any, reference: Any, spec: PermutationSpec, *,
                scaled: Sequence[str] = (),
                attention: Sequence[str] = ()) -> LockReport:
  """Detects a reparametrised model: its distance to ``reference`` before and after `unlock`.

  A fine-tune of the reference stays near it, and `unlock` changes little; a
  locked model is far from it, and `unlock` brings it back close. The
  ``transformed`` flag is that heuristic (distance at least halved).

  Args:
    params: the model to check.
    reference: a model of the same architecture from the shared basin.
    spec: the unit groups.
    scaled: groups whose scales `unlock` recovers.
    attention: attention paths whose maps `unlock` recovers.

  Returns:
    A `LockReport`.
  """
  unlocked, perms, scales = _unlock(params, reference, spec, scaled, attention)
  before, after = _distance(params, reference), _distance(unlocked, reference)
  moved = {g: float(np.mean(np.asarray(p) != np.arange(len(p))))
           for g, p in perms.items()}
  spread = {g: float(np.std(np.log(d))) for g, d in scales.items()}
  return LockReport(before, after, moved, spread, bool(after < 0.5 * before))
