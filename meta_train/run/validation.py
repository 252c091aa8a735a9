"""Range checks of every config setting, run when a config is built, before any work.

Each config section's dataclass calls `check_section` from its `__post_init__`, and
`MetaTrainConfig` calls `check_config` for the rules that span sections, so a config
that would fail later (a ZeroDivisionError after the first step, an untrained export
after zero steps, a run that trains and then cannot checkpoint) is refused when it is
read (`load_config`, `config_from_dict`) or built in Python (`OuterConfig(...)`,
`dataclasses.replace`). Every message names the key, the value and the allowed range.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

from learned_opt.meta_train.inner.unroll import META_LOSS_SPLITS, POPULATION_MAPS
from learned_opt.meta_train.learner.outer import OUTER_OPTIMIZERS

# jax.random.key keeps the low 32 bits of a seed (without x64): seeds 0 and 2**32 would
# silently be the same run, so the range is what a key holds.
SEED_RANGE = (0, 2**32 - 1)
ESTIMATOR_KINDS = ("pes", "truncated_es")
TRUNCATION_KINDS = ("constant", "log_uniform")

Rule = Callable[[str, Any], None]


def parse_float(text: str) -> float | None:
  """`text` as a float ("3e-4", "1E3", " 0.5 "), or None if it is not one.

  YAML 1.1 reads `3e-4` (no dot) as a string; a person means the number.
  """
  try:
    return float(text.strip())
  except ValueError:
    return None


def _fail(key: str, value: Any, expected: str) -> None:
  raise ValueError(f"config key {key!r}: got {value!r}, expected {expected}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(low: int) -> Rule:
  def rule(key, value):
    if not _is_int(value) or value < low:
      _fail(key, value, f"an int >= {low}")
  return rule


def int_in(low: int, high: int) -> Rule:
  def rule(key, value):
    if not _is_int(value) or not low <= value <= high:
      _fail(key, value, f"an int in [{low}, {high}]")
  return rule


def positive_float(key: str, value: Any) -> None:
  # Finite: a YAML .inf or .nan would pass a plain "> 0" or fail it silently.
  if not _is_number(value) or not math.isfinite(value) or value <= 0:
    _fail(key, value, "a finite number > 0")


def optional(rule: Rule) -> Rule:
  def check(key, value):
    if value is not None:
      rule(key, value)
  return check


def one_of(choices) -> Rule:
  def rule(key, value):
    if value not in choices:
      raise ValueError(f"unknown {key} {value!r}; expected one of "
                       f"{', '.join(repr(c) for c in choices)}")
  return rule


def non_empty_str(key: str, value: Any) -> None:
  if not isinstance(value, str) or not value.strip():
    _fail(key, value, "a non-empty string")


def file_name(key: str, value: Any) -> None:
  # The export is written inside the run folder at the very end: a path into a folder
  # that does not exist would fail only after the whole run.
  if (not isinstance(value, str) or not value or value in (".", "..")
      or os.path.basename(value) != value or (os.altsep and os.altsep in value)):
    _fail(key, value, "a file name inside the run folder (no directories), or null")


def scale_range(key: str, value: Any) -> None:
  # The message keeps the form build_family used, which callers may match.
  if len(value) != 2:
    raise ValueError(f"{key} must be [low, high], got {list(value)}")
  low, high = value
  if not all(_is_number(v) and math.isfinite(v) for v in value) or not 0 < low <= high:
    _fail(key, list(value), "[low, high] with 0 < low <= high")


def families(key: str, value: Any) -> None:
  if not value:
    raise ValueError(f"{key} is empty; expected at least one family name")


RULES: dict[str, dict[str, Rule]] = {
    "": {"name": non_empty_str, "seed": int_in(*SEED_RANGE)},
    "task": {"families": families, "param_scale_range": optional(scale_range)},
    "truncation": {"kind": one_of(TRUNCATION_KINDS), "horizon": int_at_least(1),
                   "min_length": int_at_least(1), "max_length": int_at_least(1)},
    "estimator": {"kind": one_of(ESTIMATOR_KINDS), "num_tasks": int_at_least(1),
                  "unroll_length": int_at_least(1), "sigma": positive_float,
                  "meta_loss_split": one_of(META_LOSS_SPLITS),
                  "loss_diff_clip": optional(positive_float),
                  "population_map": one_of(POPULATION_MAPS),
                  "map_batch_size": optional(int_at_least(1))},
    "outer": {"optimizer": one_of(tuple(OUTER_OPTIMIZERS)), "learning_rate": positive_float,
              "grad_clip": optional(positive_float), "num_steps": int_at_least(1),
              "accumulate": int_at_least(1)},
    "run": {"checkpoint_every": int_at_least(1), "keep_checkpoints": int_at_least(1),
            "log_every": int_at_least(1), "export": optional(file_name)},
}


def check_section(section: str, cfg: Any) -> None:
  """Checks the fields of one config section ("" for the top level) against `RULES`.

  Raises:
    ValueError: naming the first field out of range, its value and the allowed range.
  """
  prefix = f"{section}." if section else ""
  for name, rule in RULES[section].items():
    rule(prefix + name, getattr(cfg, name))


def check_config(cfg: Any) -> None:
  """The rules that span sections (each section has passed `check_section`).

  Raises:
    ValueError: naming the keys involved and their values.
  """
  check_section("", cfg)
  t, unroll = cfg.truncation, cfg.estimator.unroll_length
  if t.kind == "log_uniform" and t.min_length > t.max_length:
    raise ValueError(f"config keys 'truncation.min_length' ({t.min_length}) and "
                     f"'truncation.max_length' ({t.max_length}): expected min_length <= max_length")
  # A task shorter than one truncation would reset twice in one unroll (see
  # TruncationSchedule.check); refused here rather than when the estimators are built.
  shortest, key = ((t.horizon, "truncation.horizon") if t.kind == "constant"
                   else (t.min_length, "truncation.min_length"))
  if shortest < unroll:
    raise ValueError(f"config key {key!r}: got {shortest}, expected >= estimator.unroll_length "
                     f"({unroll}): every task must live at least one truncation")
