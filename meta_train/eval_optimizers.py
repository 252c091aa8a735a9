"""The optimizers `lopt eval` compares, resolved from names into `Candidate`s.

A `Candidate` is a factory `make(hparam, aux, num_steps) -> optax transform` plus the
grid of its one hyperparameter (the learning rate; empty when it has none) and `aux`, a
pytree of arrays handed to `make` as a traced argument (a learned optimizer's
meta-parameters). `make` is a module-level function, so one compiled evaluation loop
serves every task of a shape, every learning rate (vmapped) and every checkpoint of one
architecture.

Names `resolve` understands:
  adam, muon          tuned per task over the learning-rate grid
  saferate            SafeRate on the Adam direction (hyperparameter-free)
  prodigy             optax's Prodigy at its default learning rate 1 (learning-rate free;
                      the nominal of `HierarchicalLOpt(nominal="prodigy")`)
  adam_hd             Adam with hypergradient-adapted per-tensor learning rates from 3e-3
                      (`learned_opt.baselines.adam_hd`, untuned; the nominal of
                      `HierarchicalLOpt(nominal="adam_hd")`)
  NAME or PATH.lopt   a shipped (`learned_opt.list_pretrained()`) or saved learned optimizer
  saferate+NAME       SafeRate around that learned optimizer's direction
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, NamedTuple

import optax

from learned_opt.baselines.tuning import DEFAULT_GRID

# 7 log-spaced learning rates, half a decade apart: 1e-4 ... 1e-1 (the baselines' grid).
DEFAULT_LR_GRID: tuple[float, ...] = DEFAULT_GRID
BASELINES = ("adam", "muon", "saferate", "prodigy", "adam_hd")
SAFERATE_PREFIX = "saferate+"


class Candidate(NamedTuple):
  """One optimizer under evaluation.

  Attributes:
    name: its name in results and reports.
    make: `(hparam, aux, num_steps) -> optax.GradientTransformation`; module-level
      (hashable by identity), called inside jit with a traced `hparam`.
    grid: values of the hyperparameter to tune over (the best by final training loss
      is kept); `()` means none, and `make` gets a dummy 0.
    aux: pytree of arrays passed to `make` (learned optimizers: `(lopt, meta_params)`).
    kind: "tuned", "hyperparameter-free" or "learned" (for reports).
    fingerprint: identifies what ran (a learned optimizer's weights hash), so a resumed
      evaluation re-runs an optimizer whose checkpoint changed under the same name.
  """
  name: str
  make: Callable[..., optax.GradientTransformation]
  grid: tuple[float, ...] = ()
  aux: Any = None
  kind: str = "hyperparameter-free"
  fingerprint: str = ""


def _adam(lr, aux, num_steps):
  del aux, num_steps
  return optax.adam(lr)


def _muon(lr, aux, num_steps):
  del aux, num_steps
  from learned_opt.baselines.adam_muon import muon  # hidden weights Muon, the rest Adam
  return muon(lr)


def _prodigy(lr, aux, num_steps):
  del lr, aux, num_steps
  from learned_opt.base import prodigy_nominal
  return prodigy_nominal()


def _adam_hd(lr, aux, num_steps):
  del lr, aux, num_steps
  from learned_opt.baselines import adam_hd
  return adam_hd(ADAM_HD_LR)


ADAM_HD_LR = 3e-3   # the initial rate; the shipped hierarchical_adam_hd's step_mult


def _saferate_module():
  try:
    from learned_opt.baselines import saferate
  except ImportError as e:
    raise ValueError("SafeRate is not available: learned_opt.baselines.saferate has not "
                     "landed in this checkout") from e
  return saferate


def _saferate_adam(lr, aux, num_steps):
  del lr, aux, num_steps
  from learned_opt.baselines import adam_direction
  # The wrapped direction is signed like an update (as a learned optimizer's output is),
  # so Adam's direction is -m/sqrt(v); SafeRate chooses how far to go along it.
  return _saferate_module()(adam_direction())


def _learned(lr, aux, num_steps):
  del lr
  import learned_opt
  lopt, meta_params = aux
  return learned_opt.to_optax(lopt, meta_params, num_steps=num_steps)


def _saferate_learned(lr, aux, num_steps):
  return _saferate_module()(_learned(lr, aux, num_steps))


def saferate_available() -> bool:
  try:
    _saferate_module()
    return True
  except ValueError:
    return False


def _load_learned(name: str):
  """(label, lopt, meta_params, weights hash) of a shipped name or a .lopt path."""
  import importlib.resources

  import learned_opt
  if name.endswith(".lopt") or os.sep in name:
    if not os.path.isfile(name):
      raise ValueError(f"learned optimizer file {name!r} does not exist")
    path = pathlib.Path(name)
    # A run's export is `<run>/final.lopt`: name it after the run.
    label = path.parent.name if path.stem == "final" and path.parent.name else path.stem
  elif name in learned_opt.list_pretrained():
    label, path = name, learned_opt.pretrained_path(name)
  else:
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(BASELINES)}, a "
                     f"shipped learned optimizer {learned_opt.list_pretrained()}, a path to a "
                     f".lopt file, or saferate+<one of those>")
  with importlib.resources.as_file(path) as file:
    lopt, meta_params, _ = learned_opt.load(file)
    sha = learned_opt.read_header(file)["weights_sha256"]
  return label, lopt, meta_params, sha


def resolve(name: str, *, lr_grid: tuple[float, ...] = DEFAULT_LR_GRID) -> Candidate:
  """The `Candidate` for an optimizer name (see the module docstring).

  Raises:
    ValueError: unknown name, missing file, a grid with fewer than 2 values, or SafeRate
      requested before `learned_opt.baselines.saferate` exists.
  """
  if len(lr_grid) < 2 or any(not (lr > 0) for lr in lr_grid):
    raise ValueError(f"lr_grid must hold at least 2 positive learning rates, got {lr_grid!r}")
  if name == "adam":
    return Candidate("adam", _adam, tuple(lr_grid), None, "tuned", "adam")
  if name == "muon":
    return Candidate("muon", _muon, tuple(lr_grid), None, "tuned", "muon:hidden-weights")
  if name == "saferate":
    _saferate_module()
    return Candidate("saferate", _saferate_adam, fingerprint="saferate:adam")
  if name == "prodigy":
    return Candidate("prodigy", _prodigy, fingerprint="prodigy:lr1")
  if name == "adam_hd":
    return Candidate("adam_hd", _adam_hd, fingerprint=f"adam_hd:lr{ADAM_HD_LR}")
  if name.startswith(SAFERATE_PREFIX):
    _saferate_module()
    inner, lopt, meta_params, sha = _load_learned(name[len(SAFERATE_PREFIX):])
    return Candidate(SAFERATE_PREFIX + inner, _saferate_learned, (), (lopt, meta_params),
                     "learned", sha)
  label, lopt, meta_params, sha = _load_learned(name)
  return Candidate(label, _learned, (), (lopt, meta_params), "learned", sha)
