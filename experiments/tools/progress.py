"""Progress bars that stay quiet where nobody is watching.

`progress` wraps tqdm. By default (``enable=None``) a bar is shown only when
stderr is a terminal or inside a Jupyter/Colab kernel, so CI logs, pytest and
batch jobs are not flooded with carriage-return lines; ``MERGEJAX_PROGRESS=0``
or ``=1`` forces it off or on. Without tqdm installed the iterable is returned
unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TypeVar

__all__ = (
    'enabled',
    'progress',
    'bar',
)

T = TypeVar('T')


def enabled(enable: bool | None = None) -> bool:
  """Whether a progress bar should be shown.

  Args:
    enable: True/False force it; None decides from ``MERGEJAX_PROGRESS`` and
      whether stderr is interactive (a terminal or a notebook kernel).

  Example:
    >>> from experiments.tools.progress import enabled
    >>> enabled(False)
    False
  """
  if enable is not None:
    return bool(enable)
  env = os.environ.get('MERGEJAX_PROGRESS')
  if env is not None:
    return env.strip().lower() not in ('0', 'false', 'no', '')
  if 'PYTEST_CURRENT_TEST' in os.environ:
    return False
  if 'ipykernel' in sys.modules:
    return True
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def progress(iterable: Iterable[T], *, desc: str | None = None,
             total: int | None = None, enable: bool | None = None,
             **kwargs: Any) -> Iterable[T]:
  """``tqdm(iterable)`` if `enabled`, else ``iterable`` itself.

  Args:
    iterable: what to iterate over.
    desc: the bar's label (e.g. ``'train'``, ``'match'``, ``'sweep'``).
    total: the length, where ``iterable`` has none.
    enable: see `enabled`.
    **kwargs: passed on to tqdm (``unit``, ``leave``, ...).

  Example:
    >>> from experiments.tools.progress import progress
    >>> sum(progress(range(4), desc='demo', enable=False))
    6
  """
  if not enabled(enable):
    return iterable
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - tqdm is a core dependency
    return iterable
  return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)


def bar(total: int, *, desc: str | None = None, enable: bool | None = None,
        **kwargs: Any):
  """A manual bar (``.update(n)``, ``.set_postfix(...)``, ``.close()``).

  Returns a no-op object with the same methods when disabled, so callers never
  branch (e.g. streaming writers updating by bytes written).

  Example:
    >>> from experiments.tools.progress import bar
    >>> with bar(10, desc='write', enable=False) as b:
    ...   b.update(10)
  """
  if enabled(enable):
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      return tqdm(total=total, desc=desc, dynamic_ncols=True, **kwargs)
    except ImportError:  # pragma: no cover
      pass
  return _NullBar()


class _NullBar:
  """Stands in for a tqdm bar when progress is disabled."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, *args: Any, **kwargs: Any) -> None:
    del args, kwargs

  def set_description(self, *args: Any, **kwargs: Any) -> None:
    del args, kwargs

  def close(self) -> None:
    pass

  def __enter__(self) -> '_NullBar':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
