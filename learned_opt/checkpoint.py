"""The `.lopt` checkpoint format: `save`, `load`, `load_pretrained`, `list_pretrained`.

One file holds one learned optimizer:

    MAGIC (8 bytes, b"LOPTCKPT")
    header length (4 bytes, little-endian uint32)
    header: UTF-8 JSON {format_version, architecture, config, features, info,
                        lopt_version, weights_sha256}
    weights: msgpack of the meta-parameters (`flax.serialization.msgpack_serialize` of a
             nested dict of numpy arrays)

No pickle and no imports by name: the architecture is rebuilt from the registry
(`learned_opt.registry.ARCHITECTURES`, header name -> class) and its JSON config, and the weights are plain
arrays checked leaf by leaf against the shapes the architecture expects. Loading
therefore runs no code from the file. The SHA-256 of the weights detects corruption.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import struct as pystruct
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from learned_opt import registry
from learned_opt.base import LearnedOptimizer
from learned_opt.optax_adapter import to_optax
from learned_opt.version import __version__

MAGIC = b"LOPTCKPT"
FORMAT_VERSION = 1
EXTENSION = ".lopt"
ARCHITECTURES = registry.ARCHITECTURES  # the one registry (same dict)


class CheckpointError(ValueError):
  """A `.lopt` file that cannot be loaded (corrupt, too new, or inconsistent)."""


def _version() -> str:
  return __version__


def _to_numpy_tree(meta_params):
  state = serialization.to_state_dict(meta_params)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), state)


def save(path: str | os.PathLike, lopt: LearnedOptimizer, meta_params,
         info: Optional[dict[str, Any]] = None) -> None:
  """Writes `lopt`'s config and `meta_params` to `path` (atomically).

  Args:
    path: destination file; by convention it ends in `.lopt`.
    lopt: the architecture; its class must be registered (`learned_opt.registry`).
    meta_params: its meta-parameters (must match `lopt.init_meta_params` in structure
      and shapes).
    info: JSON-able provenance, e.g. {"config": ..., "code_version": ..., "meta_steps": ...}.
  """
  registry.check_registered(lopt)
  _check_weights(lopt, serialization.to_state_dict(meta_params), where="save")
  weights = serialization.msgpack_serialize(_to_numpy_tree(meta_params))
  header = {
      "format_version": FORMAT_VERSION,
      "architecture": lopt.name,
      "config": lopt.config(),
      "features": list(lopt.feature_names()),
      "info": info or {},
      "lopt_version": _version(),
      "weights_sha256": hashlib.sha256(weights).hexdigest(),
  }
  try:
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
  except TypeError as e:
    raise ValueError(f"info must be JSON-serializable (numbers, strings, lists, dicts): {e}") from e
  blob = MAGIC + pystruct.pack("<I", len(header_bytes)) + header_bytes + weights
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as fh:
      fh.write(blob)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_header(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON header of a `.lopt` file (cheap: the weights are not decoded)."""
  with open(path, "rb") as fh:
    header, _ = _split(fh.read(), str(path))
  return header


