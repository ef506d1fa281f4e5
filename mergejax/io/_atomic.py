"""Atomic output directories: a killed run leaves nothing that looks complete.

Everything is written into a hidden sibling ``.<name>.mergejax-tmp-<pid>``;
files are fsynced, then the directory is renamed onto ``<name>`` in one
``os.rename`` (atomic on POSIX within a file system). A run killed at any
point leaves only the hidden temporary directory, which the next run removes
once its owner process is gone.

Every directory written here carries a marker file, `MARKER_NAME`; an
existing directory is only ever replaced when it has one, so ``overwrite``
cannot delete data that mergejax did not write. Paths whose replacement would
destroy unrelated data (empty, the working directory or one of its parents,
the home directory, a filesystem root, a parent of an input) are refused
before anything is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Iterable, Iterator

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


MARKER_NAME = '.mergejax-output'
# In a temporary directory: which run it belongs to and the shards finished.
PROGRESS_NAME = '.mergejax-progress.json'


def read_progress(tmp: str) -> dict | None:
  """The progress journal of a temporary output directory, or None."""
  try:
    with open(os.path.join(tmp, PROGRESS_NAME)) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else None
  except (OSError, ValueError):
    return None


def write_progress(tmp: str, data: dict) -> None:
  """Replaces the journal atomically (a kill leaves the old or the new one)."""
  path = os.path.join(tmp, PROGRESS_NAME)
  with open(path + '.part', 'w') as f:
    json.dump(data, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.part', path)


def _resumable(out_dir: str, resume_key: str) -> str | None:
  """A dead run's temporary directory for ``out_dir`` with the same key."""
  parent, name = os.path.split(out_dir)
  best, most = None, -1
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    m = _TMP_RE.match(entry)
    if not m or m.group('name') != name or _pid_alive(int(m.group('pid'))):
      continue
    progress = read_progress(os.path.join(parent, entry))
    if progress and progress.get('key') == resume_key:
      done = len(progress.get('shards', {}))
      if done > most:
        best, most = os.path.join(parent, entry), done
  return best


def _is_nonempty_dir(path: str) -> bool:
  return os.path.isdir(path) and bool(os.listdir(path))


def _within(path: str, root: str) -> bool:
  """Whether ``path`` is ``root`` or lies below it (both real paths)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_path(out_dir: str, *, inputs: Iterable[str] = ()) -> str:
  """Refuses output paths whose replacement would destroy unrelated data.

  Args:
    out_dir: the requested output directory.
    inputs: paths the run reads (model directories or files); the output may
      not be one of them or a directory holding one.

  Returns:
    The absolute output path.

  Raises:
    ValueError: ``out_dir`` is empty, a filesystem root, the home directory,
      the working directory or one of its parents, or holds an input.
  """
  if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
    raise ValueError(
        f'Output path {out_dir!r} is empty (an unset variable?); name a new '
        'directory for the merged checkpoint.')
  path = os.path.realpath(os.path.abspath(os.fspath(out_dir)))
  fix = 'name a new directory (e.g. ./merged) for the merged checkpoint.'
  if os.path.dirname(path) == path:
    raise ValueError(f'Output path {out_dir!r} is a filesystem root; {fix}')
  if path == os.path.realpath(os.path.expanduser('~')):
    raise ValueError(f'Output path {out_dir!r} is the home directory; {fix}')
  if _within(os.path.realpath(os.getcwd()), path):
    raise ValueError(
        f'Output path {out_dir!r} ({path}) is the working directory or one of '
        f'its parents; {fix}')
  for inp in inputs:
    if inp and _within(os.path.realpath(os.path.abspath(inp)), path):
      raise ValueError(
          f'Output path {out_dir!r} ({path}) is, or contains, the input '
          f'{inp!r}; {fix}')
  return path


def is_mergejax_output(path: str) -> bool:
  """Whether directory ``path`` was written by `atomic_output_dir`."""
  try:
    with open(os.path.join(path, MARKER_NAME)) as f:
      return json.load(f).get('written_by') == 'mergejax'
  except (OSError, ValueError, AttributeError):
    return False


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, *, overwrite: bool = False,
                      inputs: Iterable[str] = (),
                      resume_key: str | None = None) -> Iterator[str]:
  """Yields a temporary directory that becomes ``out_dir`` on success.

  Args:
    out_dir: the final directory.
    overwrite: replace an existing non-empty ``out_dir`` that an earlier
      mergejax run wrote (it holds `MARKER_NAME`); without it an existing
      non-empty ``out_dir`` is an error (checked before any work).
    inputs: paths the run reads; ``out_dir`` may not hold any of them.
    resume_key: identifies the run (its inputs and options). A killed run's
      temporary directory whose journal (`PROGRESS_NAME`) has the same key is
      taken over instead of deleted, so the caller can keep the shards it
      finished; an interrupted run (Ctrl-C) keeps its directory for that.

  Yields:
    The temporary directory to write into. On a clean exit `MARKER_NAME` is
    added, every file in it is fsynced and it is renamed to ``out_dir``; on an
    exception it is deleted.

  Raises:
    ValueError: a dangerous ``out_dir`` (see `check_output_path`).
    FileExistsError: ``out_dir`` exists and is not empty, and either not
      ``overwrite`` or it was not written by mergejax.
  """
  out_dir = check_output_path(out_dir, inputs=inputs)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'Output path {out_dir} exists and is a file.')
  if _is_nonempty_dir(out_dir):
    if not overwrite:
      raise FileExistsError(
          f'Output directory {out_dir} exists and is not empty; pass '
          '--overwrite (overwrite=True) to replace it, or choose a new path.')
    if not is_mergejax_output(out_dir):
      raise FileExistsError(
          f'Output directory {out_dir} exists and was not written by mergejax '
          f'(it has no {MARKER_NAME}), so --overwrite will not delete it; '
          'remove it yourself or choose a new path.')
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{name}.mergejax-tmp-{os.getpid()}')
  previous = _resumable(out_dir, resume_key) if resume_key else None
  if previous is not None and previous != tmp:
    shutil.rmtree(tmp, ignore_errors=True)
    os.rename(previous, tmp)
  remove_stale_tmp_dirs(out_dir)
  if previous is None:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  try:
    yield tmp
  except KeyboardInterrupt:
    if resume_key is None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  marker = os.path.join(tmp, MARKER_NAME)
  try:  # the writer may have recorded checksums in it
    with open(marker) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    meta = {}
  meta = {**(meta if isinstance(meta, dict) else {}), 'written_by': 'mergejax',
          'format': 1}
  with open(marker, 'w') as f:
    json.dump(meta, f, indent=1)
  if os.path.exists(os.path.join(tmp, PROGRESS_NAME)):
    os.remove(os.path.join(tmp, PROGRESS_NAME))
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
