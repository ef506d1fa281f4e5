"""T3: test-time interpolation between a pre-trained and a fine-tuned model.

For every test input (T3) or every test batch (T3_B) the two models are run,
the Jensen-Shannon divergence of their predictive distributions sets an
interpolation coefficient, and the input is classified by the interpolated
model. Nothing is trained: the only cost is two extra forward passes and one
merge per input (or per batch).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mergejax._src import checks
from mergejax._src import merge as merge_lib
from mergejax.transforms import _interpolate as interpolate

_PER = ('sample', 'batch')
_WEIGHT_ON = ('pretrained', 'finetuned')


def js_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Jensen-Shannon divergence of ``softmax(logits_p)`` and ``softmax(logits_q)``.

  ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``, in
  nats (so it lies in ``[0, ln 2]``), over the last axis, in fp32 and from
  log-probabilities so confident predictions do not underflow.

  Args:
    logits_p: ``[..., classes]`` logits of the first model.
    logits_q: logits of the second model, the same shape.

  Returns:
    ``[...]`` divergences.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> a = jnp.array([[9., 0.], [0., 0.]])
    >>> mj.methods.js_divergence(a, a[:, ::-1]).round(3)
    Array([0.692, 0.   ], dtype=float32)

  References:
    Lin, "Divergence measures based on the Shannon entropy", IEEE Trans.
      Inf. Theory 37(1), 1991. https://doi.org/10.1109/18.61115
  """
  if jnp.shape(logits_p) != jnp.shape(logits_q) or not jnp.shape(logits_p):
    raise ValueError(
        f'js_divergence needs two [..., classes] logit arrays of one shape, '
        f'got {jnp.shape(logits_p)} and {jnp.shape(logits_q)}.')
  lp = jax.nn.log_softmax(jnp.asarray(logits_p, jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(logits_q, jnp.float32), axis=-1)
  lm = jnp.logaddexp(lp, lq) - jnp.log(2.0)
  kl = lambda la: jnp.sum(jnp.exp(la) * (la - lm), axis=-1)
  # Rounding can make a zero divergence slightly negative.
  return jnp.maximum(0.5 * (kl(lp) + kl(lq)), 0.0)


def t3_coefficients(logits_pt: jax.Array, logits_ft: jax.Array, *,
                    lambda_min: float | jax.Array = 0.0,
                    lambda_max: float | jax.Array = 1.0,
                    gamma: float | jax.Array = 0.5, per: str = 'sample',
                    centered: bool = False) -> jax.Array:
  """T3's coefficient ``lambda(x)`` from the two models' logits.

  ``lambda(x) = lambda_min + (lambda_max - lambda_min) s(gamma JS(x))`` with
  ``s`` the logistic sigmoid (T3). Since ``JS >= 0``, ``sigmoid`` never goes
  below 1/2 and with ``gamma = 0.5`` (and ``JS <= ln 2``) it stays in
  ``[0.5, 0.586]``: ``lambda`` only moves in a sliver of its range.
  ``centered=True`` uses ``2 sigmoid - 1 = tanh(gamma JS / 2)`` instead, which
  maps agreement (``JS = 0``) to ``lambda_min`` and lets ``gamma`` spread the
  coefficients over the whole range.

  Args:
    logits_pt: ``[B, classes]`` logits of the pre-trained model.
    logits_ft: ``[B, classes]`` logits of the fine-tuned model.
    lambda_min: the coefficient's lower end (traced).
    lambda_max: its upper end (traced).
    gamma: the divergence's scale (traced; T3: 0.5).
    per: ``'sample'`` (T3, one coefficient per input) or ``'batch'`` (T3_B,
      the batch mean of the per-sample coefficients, broadcast).
    centered: use ``tanh(gamma JS / 2)`` in place of ``sigmoid(gamma JS)``.

  Returns:
    ``[B]`` coefficients (all equal with ``per='batch'``).

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> a = jnp.array([[9., 0.], [0., 0.]])
    >>> mj.methods.t3_coefficients(a, a[:, ::-1], gamma=4.0).round(3)
    Array([0.941, 0.5  ], dtype=float32)

  References:
    Imam et al., "T3: Test-Time Model Merging in VLMs for Zero-Shot Medical
      Imaging Analysis", 2025. https://arxiv.org/abs/2510.27265
  """
  if jnp.ndim(logits_pt) != 2:
    raise ValueError(f't3: logits must be [batch, classes], got shape '
                     f'{jnp.shape(logits_pt)}; flatten other axes first.')
  return _coefficients(logits_pt, logits_ft, *_settings(
      per, lambda_min, lambda_max, gamma), per=per, centered=centered)


def _settings(per, lambda_min, lambda_max, gamma):
  checks.one_of(per, 'per', _PER, owner='t3')
  return (checks.hparam(lambda_min, 'lambda_min'),
          checks.hparam(lambda_max, 'lambda_max'),
          checks.hparam(gamma, 'gamma', low=0.0))


def _coefficients(logits_pt, logits_ft, lo, hi, g, *, per, centered):
  js = js_divergence(logits_pt, logits_ft)
  s = jnp.tanh(0.5 * g * js) if centered else jax.nn.sigmoid(g * js)
  lam = lo + (hi - lo) * s
  if per == 'batch':
    lam = jnp.broadcast_to(jnp.mean(lam), lam.shape)
  return lam


class T3Output(NamedTuple):
  """What `t3_apply` returns: the interpolated model's ``outputs`` and the
  ``lambdas`` ``[B]`` it used (the weight of the side named by ``weight_on``).

  References:
    Imam et al., "T3: Test-Time Model Merging in VLMs for Zero-Shot Medical
      Imaging Analysis", 2025. https://arxiv.org/abs/2510.27265
  """
  outputs: Any
  lambdas: jax.Array


def t3_apply(apply_fn: Callable[[Any, jax.Array], jax.Array], pretrained: Any,
             finetuned: Any, x: jax.Array, *,
             lambda_min: float | jax.Array = 0.0,
             lambda_max: float | jax.Array = 1.0,
             gamma: float | jax.Array = 0.5, per: str = 'sample',
             weight_on: str = 'pretrained', centered: bool = False,
             chunk: int | None = None) -> T3Output:
  """Classifies a batch with T3 (per input) or T3_B (per batch) merging.

  Both models score ``x``; `t3_coefficients` turns their Jensen-Shannon
  divergence into ``lambda(x)``, and each input is then classified by
  ``theta(x) = (1 - lambda(x)) theta_other + lambda(x) theta_side`` with
  ``theta_side`` the model named by ``weight_on`` -- every parameter the two
  share, the classifier head included. ``per='batch'`` merges once and runs
  one forward pass; ``per='sample'`` merges once per input (``jax.lax.map``
  over ``chunk`` inputs at a time: ``chunk`` merged copies of the model in
  memory, None: the whole batch at once).

  The abstract gives the coefficient but not which model it weights; the
  default ``weight_on='pretrained'`` follows its stated intent (more
  disagreement, more of the generalist), ``'finetuned'`` the opposite reading.
  Both are designs, not verified against the authors' code.

  Args:
    apply_fn: ``apply_fn(params, x) -> [B, classes]`` logits.
    pretrained: the pre-trained model's params.
    finetuned: the fine-tuned model's params (the same structure).
    x: ``[B, ...]`` inputs.
    lambda_min: see `t3_coefficients`.
    lambda_max: see `t3_coefficients`.
    gamma: see `t3_coefficients`.
    per: ``'sample'`` or ``'batch'``.
    weight_on: ``'pretrained'`` or ``'finetuned'``: the model ``lambda``
      weights.
    centered: see `t3_coefficients`.
    chunk: inputs merged at once with ``per='sample'`` (static).

  Returns:
    A `T3Output`.

  Example:
    >>> import jax.numpy as jnp, mergejax as mj
    >>> apply = lambda p, x: x @ p['w']
    >>> pt, ft = {'w': jnp.eye(2)}, {'w': jnp.eye(2)[::-1]}
    >>> out = mj.methods.t3_apply(apply, pt, ft, jnp.ones((3, 2)))
    >>> out.outputs.shape, out.lambdas.shape
    ((3, 2), (3,))

  References:
    Imam et al., "T3: Test-Time Model Merging in VLMs for Zero-Shot Medical
      Imaging Analysis", 2025. https://arxiv.org/abs/2510.27265
  """
  checks.one_of(weight_on, 'weight_on', _WEIGHT_ON, owner='t3')
  if chunk is not None:
    chunk = checks.static_int(chunk, 'chunk', owner='t3_apply', low=1)
  hparams = _settings(per, lambda_min, lambda_max, gamma)
  checks.check_models(pretrained, [finetuned], check_finite=False)
  lam = _coefficients(apply_fn(pretrained, x), apply_fn(finetuned, x),
                      *hparams, per=per, centered=centered)
  # lerp_reduce weights its one model by t and the base by 1 - t.
  start, end = ((finetuned, pretrained) if weight_on == 'pretrained'
                else (pretrained, finetuned))
  interp = functools.partial(_interpolate, start, end)
  if per == 'batch':
    return T3Output(apply_fn(interp(lam[0]), x), lam)

  def one(args):
    t, xi = args
    out = apply_fn(interp(t), xi[None])
    return jax.tree.map(lambda o: o[0], out)

  outputs = jax.lax.map(one, (lam, x), batch_size=chunk)
  return T3Output(outputs, lam)


def _interpolate(start, end, t):
  return merge_lib.merge(interpolate.lerp_reduce(t), start, [end],
                         check_finite=False)
