"""Parameter paths: '/'-joined names of pytree leaves, and regex selection.

Nested dicts (as Flax produces) get paths like ``'params/Dense_0/kernel'``;
flat dicts (as safetensors produces) keep their keys, e.g.
``'model.layers.0.mlp.up_proj.weight'``. Rules are lists of ``(regex, value)``
pairs searched in order, first match wins, as in big_vision.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
from jax import tree_util

Rule = tuple[str, Any]
Mask = str | Sequence[str] | Callable[[str], bool]


def _key_name(k) -> str:
  if isinstance(k, tree_util.DictKey):
    return str(k.key)
  if isinstance(k, tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath: Iterable[Any]) -> str:
  """Returns the '/'-joined name of a jax key path."""
  return '/'.join(_key_name(k) for k in keypath)


def leaf_paths(tree: Any) -> list[str]:
  """Returns the path of every leaf of ``tree``, in flattening order."""
  return [path_str(p) for p, _ in tree_util.tree_flatten_with_path(tree)[0]]


def tree_map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` whose function also receives the leaf's path string."""
  return tree_util.tree_map_with_path(
      lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def flatten_to_dict(tree: Any) -> dict[str, Any]:
  """Flattens a pytree into ``{path: leaf}`` (insertion-ordered)."""
  flat, _ = tree_util.tree_flatten_with_path(tree)
  return {path_str(p): x for p, x in flat}


def require_same_paths(flat: Mapping[str, Any], ref: Mapping[str, Any],
                       what: str) -> None:
  """Raises a ValueError naming missing and extra paths unless the keys agree."""
  if set(flat) != set(ref):
    raise ValueError(
        f"{what} must have the parameters' tree: missing "
        f'{sorted(set(ref) - set(flat))[:5]}, extra '
        f'{sorted(set(flat) - set(ref))[:5]}.')


def unflatten_like(tree: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten_to_dict` given a tree of the same structure."""
  treedef = jax.tree.structure(tree)
  return jax.tree.unflatten(treedef, [flat[p] for p in leaf_paths(tree)])


def make_predicate(mask: Mask) -> Callable[[str], bool]:
  """Turns a regex, a list of regexes or a callable into ``path -> bool``.

  A regex selects the paths it matches anywhere (``re.search``); anchor it with
  ``^``/``$`` to match whole names.
  """
  if callable(mask):
    return mask
  patterns = [mask] if isinstance(mask, str) else list(mask)
  compiled = [_compile(p) for p in patterns]
  return lambda path: any(c.search(path) for c in compiled)


def _compile(pattern: str) -> re.Pattern[str]:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'Invalid parameter-path regex {pattern!r}: {e}.') from e


def match_rules(rules: Sequence[Rule], path: str, *, what: str = 'rule') -> Any:
  """Returns the value of the first ``(regex, value)`` rule matching ``path``.

  Raises:
    ValueError: if no rule matches; the message names the path and the rules.
  """
  for pattern, value in rules:
    if _compile(pattern).search(path):
      return value
  raise ValueError(
      f'No {what} matches parameter {path!r}; rules are '
      f'{[p for p, _ in rules]}. Add a catch-all rule such as (".*", ...).')


_LAYER_RE = r'(?:^|[/.])(?:layers?|blocks?|h|layer_|block_|Dense_|Block_)[/._]?(\d+)(?:[/.]|$)'


def layer_index(path: str, pattern: str = _LAYER_RE) -> int | None:
  """Reads a layer index from a parameter path with a regex's first group.

  Args:
    path: the parameter path.
    pattern: a regex whose first group captures the index. The default knows
      ``layers.3.``, ``layers_3/``, ``blocks/3/``, ``h.3.`` and ``Dense_3``.

  Returns:
    The index, or None if the path has none.
  """
  m = re.search(pattern, path)
  return int(m.group(1)) if m else None
