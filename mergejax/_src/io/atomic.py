"""Atomic output directories: a killed run leaves nothing that looks complete.

Everything is written into a hidden sibling ``.<name>.mergejax-tmp-<pid>``;
files are fsynced, then the directory is renamed onto ``<name>`` in one
``os.rename`` (atomic on POSIX within a file system). A run killed at any
point leaves only the hidden temporary directory, which the next run removes
once its owner process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Iterator

_TMP_RE = re.compile(r'^\.(?P<name>.+)\.mergejax-tmp-(?P<pid>\d+)$')


def fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
  except OSError:  # Some platforms cannot open directories.
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_tmp_dirs(out_dir: str) -> list[str]:
  """Deletes temporary directories left by killed runs writing ``out_dir``."""
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir)
  removed = []
  if not os.path.isdir(parent):
    return removed
  for entry in os.listdir(parent):
    m = _TMP_RE.match(entry)
    if m and m.group('name') == name and not _pid_alive(int(m.group('pid'))):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
      removed.append(entry)
  return removed


def _is_nonempty_dir(path: str) -> bool:
  return os.path.isdir(path) and bool(os.listdir(path))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, *, overwrite: bool = False
                      ) -> Iterator[str]:
  """Yields a temporary directory that becomes ``out_dir`` on success.

  Args:
    out_dir: the final directory.
    overwrite: replace an existing non-empty ``out_dir``; without it an
      existing non-empty ``out_dir`` is an error (checked before any work).

  Yields:
    The temporary directory to write into. On a clean exit every file in it is
    fsynced and it is renamed to ``out_dir``; on an exception it is deleted.

  Raises:
    FileExistsError: ``out_dir`` exists, is not empty, and not ``overwrite``.
  """
  out_dir = os.path.abspath(out_dir)
  if _is_nonempty_dir(out_dir) and not overwrite:
    raise FileExistsError(
        f'Output directory {out_dir} exists and is not empty; pass '
        '--overwrite (overwrite=True) to replace it, or choose a new path.')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'Output path {out_dir} exists and is a file.')
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  remove_stale_tmp_dirs(out_dir)
  tmp = os.path.join(parent, f'.{name}.mergejax-tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  for entry in os.listdir(tmp):
    p = os.path.join(tmp, entry)
    if os.path.isfile(p):
      fsync_file(p)
  fsync_dir(tmp)
  old = None
  if os.path.isdir(out_dir):
    if os.listdir(out_dir):
      old = os.path.join(parent, f'.{name}.mergejax-old-{os.getpid()}')
      os.rename(out_dir, old)
    else:
      os.rmdir(out_dir)
  os.rename(tmp, out_dir)
  fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
