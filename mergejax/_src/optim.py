"""One optax step, robust to the caller's dtype-promotion setting."""

from __future__ import annotations

from typing import Any

import jax
import optax


def optax_step(opt: optax.GradientTransformation, grads: Any, state: Any,
               params: Any) -> tuple[Any, Any]:
  """``opt.update`` then ``optax.apply_updates``: ``(new_params, new_state)``.

  optax mixes Python floats with int32 step counts (Adam's bias correction,
  schedules), which ``jax_numpy_dtype_promotion='strict'`` rejects; the step
  runs under standard promotion whatever the caller's setting.
  """
  with jax.numpy_dtype_promotion('standard'):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
