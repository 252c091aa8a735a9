"""Optional dependencies (install extras), imported on first use with a clear error."""
from __future__ import annotations

import importlib
import types

# Top-level module -> the extra of `pip install lopt[...]` that provides it.
EXTRAS = {"ray": "ray", "tensorflow_datasets": "tfds", "array_record": "tfds",
          "matplotlib": "plot"}


def require(module: str, *, purpose: str) -> types.ModuleType:
  """Imports `module` (e.g. "ray.util.multiprocessing"), or raises `ImportError`
  naming the `pip install` that provides it and what needed it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    extra = EXTRAS.get(top, "all")
    raise ImportError(f"{purpose} needs the optional package {top!r}, which is not installed: "
                      f"pip install 'lopt[{extra}]'  ({e})") from e


def pyplot(*, purpose: str) -> types.ModuleType:
  """`matplotlib.pyplot` on the file-only Agg backend (plots never need a display)."""
  matplotlib = require("matplotlib", purpose=purpose)
  matplotlib.use("Agg")
  return require("matplotlib.pyplot", purpose=purpose)
