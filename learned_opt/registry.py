"""The one registry of learned-optimizer architectures: header/config name -> class.

Configs (`lopt.name`), checkpoints (`save`/`load`) and evaluation (which loads `.lopt`
files) all resolve architectures here, so a class that can be meta-trained can also be
saved and loaded. A new architecture is a `LearnedOptimizer` subclass with a unique
`name`, added with `register_architecture` (the built-in ones are registered below).
"""
from __future__ import annotations

from learned_opt.base import LearnedLR, LearnedOptimizer
from learned_opt.hierarchical import HierarchicalLOpt
from learned_opt.lstm_lopt import PerParamLSTM
from learned_opt.mlp_lopt import PerParamMLP
from learned_opt.normalized import NormalizedMLP

ARCHITECTURES: dict[str, type[LearnedOptimizer]] = {}


def register_architecture(cls: type[LearnedOptimizer]) -> type[LearnedOptimizer]:
  """Registers `cls` under `cls.name` (usable as a class decorator); returns `cls`.

  Raises:
    TypeError: `cls` is not a `LearnedOptimizer` subclass.
    ValueError: `cls.name` is empty, or already names another class.
  """
  if not (isinstance(cls, type) and issubclass(cls, LearnedOptimizer)):
    raise TypeError(f"register_architecture expects a LearnedOptimizer subclass, got {cls!r}")
  name = getattr(cls, "name", "")
  if not isinstance(name, str) or not name:
    raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` (the "
                     "architecture name written to checkpoints)")
  if ARCHITECTURES.get(name, cls) is not cls:
    raise ValueError(f"architecture name {name!r} is already registered for "
                     f"{ARCHITECTURES[name].__module__}.{ARCHITECTURES[name].__qualname__}")
  ARCHITECTURES[name] = cls
  return cls


def get_architecture(name: str) -> type[LearnedOptimizer]:
  """The class registered as `name`; `ValueError` lists the registered names."""
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown learned optimizer {name!r}; registered architectures: "
                     f"{', '.join(sorted(ARCHITECTURES))} (register others with "
                     "learned_opt.register_architecture)")
  return ARCHITECTURES[name]


def check_registered(lopt_or_cls) -> None:
  """Raises `ValueError` unless the class of `lopt_or_cls` is the registered one for its
  name (what `save` needs to write a loadable checkpoint)."""
  cls = lopt_or_cls if isinstance(lopt_or_cls, type) else type(lopt_or_cls)
  name = getattr(cls, "name", None)
  if not (isinstance(cls, type) and issubclass(cls, LearnedOptimizer)) or ARCHITECTURES.get(name) is not cls:
    raise ValueError(f"{cls.__name__} is not a registered learned-optimizer architecture, so "
                     f"it could not be saved; registered: {', '.join(sorted(ARCHITECTURES))}. "
                     "Call learned_opt.register_architecture on it first")


for _cls in (LearnedLR, PerParamMLP, PerParamLSTM, HierarchicalLOpt, NormalizedMLP):
  register_architecture(_cls)
