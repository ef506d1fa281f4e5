"""Continual merging: OPCM, one model at a time in constant memory.

OPCM (Tang et al. 2025, FusionBench ``opcm``) keeps only the base, the running
merged task vector and a few scalars. For each new model ``t >= 2``, on every
matrix leaf with running merge ``Delta = U S V^T`` it removes from the new
task vector ``tau`` the components ``u_i u_i^T tau v_j v_j^T`` with ``i, j <
rho`` (the subspace holding a fraction ``alpha`` of ``Delta``'s singular-value
mass) and the diagonal ones ``i = j``; other leaves add ``tau`` unchanged. The
sum ``lambda_{t-1} Delta + tau_projected`` is then rescaled to the running mean
task-vector norm: ``lambda_t = ||sum|| / mean_s ||tau_s||``.

FusionBench projects with full ``m x m`` and ``n x n`` singular bases. The
zeroed entries all lie in the leading ``r x r`` block, so
``tau - U_r (P (.) Z) V_r^T`` with the thin SVD gives the same result in
``O((m + n) r)`` memory. The rule is transpose-equivariant (layout-free).

Two interfaces:

* ``opcm(alpha)``, a `MergeTransformation` for ``mergejax.merge`` (the models
  are merged in the order given; shuffle them yourself, as FusionBench does);
* ``opcm_init`` / ``opcm_update`` / ``opcm_params``: feed one model at a time;
  memory is the base plus the running merge, whatever the number of models.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import checks
from mergejax._src import paths
from mergejax.transforms import _subspace as subspace


class OPCMState(NamedTuple):
  """Running state of an OPCM merge (size independent of the model count).

  Attributes:
    alpha: singular-value mass fraction defining the protected subspace.
    merged: the running merged task vector (float32, the base's tree).
    lambda_: the last rescaling factor ``lambda_{t-1}``.
    norm_sum: sum of the task-vector norms seen so far.
    count: number of models merged so far.
  """
  alpha: jax.Array
  merged: Any
  lambda_: jax.Array
  norm_sum: jax.Array
  count: jax.Array


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def project_new_task(delta: jax.Array, tau: jax.Array,
                     alpha: jax.Array) -> jax.Array:
  """OPCM's projection of a new task matrix ``tau`` against the merge ``delta``.

  Args:
    delta: the running merged task matrix ``[m, n]``.
    tau: the new task matrix ``[m, n]``.
    alpha: mass fraction (traced).

  Returns:
    ``tau`` with the protected block and the diagonal (in ``delta``'s
    singular basis) removed.
  """
  u, s, vh = subspace.svd(delta)
  r = s.shape[0]
  # A zero merge (every task vector so far zero) has no spectrum: nothing is
  # protected then, instead of 0 / 0.
  frac = jnp.cumsum(s) / jnp.maximum(jnp.sum(s), jnp.finfo(s.dtype).tiny)
  rho = jnp.argmax(frac > alpha)  # first index past alpha (0 if none)
  p = u.T @ tau @ vh.T  # [r, r]
  i = jnp.arange(r)
  inside = (i[:, None] < rho) & (i[None, :] < rho)
  zero = inside | (i[:, None] == i[None, :])
  return tau - u @ jnp.where(zero, p, 0.0) @ vh


def opcm_init(base_params: Any, alpha: float | jax.Array = 0.5) -> OPCMState:
  """Empty OPCM state for ``base_params`` (no model merged yet).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> base = {'w': jnp.zeros((2, 2))}
    >>> st = mj.transforms.opcm_init(base)
    >>> for ft in [{'w': jnp.eye(2)}, {'w': jnp.ones((2, 2))}]:
    ...   st = mj.transforms.opcm_update(st, base, ft)
    >>> int(st.count), mj.transforms.opcm_params(st, base)['w'].shape
    (2, (2, 2))
  """
  a = checks.hparam(alpha, 'alpha', low=0.0, high=1.0)
  merged = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), base_params)
  return OPCMState(a, merged, jnp.float32(1.0), jnp.float32(0.0),
                   jnp.int32(0))


def step(state: OPCMState, tau: Any, *, exclude, conv) -> OPCMState:
  flat_tau = paths.flatten_to_dict(tau)
  flat_m = paths.flatten_to_dict(state.merged)
  mats = set(subspace.matrix_paths(flat_tau, exclude=exclude, conv=conv,
                                   model_axis=False, what='opcm'))
  n_t = global_norm(tau)
  norm_sum = state.norm_sum + n_t
  count = state.count + 1
  mean_norm = norm_sum / count.astype(jnp.float32)
  new = {}
  for p, t in flat_tau.items():
    d = flat_m[p]
    if p in mats:
      dm = subspace.to_matrix(d, conv, batch_dims=0)
      tm = subspace.to_matrix(t, conv, batch_dims=0)
      t = project_new_task(dm, tm, state.alpha).reshape(t.shape)
    new[p] = state.lambda_ * d + t
  lam = global_norm(new) / jnp.where(mean_norm > 0, mean_norm, 1.0)
  # Zero task vectors leave a zero merge: no rescaling (avoids 0 / 0).
  lam = jnp.where(lam > 0, lam, 1.0)
  first = state.count == 0
  merged = {p: jnp.where(first, flat_tau[p], new[p] / lam) for p in new}
  lam = jnp.where(first, 1.0, lam)
  return OPCMState(state.alpha, paths.unflatten_like(state.merged, merged),
                   lam.astype(jnp.float32), norm_sum, count)


@jax.jit
def task_vector(model, base_params):
  return jax.tree.map(lambda m, b: m.astype(jnp.float32) - b.astype(jnp.float32),
                      model, base_params)


@functools.partial(jax.jit, static_argnames=('exclude', 'conv'))
def update_jit(state, model, base_params, *, exclude, conv):
  return step(state, task_vector(model, base_params), exclude=exclude,
               conv=conv)


def opcm_update(state: OPCMState, base_params: Any, model: Any, *,
                exclude: Any = None, conv: str = 'none',
                check_finite: bool = True) -> OPCMState:
  """Merges one more model into the running OPCM state (jit-compiled once).

  Args:
    state: from `opcm_init` or a previous `opcm_update`.
    base_params: the base model.
    model: the next fine-tuned model (base's tree, shapes and dtypes).
    exclude: path mask of 2-D leaves treated as "other" parameters (pass the
      same value at every step).
    conv: ``'none'`` or ``'reshape'`` (project conv kernels as matrices).
    check_finite: scan the model for NaN/Inf first.

  Raises:
    ValueError: naming the leaf, if ``model``'s tree, shapes or dtypes differ
      from the base's.
  """
  checks.check_models(base_params, [model], check_finite=check_finite)
  if not (exclude is None or isinstance(exclude, str) or callable(exclude)):
    exclude = tuple(exclude)
  return update_jit(state, model, base_params, exclude=exclude, conv=conv)


def opcm_params(state: OPCMState, base_params: Any) -> Any:
  """The current merged model ``theta_0 + merged`` in the base's dtypes."""
  return jax.tree.map(
      lambda b, d: (b.astype(jnp.float32) + d).astype(b.dtype), base_params,
      state.merged)


