"""A cache of baselines' evaluation results, keyed by what determines them.

A tuned baseline on the full held-out suites costs hours on a CPU, while the code around
it changes every day; so a result is keyed by the definitions it depends on, not by the
commit: the task (its family's static config and a hash of its data, the step budget,
the batch mode), the baseline (its table fingerprint and the source of its factory),
the learning-rate grid, the seeds and the tuning protocol. Any of those changing misses
the cache; an unrelated change hits it. Entries are JSON files, one per (task, baseline):
`<root>/<task>/<baseline>.json` holding {"key", "keyed_on", "result"}, small enough to
commit (`reports/cache/`), so a later evaluation of one more optimizer reuses them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from learned_opt._atomic import write_atomic

CACHE_FORMAT = 1


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tree_fingerprint(tree: Any) -> str:
  """SHA-256 of a pytree: its structure and static fields (the treedef, e.g. a frozen
  family's config) and every leaf's dtype, shape and bytes (e.g. its dataset)."""
  leaves, treedef = jax.tree.flatten(tree)
  h = hashlib.sha256(str(treedef).encode("utf-8"))
  for leaf in leaves:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    arr = np.asarray(leaf)
    h.update(f"{arr.dtype}{arr.shape}".encode("utf-8"))
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def task_fingerprint(suite_task, family) -> str:
  """What a suite task's results depend on: its built family, budget and batch mode."""
  return _sha(json.dumps({"family": tree_fingerprint(family), "num_steps": suite_task.num_steps,
                          "full_batch": suite_task.full_batch}, sort_keys=True))


# Source text per function or module, read once per process. `inspect.getsource` reads
# the file on disk with the line numbers of the code that was loaded: after an edit
# while a long evaluation runs it returns shifted lines, and the keys written from then
# on would name code that never ran. Read once, early (`snapshot_sources` at import of
# the baselines' table), the text is that of the code the process runs.
# A module is keyed with its spec too: `importlib.reload` keeps the module object but
# gives it a new spec (the spec is stored beside the text so its id stays unique).
_SOURCES: dict[Any, tuple[Any, str]] = {}


def _source(fn) -> str:
  spec = getattr(fn, "__spec__", None) if inspect.ismodule(fn) else None
  key = (fn, id(spec))
  if key not in _SOURCES:
    try:
      text = inspect.getsource(fn)
    except (OSError, TypeError):  # builtins, C functions: their name stands for them
      text = getattr(fn, "__qualname__", repr(fn))
    _SOURCES[key] = (spec, text)
  return _SOURCES[key][1]


def snapshot_sources(objects) -> None:
  """Reads the source of each function or module now (see `_source`); call it right
  after importing them."""
  for obj in objects:
    _source(obj)


def candidate_fingerprint(candidate) -> str:
  """A baseline's definition: its table fingerprint, the source of its factory (and of
  its eval-point function) and of the lopt modules it names (`Candidate.sources`), so
  editing any of those misses the cache and editing anything else does not."""
  return _sha(json.dumps({
      "fingerprint": candidate.fingerprint, "make": _source(candidate.make),
      "eval_params": None if candidate.eval_params is None else _source(candidate.eval_params),
      "sources": {m.__name__: _sha(_source(m)) for m in candidate.sources}}, sort_keys=True))


class ResultCache:
  """Baseline results on disk (see the module docstring).

  Args:
    root: the cache folder (created on the first `put`).
  """

  def __init__(self, root: str):
    self.root = os.fspath(root)

  def _path(self, task: str, candidate: str) -> str:
    return os.path.join(self.root, task, f"{candidate}.json")

  @staticmethod
  def key(keyed_on: dict) -> str:
    return _sha(json.dumps({"format": CACHE_FORMAT, **keyed_on}, sort_keys=True))

  def get(self, task: str, candidate: str, keyed_on: dict) -> Optional[dict]:
    """The cached result if its key matches `keyed_on`, else None (a corrupt file is a
    miss: it will be overwritten)."""
    path = self._path(task, candidate)
    try:
      with open(path) as f:
        entry = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(entry, dict) or entry.get("key") != self.key(keyed_on):
      return None
    return entry.get("result")

  def put(self, task: str, candidate: str, keyed_on: dict, result: dict) -> None:
    """Writes one entry atomically (a crash never leaves a torn file)."""
    path = self._path(task, candidate)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    entry = {"key": self.key(keyed_on), "keyed_on": keyed_on, "result": result}
    write_atomic(path, json.dumps(entry, indent=1, sort_keys=True, allow_nan=False))
