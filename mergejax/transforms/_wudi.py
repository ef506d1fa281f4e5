"""WUDI: task vectors as a data-free proxy for each task's inputs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mergejax._src import base
from mergejax._src import checks
from mergejax._src import optim
from mergejax.transforms import _matrix as matrix
from mergejax.transforms import _regmean as regmean
from mergejax.transforms import _subspace as subspace

SOLVERS = ('adam', 'closed_form')


class WudiState(NamedTuple):
  """Numeric hyperparameters of `wudi_reduce` (traced, so sweeps vmap)."""
  learning_rate: jax.Array


def wudi_reduce(*, steps: int = 400, learning_rate: float | jax.Array = 1e-5,
                solver: str = 'adam', layout: str = 'auto', exclude: Any = None,
                other: str = 'mean') -> base.MergeTransformation:
  """Merges task vectors by WUDI's data-free interference loss (reducing).

  For a linear layer trained by gradient descent every update is
  ``-eta delta x^T``, so the rows of a task vector ``tau_i`` (PyTorch
  ``(out, in)`` orientation) span the inputs that task saw. WUDI uses them
  as a proxy for the inputs and, per matrix, minimises the interference the
  merged vector ``tau`` causes on them::

      L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

  ``solver='adam'`` follows the paper's code (FusionBench ``wudi_merging``):
  start from ``sum_i tau_i`` and take ``steps`` Adam steps (betas 0.9 /
  0.999, no weight decay) at ``learning_rate``. ``L`` is quadratic, so
  ``solver='closed_form'`` returns its minimiser directly,
  ``tau* = (sum_i c_i tau_i G_i)(sum_i c_i G_i)^+`` with ``G_i = tau_i^T
  tau_i`` and ``c_i = 1 / ||tau_i||^2`` (the minimum-norm solution, which is
  also where Adam from the sum converges); the Adam default is an
  early-stopped approximation of it whose distance from the sum depends on
  ``steps * learning_rate`` relative to the task vectors' scale. A zero task
  vector has no inputs to protect and is left out of the loss (FusionBench
  divides by its zero norm). Non-matrix leaves are reduced by ``other``
  (the mean, as FusionBench).

  Args:
    steps: Adam steps (static; FusionBench's config: 400, its function: 300).
    learning_rate: Adam's learning rate (traced; FusionBench: 1e-5).
    solver: ``'adam'`` or ``'closed_form'``.
    layout: matrix orientation, ``'auto'`` (from the leaf's name),
      ``'in_out'`` (Flax kernels) or ``'out_in'`` (PyTorch weights).
    exclude: path mask of 2-D leaves not to treat as matrices (FusionBench's
      ``exclude_keys``).
    other: rule for non-matrix leaves: ``'mean'``, ``'sum'`` or ``'zero'``.

  Returns:
    A reducing `MergeTransformation` of task vectors ``[K, ...] -> [...]``.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> T = mj.transforms
    >>> tvs = [{'w': jnp.array([[1., 0.], [0., 0.]])},
    ...        {'w': jnp.array([[0., 0.], [0., 2.]])}]
    >>> tx = T.wudi_reduce(solver='closed_form')  # disjoint inputs: the sum
    >>> mj.merge(mj.chain(tx, T.apply_to_base()), {'w': jnp.zeros((2, 2))}, tvs)['w']
    Array([[1., 0.],
           [0., 2.]], dtype=float32)

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding
      Data-Free Model Merging via Task Vectors", ICML 2025.
      https://arxiv.org/abs/2503.08099
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f'steps must be an int >= 0, got {steps!r}.')
  subspace.check_layout(layout)
  lr = checks.hparam(learning_rate, 'learning_rate', low=0.0)
  return base.MergeTransformation(
      lambda params: WudiState(lr),
      base.static_fn.of(_wudi_update, steps=steps, solver=solver, layout=layout,
                        exclude=matrix.static_mask(exclude),
                        other=matrix.check_other(other)))


def wudi_matrix(tvs: jax.Array, *, steps: int, learning_rate: jax.Array,
                solver: str) -> jax.Array:
  """WUDI of stacked ``(out, in)`` task matrices ``[K, m, n] -> [m, n]``."""
  tvs = tvs.astype(jnp.float32)
  norms = jnp.sum(jnp.square(tvs), axis=(1, 2))
  c = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  grams = jnp.einsum('kmi,kmj->kij', tvs, tvs)  # G_i = tau_i^T tau_i
  s = jnp.einsum('k,kij->ij', c, grams)
  a = jnp.einsum('k,kmi,kij->mj', c, tvs, grams)
  if solver == 'closed_form':
    return a @ regmean.pinv_psd(s)

  # The loss is quadratic: its gradient 2 (tau S - A) equals autograd's.
  opt = optax.adam(learning_rate)

  def step(_, carry):
    tau, opt_state = carry
    return optim.optax_step(opt, 2.0 * (tau @ s - a), opt_state, tau)

  tau = jnp.sum(tvs, axis=0)
  tau, _ = jax.lax.fori_loop(0, steps, step, (tau, opt.init(tau)))
  return tau


def _wudi_update(updates, state, params=None, *, key=None, steps, solver,
                 layout, exclude, other):
  del params, key

  def fn(path, x):
    lay = subspace.leaf_layout(path, layout)
    out = wudi_matrix(subspace.to_out_in(x, lay), steps=steps,
                      learning_rate=state.learning_rate, solver=solver)
    return subspace.from_out_in(out, lay)

  return matrix.per_matrix(updates, fn=fn, exclude=exclude, conv='none',
                           other=other, what='wudi_reduce'), state