def _split(blob: bytes, where: str) -> tuple[dict, bytes]:
  if blob[:len(MAGIC)] != MAGIC:
    raise CheckpointError(f"{where} is not a lopt checkpoint: expected magic bytes {MAGIC!r}, "
                          f"got {blob[:len(MAGIC)]!r}")
  start = len(MAGIC) + 4
  if len(blob) < start:
    raise CheckpointError(f"{where} is truncated: the header length is missing")
  (n,) = pystruct.unpack("<I", blob[len(MAGIC):start])
  if len(blob) < start + n:
    raise CheckpointError(f"{where} is truncated: header of {n} bytes announced, "
                          f"{len(blob) - start} present")
  try:
    header = json.loads(blob[start:start + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{where} has a corrupt JSON header: {e}") from e
  if not isinstance(header, dict) or "format_version" not in header:
    raise CheckpointError(f"{where} header lacks 'format_version'")
  version = header["format_version"]
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(f"{where} has format version {version!r}; this lopt "
                          f"({_version()}) reads versions <= {FORMAT_VERSION}: upgrade lopt")
  return header, blob[start + n:]


def _check_weights(lopt: LearnedOptimizer, state: dict, *, where: str) -> None:
  expected = serialization.to_state_dict(jax.eval_shape(lopt.init_meta_params, jax.random.key(0)))
  exp_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  got_flat = dict(jax.tree_util.tree_flatten_with_path(state)[0])
  name = lambda path: jax.tree_util.keystr(path)
  missing = sorted(name(p) for p in set(exp_flat) - set(got_flat))
  extra = sorted(name(p) for p in set(got_flat) - set(exp_flat))
  if missing or extra:
    raise CheckpointError(f"{where}: meta-parameters do not match architecture {lopt.name!r}: "
                          f"missing {missing}, unexpected {extra}")
  for path, leaf in exp_flat.items():
    shape = tuple(np.shape(got_flat[path]))
    if shape != tuple(leaf.shape):
      raise CheckpointError(f"{where}: meta-parameter {name(path)} has shape {shape}, "
                            f"architecture {lopt.name!r} expects {tuple(leaf.shape)}")


def load(path: str | os.PathLike) -> tuple[LearnedOptimizer, Any, dict[str, Any]]:
  """Reads a `.lopt` file: returns `(lopt, meta_params, info)`.

  Raises:
    CheckpointError: the file is not a lopt checkpoint, is truncated or corrupt, has a
      newer format version, names an unknown architecture, or its config, feature list
      or weight shapes disagree with the architecture.
  """
  where = str(path)
  with open(path, "rb") as fh:
    header, weights = _split(fh.read(), where)
  for key in ("architecture", "config", "features", "weights_sha256"):
    if key not in header:
      raise CheckpointError(f"{where} header lacks {key!r}")
  if hashlib.sha256(weights).hexdigest() != header["weights_sha256"]:
    raise CheckpointError(f"{where} is corrupt: the weights' SHA-256 does not match the header")
  arch = header["architecture"]
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"{where} names architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
  try:
    lopt = ARCHITECTURES[arch].from_config(header["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: header config does not fit architecture {arch!r}: {e}") from e
  if list(lopt.feature_names()) != list(header["features"]):
    raise CheckpointError(f"{where}: header feature list {header['features']} does not match "
                          f"what architecture {arch!r} computes: {list(lopt.feature_names())}")
  try:
    state = serialization.msgpack_restore(weights)
  except Exception as e:  # msgpack raises several types on garbage
    raise CheckpointError(f"{where} has corrupt weights: {e}") from e
  _check_weights(lopt, state, where=where)
  template = jax.eval_shape(lopt.init_meta_params, jax.random.key(0))
  meta_params = serialization.from_state_dict(template, state)
  meta_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), meta_params)
  return lopt, meta_params, header.get("info", {})


def _pretrained_dir():
  return importlib.resources.files("learned_opt.checkpoints")


def list_pretrained() -> list[str]:
  """Names of the pretrained optimizers shipped in `learned_opt.checkpoints`."""
  return sorted(e.name[:-len(EXTENSION)] for e in _pretrained_dir().iterdir()
                if e.name.endswith(EXTENSION))


def pretrained_path(name: str):
  """Path (an `importlib.resources` traversable) of the pretrained optimizer `name`."""
  entry = _pretrained_dir() / f"{name}{EXTENSION}"
  if not entry.is_file():
    raise ValueError(f"no pretrained learned optimizer {name!r}; available: {list_pretrained()}")
  return entry


def load_pretrained(name: str, *, num_steps: Optional[int] = None):
  """A shipped learned optimizer as an optax transform, ready for `optax.chain`.

  Args:
    name: one of `list_pretrained()`.
    num_steps: training horizon, needed only by optimizers with a training-fraction
      feature (see `to_optax`).

  Returns:
    `optax.GradientTransformationExtraArgs`. For the raw `(lopt, meta_params, info)` use
    `load(pretrained_path(name))`.
  """
  with importlib.resources.as_file(pretrained_path(name)) as path:
    lopt, meta_params, _ = load(path)
  return to_optax(lopt, meta_params, num_steps=num_steps)
