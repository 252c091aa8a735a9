"""Building objects from a validated config: learned optimizer, estimators, outer optimizer.

The config sections (`config.py`) are plain frozen dataclasses; the functions here take
them and return the objects a run needs. After this only pytrees flow.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
import types
import typing
from typing import Any, Mapping

import learned_opt
from learned_opt import registry
from learned_opt.checkpoint import CheckpointError
from learned_opt.meta_train.estimators import truncation
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncated_es import TruncatedES
from learned_opt.meta_train.learner.outer import make_outer_optimizer
from learned_opt.meta_train.run.validation import parse_float
from learned_opt.tasks import get_family
from learned_opt.tasks.augment import FullBatchFamily, ParamScaleFamily


def _import_class(spec: str):
  module, _, attr = spec.partition(":")
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"cannot import learned optimizer {spec!r}: {e}") from e


def lopt_class(name: str) -> type:
  """The architecture `lopt.name` names: a registered name (`learned_opt.registry`), or
  "package.module:Class" for a class that module registers when imported. Either way the
  class is one that checkpoints can save, checked here, before any work."""
  if ":" not in name:
    return registry.get_architecture(name)
  cls = _import_class(name)
  registry.check_registered(cls)
  return cls


def build_lopt(cfg):
  """The learned optimizer the `lopt` section (`config.LOptConfig`) names, constructed with
  its options."""
  cls = lopt_class(cfg.name)
  valid = [f.name for f in dataclasses.fields(cls)] + list(getattr(cls, "legacy_config_keys", ()))
  bad = [k for k in cfg.options if k not in valid]
  if bad:
    raise ValueError(f"unknown config key 'lopt.options.{bad[0]}' for {cls.__name__}; valid keys: "
                     f"{', '.join(valid)}")
  # The LearnedOptimizer contract: YAML lists become tuples (static fields must hash).
  return cls.from_config(_float_options(cls, cfg.options))


def _float_options(cls, options: Mapping[str, Any]) -> dict:
  """`options` with strings that parse as floats converted where `cls` declares a float
  field (`--set lopt.options.init_lr=1e-3`, like the config's own float keys)."""
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # unresolvable annotations: leave the options as given
    return dict(options)
  out = dict(options)
  for k, v in options.items():
    tp = hints.get(k)
    floaty = tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                             and float in typing.get_args(tp))
    if floaty and isinstance(v, str) and (parsed := parse_float(v)) is not None:
      out[k] = parsed
  return out


def build_schedule(cfg):
  """The truncation schedule of the `truncation` section (`config.TruncationConfig`)."""
  if cfg.kind == "constant":
    return truncation.ConstantTruncation(horizon=cfg.horizon)
  if cfg.kind == "log_uniform":
    return truncation.LogUniformTruncation(min_length=cfg.min_length, max_length=cfg.max_length)
  raise ValueError(f"unknown truncation.kind {cfg.kind!r}; expected 'constant' or 'log_uniform'")


def build_estimators(cfg, lopt) -> list:
  """One estimator per task family of `cfg` (a `config.MetaTrainConfig`), all with the
  same settings."""
  kinds = {"pes": PES, "truncated_es": TruncatedES}
  e = cfg.estimator
  if e.kind not in kinds:
    raise ValueError(f"unknown estimator.kind {e.kind!r}; expected one of {', '.join(kinds)}")
  if not cfg.task.families:
    raise ValueError("task.families is empty; expected at least one family name")
  schedule = build_schedule(cfg.truncation)
  settings = {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "kind"}
  pools = [(name, False) for name in cfg.task.families]
  pools += [(name, True) for name in cfg.task.full_batch_families]
  return [kinds[e.kind](family=build_family(name, cfg.task, full_batch=fb), lopt=lopt,
                        schedule=schedule, **settings) for name, fb in pools]


def build_family(name: str, cfg, *, full_batch: bool = False):
  """The named meta-training family, augmented as the `task` section (`config.TaskConfig`)
  says (and on its full batch)."""
  family = get_family(name, cfg.data_dir)
  if full_batch:
    family = FullBatchFamily(family)
  if cfg.param_scale_range is None:
    return family
  if len(cfg.param_scale_range) != 2:
    raise ValueError(f"task.param_scale_range must be [low, high], got {list(cfg.param_scale_range)}")
  return ParamScaleFamily(family, tuple(cfg.param_scale_range))


def initial_meta_params(cfg, lopt):
  """The meta-parameters the `lopt` section's `init_from` names (None without it), checked
  against `lopt`."""
  if cfg.init_from is None:
    return None
  source = cfg.init_from
  if os.path.isdir(source):
    raise ValueError(f"lopt.init_from={source!r} is a directory; expected a .lopt file written "
                     "by learned_opt.save (e.g. RUN/final.lopt) or a shipped name: "
                     f"{', '.join(learned_opt.list_pretrained())}")
  if os.path.exists(source):
    try:
      loaded, meta_params, _ = learned_opt.load(source)
    except CheckpointError as e:
      raise CheckpointError(f"lopt.init_from={source!r}: {e}") from e
  elif source in learned_opt.list_pretrained():
    with importlib.resources.as_file(learned_opt.pretrained_path(source)) as path:
      loaded, meta_params, _ = learned_opt.load(path)
  else:
    raise ValueError(f"lopt.init_from={source!r} is neither a file nor a shipped optimizer; "
                     f"shipped: {', '.join(learned_opt.list_pretrained())}")
  if loaded != lopt:
    diff = [f.name for f in dataclasses.fields(lopt)
            if getattr(loaded, f.name, None) != getattr(lopt, f.name)]
    raise ValueError(f"lopt.init_from={source!r} holds a {type(loaded).__name__} that differs from "
                     f"the configured {type(lopt).__name__} in {diff or 'its type'}; set lopt.name "
                     "and lopt.options to that checkpoint's architecture")
  return meta_params


def build_outer_optimizer(cfg):
  """The outer optax optimizer of the `outer` section (`config.OuterConfig`)."""
  return make_outer_optimizer(cfg.optimizer, cfg.learning_rate, grad_clip=cfg.grad_clip,
                              **cfg.options)
