"""The optimizers `lopt eval` compares, resolved from names into `Candidate`s.

A `Candidate` is a factory `make(hparam, aux, num_steps) -> optax transform` plus the
grid of its one hyperparameter (the learning rate; empty when it has none) and `aux`, a
pytree of arrays handed to `make` as a traced argument (a learned optimizer's
meta-parameters). `make` is a module-level function, so one compiled evaluation loop
serves every task of a shape, every learning rate (vmapped) and every checkpoint of one
architecture.

Hand-designed baselines come from one table, `BASELINES`: adding one is one entry. Other
names `resolve` understands:
  NAME or PATH.lopt   a shipped (`learned_opt.list_pretrained()`) or saved learned optimizer
  saferate+NAME       SafeRate around that learned optimizer's direction
  NAME@LR             one that takes a learning rate, at that peak rate only (untuned:
                      the "single default rate" protocol), e.g. `run/final.lopt@1e-2`

A learned optimizer whose class takes a learning rate (`takes_learning_rate`, e.g.
`NormalizedMLP`: it outputs a unit-RMS direction) is run as `adamw_cosine` is: its peak
rate tuned over the same grid, under the same warmup-cosine schedule
(`baselines.warmup_cosine`) and the same decoupled weight decay and mask, kind "learned"
with the chosen `lr` recorded. One meta-trained inside a harness of its own
(`NormalizedMLP(meta_train_harness=True)`) runs inside it (`with_learning_rate`), under
that schedule and its meta-training weight decay; others run bare (the learned direction
on every leaf). Under `saferate+` such an optimizer's unit direction is what SafeRate
scales.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
import pathlib
import types
from typing import Any, Callable, NamedTuple, Optional

import optax

import learned_opt
from learned_opt import _sums, baselines
from learned_opt.baselines import adam_muon, hypergradient, scheduled
from learned_opt.bounds import (elementwise, enclosure, fusion, interpreter, interval, jaxpr_utils,
                                rules, stabilizers)
from learned_opt.meta_train.eval import cache
from learned_opt.meta_train.inner.tuning import DEFAULT_GRID

# 7 log-spaced learning rates, half a decade apart: 1e-4 ... 1e-1 (the baselines' grid).
DEFAULT_LR_GRID: tuple[float, ...] = DEFAULT_GRID
SAFERATE_PREFIX = "saferate+"
ADAM_HD_LR = 3e-3   # adam_hd's initial rate; the shipped hierarchical_hd's step_mult
# How a learned optimizer that takes a learning rate runs (in its results' fingerprint).
LEARNED_LR_PROTOCOL = (f"tuned-lr:warmup_cosine{scheduled.WARMUP_FRACTION}:"
                       f"wd{scheduled.ADAMW_WEIGHT_DECAY}")

Make = Callable[..., optax.GradientTransformation]


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
    eval_params: `(opt_state, params) -> params` where the final losses are measured
      (schedule-free AdamW); None: the trained params.
    sources: the lopt modules whose code determines this optimizer's results (their
      source is hashed into the baseline cache's key, so a change there re-runs it and a
      change elsewhere does not).
  """
  name: str
  make: Make
  grid: tuple[float, ...] = ()
  aux: Any = None
  kind: str = "hyperparameter-free"
  fingerprint: str = ""
  eval_params: Optional[Callable[[Any, Any], Any]] = None
  sources: tuple[types.ModuleType, ...] = ()


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A hand-designed baseline of `lopt eval`.

  Attributes:
    make: `(lr, aux, num_steps) -> optax transform` (module-level).
    tuned: tuned over the learning-rate grid; otherwise run once as is.
    fingerprint: identifies its definition (change it when the baseline changes, so
      cached results are re-run).
    default: run by `lopt eval` unless `--baselines` says otherwise.
    description: one line for `--help` and reports.
    eval_params, sources: see `Candidate`.
  """
  make: Make
  tuned: bool
  fingerprint: str
  default: bool = True
  description: str = ""
  eval_params: Optional[Callable[[Any, Any], Any]] = None
  sources: tuple[types.ModuleType, ...] = ()


# The wrapper SafeRate candidates use; a module attribute so tests can swap in another
# safeguard without running the bound interpreter.
safeguard = baselines.saferate


def _adam(lr, aux, num_steps):
  del aux, num_steps
  return optax.adam(lr)


def _muon(lr, aux, num_steps):
  del aux, num_steps
  return baselines.muon(lr)  # hidden weights Muon, the rest Adam


def _prodigy(lr, aux, num_steps):
  del lr, aux, num_steps
  return optax.contrib.prodigy(1.0)


def _adam_hd(lr, aux, num_steps):
  del lr, aux, num_steps
  return baselines.adam_hd(ADAM_HD_LR)


def _adamw_cosine(lr, aux, num_steps):
  del aux
  return baselines.adamw_cosine(lr, num_steps)


def _muon_cosine(lr, aux, num_steps):
  del aux
  return baselines.muon_cosine(lr, num_steps)


def _schedule_free_adamw(lr, aux, num_steps):
  del aux
  return baselines.schedule_free_adamw(lr, num_steps)


def _saferate_adam(lr, aux, num_steps):
  del lr, aux, num_steps
  # The wrapped direction is signed like an update (as a learned optimizer's output is),
  # so Adam's direction is -m/sqrt(v); SafeRate chooses how far to go along it.
  return safeguard(baselines.adam_direction())


_SCHEDULED, _ADAM_MUON = scheduled, adam_muon
# The module, not the function `learned_opt.baselines` re-exports under the same name.
saferate_module = importlib.import_module("learned_opt.baselines.saferate")
# SafeRate's results depend on the whole bound interpreter.
_SAFERATE = (saferate_module, adam_muon, elementwise, enclosure, fusion, interpreter, interval,
             jaxpr_utils, rules, stabilizers)

BASELINES: dict[str, Baseline] = {
    "adamw_cosine": Baseline(
        _adamw_cosine, True, f"adamw_cosine:wd{scheduled.ADAMW_WEIGHT_DECAY}:"
        f"warmup{scheduled.WARMUP_FRACTION}", description="AdamW, linear warmup over 5% of "
        "the budget, cosine decay to 0; peak rate tuned on the grid; weight decay 1e-4",
        sources=(_SCHEDULED, _ADAM_MUON)),
    "muon_cosine": Baseline(
        _muon_cosine, True, f"muon_cosine:warmup{scheduled.WARMUP_FRACTION}",
        description="Muon (Adam elsewhere) under the same warmup-cosine schedule, tuned",
        sources=(_SCHEDULED, _ADAM_MUON)),
    "schedule_free_adamw": Baseline(
        _schedule_free_adamw, True, f"schedule_free_adamw:wd{scheduled.ADAMW_WEIGHT_DECAY}:"
        f"warmup{scheduled.WARMUP_FRACTION}", description="optax's schedule-free AdamW, "
        "tuned on the grid, evaluated at its averaged iterate",
        eval_params=optax.contrib.schedule_free_eval_params, sources=(_SCHEDULED,)),
    "adam": Baseline(_adam, True, "adam", description="Adam, learning rate tuned on the grid"),
    "muon": Baseline(_muon, True, "muon:hidden-weights",
                     description="Muon on hidden matrices, Adam elsewhere, tuned on the grid",
                     sources=(_ADAM_MUON,)),
    "saferate": Baseline(_saferate_adam, False, "saferate:adam",
                         description="SafeRate on Adam's direction (hyperparameter-free)",
                         sources=_SAFERATE),
    "prodigy": Baseline(_prodigy, False, "prodigy:lr1",
                        description="optax's Prodigy at its default learning rate 1"),
    "adam_hd": Baseline(_adam_hd, False, f"adam_hd:lr{ADAM_HD_LR}",
                        description="Adam with hypergradient per-tensor rates from 3e-3",
                        sources=(hypergradient, _sums)),
}
DEFAULT_BASELINES: tuple[str, ...] = tuple(n for n, b in BASELINES.items() if b.default)
# The cache keys hash these sources: read them now, with the code this process runs.
cache.snapshot_sources([f for b in BASELINES.values()
                        for f in (b.make, b.eval_params, *b.sources) if f is not None])


def _learned(lr, aux, num_steps):
  lopt, meta_params = aux
  if not learned_opt.takes_learning_rate(lopt):
    return learned_opt.to_optax(lopt, meta_params, num_steps=num_steps)
  schedule = baselines.warmup_cosine(lr, num_steps)
  own = lopt.with_learning_rate(meta_params, schedule, num_steps=num_steps)
  if own is not None:  # meta-trained inside a harness of its own: evaluated inside it
    return own
  # adamw_cosine's schedule, weight decay and mask around the learned direction.
  return optax.chain(
      learned_opt.scale_by_learned_direction(lopt, meta_params, num_steps=num_steps),
      optax.add_decayed_weights(scheduled.ADAMW_WEIGHT_DECAY, adam_muon.decay_mask),
      optax.scale_by_learning_rate(schedule))


def _learned_at_rate(lr, aux, num_steps):
  del lr  # the grid's dummy: the rate travels in aux
  lopt, meta_params, rate = aux
  return _learned(rate, (lopt, meta_params), num_steps)


def _saferate_learned(lr, aux, num_steps):
  del lr
  lopt, meta_params = aux
  if not learned_opt.takes_learning_rate(lopt):
    return safeguard(learned_opt.to_optax(lopt, meta_params, num_steps=num_steps))
  # SafeRate chooses the step along the unit direction (outside any harness): the rate
  # is its job, so 1 here.
  return safeguard(optax.chain(
      learned_opt.scale_by_learned_direction(lopt, meta_params, num_steps=num_steps),
      optax.scale_by_learning_rate(1.0)))


def _load_learned(name: str):
  """(label, lopt, meta_params, weights hash) of a shipped name or a .lopt path."""
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
    ValueError: unknown name, missing file, or a grid with fewer than 2 values.
  """
  if len(lr_grid) < 2 or any(not (lr > 0) for lr in lr_grid):
    raise ValueError(f"lr_grid must hold at least 2 positive learning rates, got {lr_grid!r}")
  if name in BASELINES:
    b = BASELINES[name]
    if b.tuned:
      return Candidate(name, b.make, tuple(lr_grid), None, "tuned", b.fingerprint,
                       b.eval_params, b.sources)
    return Candidate(name, b.make, fingerprint=b.fingerprint, eval_params=b.eval_params,
                     sources=b.sources)
  if name.startswith(SAFERATE_PREFIX):
    inner, lopt, meta_params, sha = _load_learned(name[len(SAFERATE_PREFIX):])
    return Candidate(SAFERATE_PREFIX + inner, _saferate_learned, (), (lopt, meta_params),
                     "learned", sha)
  # A rate suffix: after the last '@', outside any folder name of a path.
  name, at, rate = (name.rpartition("@") if "@" in name.rsplit(os.sep, 1)[-1]
                    else (name, "", ""))
  label, lopt, meta_params, sha = _load_learned(name)
  if at:
    lr = _parse_rate(rate, name)
    if not learned_opt.takes_learning_rate(lopt):
      raise ValueError(f"{name!r}@{rate}: this learned optimizer ({type(lopt).__name__}) takes "
                       f"no learning rate; drop '@{rate}'")
    return Candidate(f"{label}@{lr:g}", _learned_at_rate, (), (lopt, meta_params, lr), "learned",
                     f"{sha}:{LEARNED_LR_PROTOCOL}:lr{lr!r}")
  return learned_candidate(label, lopt, meta_params, weights_sha256=sha, lr_grid=lr_grid)


def _parse_rate(text: str, name: str) -> float:
  try:
    lr = float(text)
  except ValueError:
    lr = float("nan")
  if not lr > 0 or lr == float("inf"):
    raise ValueError(f"{name}@{text}: expected a positive learning rate after '@', e.g. "
                     f"{name}@1e-2")
  return lr


def learned_candidate(label: str, lopt, meta_params, *, weights_sha256: str = "",
                      lr_grid: tuple[float, ...] = DEFAULT_LR_GRID) -> Candidate:
  """A learned optimizer (any meta-parameters, saved or not) run as `lopt eval` runs it.

  One that takes a learning rate is tuned over `lr_grid` under adamw_cosine's schedule
  (inside its own harness when it has one); others run as they are.
  """
  if learned_opt.takes_learning_rate(lopt):
    # The fingerprint names the protocol too: results of the same weights run another
    # way (as is, before this existed) are not reused.
    return Candidate(label, _learned, tuple(lr_grid), (lopt, meta_params), "learned",
                     f"{weights_sha256}:{LEARNED_LR_PROTOCOL}")
  return Candidate(label, _learned, (), (lopt, meta_params), "learned", weights_sha256)
