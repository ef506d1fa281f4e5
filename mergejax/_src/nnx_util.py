"""Flax nnx modules as pure functions of a parameter pytree.

Merges work on plain pytrees; an nnx module holds its state in objects. Its
pure-dict state (`nnx.to_pure_dict`) is the pytree that merges read and
write, and `functional` turns the module into ``fn(params, *inputs)``.
flax is imported on first use only.
"""

from __future__ import annotations

from typing import Any, Callable


def is_nnx_module(module: Any) -> bool:
  """Whether ``module`` is a Flax nnx module (False when flax is absent)."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return isinstance(module, nnx.Module)


def functional(module: Any, *, prepare: Callable[[Any], None] | None = None
               ) -> tuple[Callable[..., Any], Any]:
  """``(fn, params)``: ``fn(params, *inputs)`` calls ``module`` with ``params``.

  Args:
    module: an nnx module.
    prepare: called on the freshly rebuilt module before each call (e.g. to
      instrument its layers); the module itself is never touched.

  Returns:
    ``fn`` and the module's state as a pure dict (every variable, as
    `nnx.to_pure_dict` spells it).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)

  def fn(params, *inputs):
    # A fresh State each call: replace_by_pure_dict writes into it.
    st = nnx.split(module)[1]
    nnx.replace_by_pure_dict(st, params)
    rebuilt = nnx.merge(graphdef, st)
    if prepare is not None:
      prepare(rebuilt)
    return rebuilt(*inputs)

  return fn, params
