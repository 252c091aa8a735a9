"""Run checkpoints: the learner and estimator states of an outer step, in msgpack.

Files are `ckpt_<step>.msgpack` in a run's `checkpoints/` folder, written with
flax.serialization (arrays only, no pickle) to a temporary file that is fsynced and
then renamed over the final name, so a crash does not leave a torn checkpoint under a
checkpoint's name (a file system that reorders the rename before the data, or a disk
that fills, still can: `restore` then raises `CorruptCheckpointError` and the run
resumes from the checkpoint before, see `runner.py`); a kill during the write leaves a
`.tmp_ckpt_*` file, which `remove_temp_files` cleans. Only the newest `keep` files are
kept. Restoring needs a template pytree of the same structure (built from the run's
config), which is also what makes a resumed run bit-for-bit equal to an uninterrupted
one: every array comes back with its exact bits and dtype.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from learned_opt._atomic import write_atomic

_NAME = re.compile(r"^ckpt_(\d+)\.msgpack$")
TEMP_PREFIX = ".tmp_ckpt_"
CORRUPT_SUFFIX = ".corrupt"


class CorruptCheckpointError(ValueError):
  """A checkpoint file that cannot be read at all (truncated, empty, not msgpack), as
  opposed to one that reads but does not fit the run (another config)."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  # msgpack stores plain arrays; typed PRNG keys travel as their raw uint32 data.
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def checkpoint_path(directory: str, step: int) -> str:
  return os.path.join(directory, f"ckpt_{step:09d}.msgpack")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
  """(step, path) of the checkpoints in `directory`, oldest first."""
  if not os.path.isdir(directory):
    return []
  found = [(int(m.group(1)), os.path.join(directory, n)) for n in os.listdir(directory)
           if (m := _NAME.match(n))]
  return sorted(found)


def latest_checkpoint(directory: str) -> tuple[int, str] | None:
  found = list_checkpoints(directory)
  return found[-1] if found else None


def save(directory: str, step: int, tree: Any, *, keep: int = 3) -> str:
  """Writes `tree` atomically as the checkpoint of `step`; prunes to the newest `keep`.

  Args:
    directory: the checkpoints folder (created if missing).
    step: the outer step the state belongs to (states *after* `step` updates).
    tree: a pytree of arrays (typed PRNG keys allowed).
    keep: how many checkpoints to keep (>= 1).
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  os.makedirs(directory, exist_ok=True)
  data = serialization.to_bytes(_keys_to_data(jax.device_get(tree)))
  path = checkpoint_path(directory, step)
  write_atomic(path, data, prefix=TEMP_PREFIX)
  for _, old in list_checkpoints(directory)[:-keep]:
    os.remove(old)
  return path


def remove_temp_files(directory: str) -> list[str]:
  """Deletes the temporary files that writes killed midway left in `directory`.

  Only one process writes a run's checkpoints (the run), so any temp file found before
  it starts writing is stale. Returns the names removed.
  """
  if not os.path.isdir(directory):
    return []
  stale = sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))
  for name in stale:
    os.remove(os.path.join(directory, name))
  return stale


def set_aside(path: str) -> str:
  """Renames an unreadable checkpoint to `<name>.corrupt`: out of the listing (so it is
  neither restored nor counted when pruning) but kept for inspection."""
  os.replace(path, path + CORRUPT_SUFFIX)
  return path + CORRUPT_SUFFIX


def restore(path: str, template: Any) -> Any:
  """Reads a checkpoint into the structure (and key types) of `template`.

  Raises:
    CorruptCheckpointError: the file cannot be read or decoded (truncated, empty).
    ValueError: the file decodes but does not match the template (other config or code
      version).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise CorruptCheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e
  try:
    state = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on garbage
    raise CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt ({len(data)} bytes): "
                                 f"{e}") from e
  if not isinstance(state, dict):  # every checkpoint is a dict at the top
    raise CorruptCheckpointError(f"checkpoint {path} is corrupt ({len(data)} bytes): it decodes "
                                 f"to a {type(state).__name__}, not a dict of arrays")
  try:
    raw = serialization.from_state_dict(_keys_to_data(template), state)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint {path} does not match this run's state structure "
                     f"(was it written with another config?): {e}") from e

  def back(t, x):
    if _is_key(t):
      return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(t))
    x_dtype, t_dtype = np.asarray(x).dtype, jnp.asarray(t).dtype
    if np.shape(x) != np.shape(t) or x_dtype != t_dtype:
      raise ValueError(f"checkpoint {path}: array of shape {np.shape(x)} and dtype {x_dtype} "
                       f"where this run expects {np.shape(t)} {t_dtype}")
    return jnp.asarray(x)

  return jax.tree.map(back, template, raw)
