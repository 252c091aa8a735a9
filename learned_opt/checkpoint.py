"""The `.lopt` checkpoint format: `save`, `load`, `load_pretrained`, `list_pretrained`.

One file holds one learned optimizer:

    MAGIC (8 bytes, b"LOPTCKPT")
    header length (4 bytes, little-endian uint32)
    header: UTF-8 JSON {format_version, architecture, config, features, info,
                        lopt_version, weights_sha256, content_sha256}
    weights: msgpack of the meta-parameters (`flax.serialization.msgpack_serialize` of a
             nested dict of numpy arrays)

No pickle and no imports by name: the architecture is rebuilt from the registry
(`learned_opt.registry.ARCHITECTURES`, header name -> class) and its JSON config, and the weights are plain
arrays checked leaf by leaf against the shapes the architecture expects. Loading
therefore runs no code from the file.

Integrity. `weights_sha256` is the SHA-256 of the weights bytes; `content_sha256`
(format version 2) covers the whole file: the SHA-256 of the header with that one field
removed, as canonical JSON (sorted keys, no spaces, ASCII), followed by the weights
(`_content_digest`). A flipped byte anywhere, e.g. a `step_mult` of 0.001 edited to
0.011, therefore fails to load instead of loading a different optimizer. Canonical
JSON rather than the raw header bytes because the digest is stored inside the header;
Python's JSON writes floats in their shortest round-trip form, so parsing and
re-serializing gives back exactly the bytes that were hashed at save time.

Format version 1 files (written before version 2; the shipped checkpoints among them)
have only `weights_sha256`: they still load, but their header is not covered by any
hash. `weights_sha256` stays in version 2 headers because it also fingerprints a
learned optimizer elsewhere (`meta_train/eval` caches results under it), and it lets a
mismatch say whether the weights or the header changed.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import struct as pystruct
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from learned_opt._atomic import write_atomic
from learned_opt import registry
from learned_opt.base import LearnedOptimizer
from learned_opt.optax_adapter import to_optax
from learned_opt.version import __version__

MAGIC = b"LOPTCKPT"
FORMAT_VERSION = 2
# Version 1: only the weights are hashed (`weights_sha256`); read but no longer written.
_CONTENT_DIGEST_FROM_VERSION = 2
EXTENSION = ".lopt"
ARCHITECTURES = registry.ARCHITECTURES  # the one registry (same dict)


class CheckpointError(ValueError):
  """A `.lopt` file that cannot be loaded (corrupt, too new, or inconsistent)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No file at the path given. Also a `FileNotFoundError`, which `load` raised before,
  so code catching that keeps working; also a `ValueError` (as `CheckpointError`), which
  the `lopt` command prints as one line."""


def _content_digest(header: dict[str, Any], weights: bytes) -> str:
  """SHA-256 over the canonical JSON of `header` without `content_sha256`, then `weights`."""
  rest = {k: v for k, v in header.items() if k != "content_sha256"}
  canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
  # The length prefix makes the split between header and weights part of what is hashed.
  return hashlib.sha256(pystruct.pack("<Q", len(canonical)) + canonical + weights).hexdigest()


def _read_bytes(path: str | os.PathLike) -> bytes:
  """The bytes of the file at `path`, or a CheckpointError naming the path and what was
  expected (a directory or a missing path otherwise raise a bare OSError)."""
  where = os.fspath(path)
  if os.path.isdir(where):
    raise CheckpointError(f"{where} is a directory; expected a {EXTENSION} file written by "
                          "learned_opt.save")
  try:
    with open(where, "rb") as fh:
      return fh.read()
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(f"no such file: {where}; expected a {EXTENSION} file written "
                                  "by learned_opt.save (shipped ones: learned_opt.list_pretrained())"
                                  ) from e


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
    header["content_sha256"] = _content_digest(header, weights)
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
  except (TypeError, ValueError) as e:
    raise ValueError(f"info must be JSON-serializable (numbers, strings, lists, dicts): {e}") from e
  blob = MAGIC + pystruct.pack("<I", len(header_bytes)) + header_bytes + weights
  write_atomic(path, blob)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON header of a `.lopt` file (cheap: the weights are hashed, not decoded).

  Raises:
    CheckpointError: as `load` for a missing, truncated or corrupt file.
  """
  where = os.fspath(path)
  header, weights = _split(_read_bytes(where), where)
  _verify(header, weights, where)
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
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise CheckpointError(f"{where} has format version {version!r}; expected an int from 1 "
                          f"to {FORMAT_VERSION}")
  if version > FORMAT_VERSION:
    raise CheckpointError(f"{where} has format version {version!r}; this lopt "
                          f"({_version()}) reads versions <= {FORMAT_VERSION}: upgrade lopt")
  return header, blob[start + n:]


def _verify(header: dict, weights: bytes, where: str) -> None:
  """Checks the digests: the weights' (every version) and the whole content's (v2+)."""
  version = header["format_version"]
  required = ["weights_sha256"]
  if version >= _CONTENT_DIGEST_FROM_VERSION:
    required.append("content_sha256")
  for key in required:
    if not isinstance(header.get(key), str):
      raise CheckpointError(f"{where} header lacks {key!r} (format version {version} has it)")
  actual = hashlib.sha256(weights).hexdigest()
  if actual != header["weights_sha256"]:
    raise CheckpointError(f"{where} is corrupt: the weights' SHA-256 ({actual[:16]}...) does not "
                          f"match the header's weights_sha256 ({header['weights_sha256'][:16]}...)")
  if version >= _CONTENT_DIGEST_FROM_VERSION:
    actual = _content_digest(header, weights)
    if actual != header["content_sha256"]:
      # The weights matched above, so what changed is the header (a config value, the
      # feature list, info, ...).
      raise CheckpointError(
          f"{where} is corrupt: its header does not match content_sha256 ({actual[:16]}... "
          f"computed, {header['content_sha256'][:16]}... stored); the weights are intact, so "
          "a header value (config, features, info) was changed after saving. To keep an "
          "intended edit, load the original and save again with learned_opt.save")


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
    CheckpointNotFoundError: nothing at `path` (also a `FileNotFoundError`).
    CheckpointError: `path` is a directory; the file is not a lopt checkpoint, is
      truncated or corrupt (a digest mismatch: weights, or for format version 2 the
      header too), has a newer format version, names an unknown architecture, or its
      config, feature list or weight shapes disagree with the architecture.
  """
  where = os.fspath(path)
  header, weights = _split(_read_bytes(where), where)
  _verify(header, weights, where)
  for key in ("architecture", "config", "features"):
    if key not in header:
      raise CheckpointError(f"{where} header lacks {key!r}")
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


def load_pretrained(name: str, *, num_steps: Optional[int] = None, learning_rate=None):
  """A shipped learned optimizer as an optax transform, ready for `optax.chain`.

  Args:
    name: one of `list_pretrained()`.
    num_steps: training horizon, needed only by optimizers with a training-fraction
      feature (see `to_optax`).
    learning_rate: a float or an optax schedule, for the optimizers that take one
      (`learned_opt.takes_learning_rate`); None for those that set their own step.

  Returns:
    `optax.GradientTransformationExtraArgs`. For the raw `(lopt, meta_params, info)` use
    `load(pretrained_path(name))`.
  """
  with importlib.resources.as_file(pretrained_path(name)) as path:
    lopt, meta_params, _ = load(path)
  return to_optax(lopt, meta_params, num_steps=num_steps, learning_rate=learning_rate)
