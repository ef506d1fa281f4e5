"""Input Gram matrices of a model's linear layers, accumulated in float32."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from mergejax._src import checks
from mergejax._src import nnx_util


def input_grams(inputs_fn: Callable[[Any, Any], Mapping[str, jax.Array]],
                params: Any, batches: Iterable[Any], *,
                num_examples: int | None = None) -> dict[str, jax.Array]:
  """``G = X^T X / N`` of the inputs ``X`` of each linear layer, over data.

  Args:
    inputs_fn: ``inputs_fn(params, x) -> {kernel_path: inputs}``: for each
      linear layer, keyed by its kernel's leaf path (``'Dense_0/kernel'``, as
      `mergejax.leaf_paths` spells it), the inputs it reads, ``[..., d_in]``
      (leading axes -- examples, tokens -- are rows). `linen_dense_inputs`
      builds one for any Flax linen model.
    params: the model's parameters.
    batches: an iterable of inputs ``x`` (or ``(x, y)`` pairs; ``y`` is
      ignored).
    num_examples: stop after this many examples.

  Returns:
    ``{kernel_path: G}``, ``G`` float32 ``[d_in, d_in]`` (rows of all batches
    averaged, as FusionBench's running average).

  Raises:
    ValueError: if no layer or no example was seen, or a Gram holds NaN/Inf.

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
      Models" (RegMean), ICLR 2023. https://arxiv.org/abs/2212.09849
  """
  sums: dict[str, jax.Array] = {}
  rows: dict[str, int] = {}
  seen = 0
  step = _gram_step(inputs_fn)
  for batch in batches:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if num_examples is not None:
      x = x[:num_examples - seen]
    if x.shape[0] == 0:  # an empty batch (e.g. a ragged last split)
      continue
    grams, counts = step(params, x)
    for p, g in grams.items():
      sums[p] = g if p not in sums else sums[p] + g
      rows[p] = rows.get(p, 0) + int(counts[p])
    seen += int(x.shape[0])
    if num_examples is not None and seen >= num_examples:
      break
  if not sums:
    raise ValueError('input_grams: inputs_fn returned no layers, or the '
                     'batches hold no examples.')
  grams = {p: g / rows[p] for p, g in sums.items()}
  checks.check_finite_tree(grams, 'input_grams: the Gram matrix',
                           'the batches or the layers before it produce '
                           'NaN/Inf inputs; check the data and the inputs_fn.')
  return grams


@functools.lru_cache(maxsize=None)
def _gram_step(inputs_fn):
  # One jitted step per inputs_fn (per batch shape): the batch loop reuses it.
  @jax.jit
  def step(params, x):
    grams, counts = {}, {}
    for p, v in inputs_fn(params, x).items():
      v = jnp.asarray(v, jnp.float32).reshape(-1, v.shape[-1])
      grams[p] = v.T @ v
      counts[p] = jnp.asarray(v.shape[0], jnp.int32)
    return grams, counts
  return step


def linen_dense_inputs(module: Any, *, method: str | None = None,
                       **apply_kwargs: Any) -> Callable[[Any, Any],
                                                        dict[str, jax.Array]]:
  """An ``inputs_fn`` for `input_grams` that records every ``nn.Dense`` input.

  Runs ``module.apply({'params': params}, x)`` with a Flax method interceptor,
  so no forward is re-implemented: whatever the model, each ``nn.Dense``
  call's input is recorded under its kernel's path.

  Args:
    module: a Flax linen module.
    method: the module method to run (default ``__call__``).
    **apply_kwargs: extra keyword arguments of ``module.apply``.

  Returns:
    ``inputs_fn(params, x) -> {'<module path>/kernel': inputs}``.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def inputs_fn(params, x):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      if (isinstance(context.module, nn.Dense)
          and context.method_name == '__call__'):
        path = '/'.join(context.module.path + ('kernel',))
        if path in captured:
          raise ValueError(f'nn.Dense {path!r} is called twice per forward; '
                           'write an inputs_fn that says which call to use.')
        captured[path] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      module.apply({'params': params}, x,
                   **({} if method is None else {'method': method}),
                   **apply_kwargs)
    return captured

  return inputs_fn


def nnx_functional(module: Any) -> tuple[Callable[..., Any], Any]:
  """An nnx module as ``(fn(params, *inputs), params)`` for the data-informed merges.

  ``params`` is the module's state as a pure dict (`nnx.to_pure_dict`): the
  pytree that merges, statistics and fits read and write; ``fn`` rebuilds
  the module from such a pytree and calls it, so e.g. ``logits_fn = fn``
  for `fisher_diagonal`. The module itself is never modified.

  Args:
    module: a Flax nnx module.

  Returns:
    ``(fn, params)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mergejax import stats
    >>> fn, params = stats.nnx_functional(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> fn(params, jnp.ones((4, 2))).shape
    (4, 3)
  """
  return nnx_util.functional(module)


def nnx_linear_inputs(module: Any) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """An ``inputs_fn`` for `input_grams` that records every ``nnx.Linear`` input.

  The nnx counterpart of `linen_dense_inputs`: ``inputs_fn(params, x)``
  rebuilds ``module`` from the pure-dict ``params`` (see `nnx_functional`),
  calls it on ``x`` and records each ``nnx.Linear`` call's input under its
  kernel's leaf path (``'l1/kernel'``, ``'layers/0/kernel'``). No forward
  is re-implemented: the rebuilt copy's Linear layers are switched to a
  recording subclass; ``module`` itself is never touched.

  Args:
    module: a Flax nnx module.

  Returns:
    ``inputs_fn(params, x) -> {'<module path>/kernel': inputs}``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mergejax import stats
    >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> _, params = stats.nnx_functional(layer)
    >>> stats.input_grams(stats.nnx_linear_inputs(layer), params,
    ...                   [jnp.ones((4, 2))])['kernel']
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  captured: dict[str, jax.Array] = {}

  def prepare(rebuilt):
    for path, sub in nnx.iter_modules(rebuilt):
      if isinstance(sub, nnx.Linear):
        key = '/'.join(str(k) for k in (*path, 'kernel'))
        sub.__class__ = _recording_linear(type(sub))
        object.__setattr__(sub, '_mergejax_record',
                           functools.partial(_record, captured, key))

  fn, _ = nnx_util.functional(module, prepare=prepare)

  def inputs_fn(params, x):
    captured.clear()
    fn(params, x)
    out = dict(captured)
    captured.clear()
    return out

  return inputs_fn


def _record(captured, key, inputs):
  if key in captured:
    raise ValueError(f'nnx.Linear {key!r} is called twice per forward; write '
                     'an inputs_fn that says which call to use.')
  captured[key] = inputs


@functools.lru_cache(maxsize=None)
def _recording_linear(cls):
  """A subclass of an ``nnx.Linear`` class whose call records its input."""

  class Recording(cls):  # pylint: disable=missing-class-docstring

    def __call__(self, inputs, *args, **kwargs):
      self._mergejax_record(inputs)  # pylint: disable=protected-access
      return super().__call__(inputs, *args, **kwargs)

  Recording.__name__ = Recording.__qualname__ = f'Recording{cls.__name__}'
  return Recording
