"""Restricting transformations to parameter subsets chosen by path regexes."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from mergejax._src import base
from mergejax._src import paths


def _subset(flat: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
  return {p: flat[p] for p in keep}


def masked(inner: base.MergeTransformation,
           mask: paths.Mask) -> base.MergeTransformation:
  """Applies ``inner`` only to the leaves whose path ``mask`` selects.

  Other leaves pass through unchanged, so a masked step must keep the model
  axis (e.g. a sparsifier), or the chain must reduce the other leaves too. To
  give every leaf its own (possibly reducing) step, use `partition`.

  The inner transformation sees the selected leaves as a flat
  ``{path: leaf}`` dict, so global statistics (e.g. a global trim) are taken
  over the selected leaves only.

  Args:
    inner: the transformation to restrict.
    mask: a regex, a list of regexes (any match selects), or ``path -> bool``.

  Returns:
    A `MergeTransformation`.

  Example:
    >>> import mergejax as mj
    >>> trim_kernels = mj.masked(mj.transforms.trim(0.2), r'kernel$')
  """
  pred = paths.make_predicate(mask)

  def init_fn(params):
    flat = paths.flatten_to_dict(params)
    return inner.init(_subset(flat, tuple(p for p in flat if pred(p))))

  return base.MergeTransformation(
      init_fn, base.static_fn.of(_masked_update, inner=inner.update, pred=pred))


def _masked_update(updates, state, params=None, *, key=None, inner, pred):
  flat = paths.flatten_to_dict(updates)
  sel = tuple(p for p in flat if pred(p))
  sub_params = None
  if params is not None:
    sub_params = _subset(paths.flatten_to_dict(params), sel)
  new, state = inner(_subset(flat, sel), state, sub_params, key=key)
  flat.update(new)
  return paths.unflatten_like(updates, flat), state


def partition(
    transforms: Mapping[str, base.MergeTransformation],
    labels: Sequence[paths.Rule] | Callable[[str], str],
) -> base.MergeTransformation:
  """Gives every leaf exactly one transformation, chosen by its label.

  Args:
    transforms: ``{label: transformation}``.
    labels: ``[(regex, label), ...]`` rules (first match wins) or a function
      ``path -> label``. A leaf that no rule labels is an error.

  Returns:
    A `MergeTransformation` whose state is ``{label: state}``.

  Example:
    >>> import mergejax as mj
    >>> m = mj.methods
    >>> tx = mj.partition({'ties': m.ties(density=0.2), 'avg': m.linear()},
    ...                   [(r'embed', 'avg'), (r'.*', 'ties')])
  """
  names = tuple(sorted(transforms))
  if callable(labels):
    label_of = labels
  else:
    rules = tuple((str(p), str(v)) for p, v in labels)
    label_of = base.static_fn.of(_rule_label, rules=rules)

  groups = base.static_fn.of(_groups, label_of=label_of, names=names)

  def init_fn(params):
    flat = paths.flatten_to_dict(params)
    g = groups(flat)
    # A label that selects no leaf (e.g. a rule for layers this model lacks)
    # is left out: its transformation never sees an empty tree.
    return {n: transforms[n].init(_subset(flat, g[n])) if g[n]
            else base.EmptyState() for n in names}

  updates = tuple(transforms[n].update for n in names)
  return base.MergeTransformation(
      init_fn,
      base.static_fn.of(_partition_update, names=names, fns=updates,
                        groups=groups))


def _rule_label(path, *, rules):
  return paths.match_rules(rules, path, what='partition label')


def _groups(flat, *, label_of, names):
  out = {n: [] for n in names}
  for p in flat:
    lab = label_of(p)
    if lab not in out:
      raise ValueError(
          f'partition: parameter {p!r} got label {lab!r}, which has no '
          f'transformation; labels with transformations are {list(names)}.')
    out[lab].append(p)
  return {n: tuple(v) for n, v in out.items()}


def _partition_update(updates, state, params=None, *, key=None, names, fns,
                      groups):
  flat = paths.flatten_to_dict(updates)
  flat_params = None if params is None else paths.flatten_to_dict(params)
  g = groups(flat)
  keys = base.split_key(key, len(names))
  new_state = {}
  for i, (n, fn) in enumerate(zip(names, fns)):
    if not g[n]:
      new_state[n] = state[n]
      continue
    sub_params = None if flat_params is None else _subset(flat_params, g[n])
    new, new_state[n] = fn(_subset(flat, g[n]), state[n], sub_params, key=keys[i])
    flat.update(new)
  return paths.unflatten_like(updates, flat), new_state
