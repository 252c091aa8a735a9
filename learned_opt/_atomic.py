"""Atomic file writes: a fsynced temporary file in the target's folder, renamed over it.

Checkpoints, run folders, metrics and evaluation results all need the same guarantee: a
kill at any moment leaves the old file or the new one, never a torn one. The standard
library has the pieces (`tempfile.mkstemp`, `os.replace`) but no one call for it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Union

# mkstemp creates files readable by their owner only; results and checkpoints are files a
# user shares (a committed report, a run folder another account resumes).
FILE_MODE = 0o644


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str], *,
                 prefix: Optional[str] = None) -> str:
  """Writes `data` (bytes, or text as UTF-8) to `path` so that it appears whole or not.

  Args:
    path: the target file; its folder must exist.
    data: the whole content.
    prefix: the temporary file's name prefix (default: "." + the target's name + ".",
      so a temp file a kill leaves behind is recognizable).

  Returns:
    `path` as a string.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if prefix is None:
    prefix = f".{os.path.basename(path)}."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())  # the rename must not land before the bytes do
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
