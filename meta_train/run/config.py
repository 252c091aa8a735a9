"""Meta-training run configs: YAML validated against frozen dataclasses.

A config is read once (`load_config`, with `--set key=value` overrides) into a frozen
`MetaTrainConfig`; `build` turns it into objects (learned optimizer, estimators, outer
optax optimizer) and after that only pytrees flow. Unknown keys and mistyped values
fail with an error naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

import learned_opt
from learned_opt import registry
from learned_opt.meta_train.estimators import truncation
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncated_es import TruncatedES
from learned_opt.meta_train.learner.outer import make_outer_optimizer
from learned_opt.tasks import get_family
from learned_opt.tasks.augment import FullBatchFamily, ParamScaleFamily


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """families: registered meta-training family names (one sub-pool each);
  data_dir: local dataset root for families on named datasets;
  param_scale_range: [low, high] to reparameterize every tensor of every task as
  theta = s * phi with s log-uniform in that range (`tasks.augment.ParamScaleFamily`;
  teaches step-size adaptation), or null for the families as they are;
  full_batch_families: further sub-pools of these registered families trained on their
  deterministic full batch (`tasks.augment.FullBatchFamily`)."""
  families: tuple[str, ...] = ("mlp_synthetic",)
  data_dir: str | None = None
  param_scale_range: tuple[float, ...] | None = None
  full_batch_families: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LOptConfig:
  """name: a registered architecture (`learned_opt.registry`, e.g. "per_param_mlp") or
  "package.module:Class" for a class that module registers with
  `learned_opt.register_architecture` (so the run can export it);
  options: keyword arguments of its constructor (checked against its fields);
  init_from: start meta-training from these meta-parameters instead of a fresh init: a
  learned_opt checkpoint path or a shipped name (`learned_opt.list_pretrained()`) whose
  optimizer is the one `name` and `options` build (fine-tuning)."""
  name: str = "per_param_mlp"
  options: dict = dataclasses.field(default_factory=dict)
  init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
  """kind: "constant" (every task `horizon` steps) or "log_uniform" (horizons
  log-uniform in [min_length, max_length])."""
  kind: str = "constant"
  horizon: int = 200
  min_length: int = 50
  max_length: int = 500


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
  """See `GradientEstimator` for the meaning of each field; kind: "pes" or "truncated_es"."""
  kind: str = "pes"
  num_tasks: int = 8
  unroll_length: int = 20
  sigma: float = 0.01
  meta_loss_split: str = "train"
  loss_diff_clip: float | None = None
  loss_diff_sign: bool = False
  stagger: bool = True
  population_map: str = "auto"
  map_batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class OuterConfig:
  """optimizer: a key of `outer.OUTER_OPTIMIZERS` (adam, adamw, sgd, lion, ...), called
  as the optax optimizer(learning_rate, **options); grad_clip: global-norm clip before it
  (None: off); num_steps: outer steps; accumulate: estimates averaged per step."""
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  grad_clip: float | None = 1.0
  options: dict = dataclasses.field(default_factory=dict)
  num_steps: int = 100
  accumulate: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """checkpoint_every: outer steps between run checkpoints; keep_checkpoints: how many
  are kept; log_every: outer steps between metrics lines; tensorboard: also write
  TensorBoard events if tensorboardX is installed; export: file name of the exported
  meta-parameters inside the run folder (None: no export)."""
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 1
  tensorboard: bool = True
  export: str | None = "final.lopt"


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
  name: str = "meta_train"
  seed: int = 0
  task: TaskConfig = TaskConfig()
  lopt: LOptConfig = LOptConfig()
  truncation: TruncationConfig = TruncationConfig()
  estimator: EstimatorConfig = EstimatorConfig()
  outer: OuterConfig = OuterConfig()
  run: RunConfig = RunConfig()


# ---- parsing and validation -----------------------------------------------------------
def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp`; returns it converted (lists -> tuples)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ValueError:
        pass
    raise ValueError(f"config key {key!r}: got {value!r}, expected {_type_name(tp)}")
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise ValueError(f"config key {key!r}: got {value!r}, expected a mapping of {tp.__name__} fields")
    return _from_dict(tp, value, key + ".")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      value = [value]  # a single name where a list is expected
    return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if tp is dict or origin is dict:
    if value is None:
      return {}
    if not isinstance(value, Mapping):
      raise ValueError(f"config key {key!r}: got {value!r}, expected a mapping")
    return dict(value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
    return value
  raise ValueError(f"config key {key!r}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")


def _from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in data if k not in names]
  if unknown:
    raise ValueError(f"unknown config key {prefix + str(unknown[0])!r}; valid keys"
                     f"{' under ' + prefix[:-1] if prefix else ''}: {', '.join(names)}")
  return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def config_from_dict(data: Mapping[str, Any] | None) -> MetaTrainConfig:
  """Validates a nested mapping (e.g. parsed YAML) into a `MetaTrainConfig`."""
  if data is None:
    data = {}
  if not isinstance(data, Mapping):
    raise ValueError(f"a config must be a mapping of sections, got {type(data).__name__}")
  return _from_dict(MetaTrainConfig, data)


def config_to_dict(cfg: MetaTrainConfig) -> dict:
  """Plain nested dict (tuples as lists), the inverse of `config_from_dict`."""
  def plain(x):
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x
  return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
  """Applies "a.b.c=value" overrides to a nested dict; values are parsed as YAML.

  A key must name an existing config field (or a key inside a dict-valued field such as
  `lopt.options`); its type is checked when the result is validated.
  """
  data = dict(data)
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    value = yaml.safe_load(raw)
    cls, node = MetaTrainConfig, data
    for depth, k in enumerate(keys):
      last = depth == len(keys) - 1
      if cls is not None:
        names = [f.name for f in dataclasses.fields(cls)]
        if k not in names:
          where = ".".join(keys[:depth])
          raise ValueError(f"unknown config key {'.'.join(keys[:depth + 1])!r} in --set; valid keys"
                           f"{' under ' + where if where else ''}: {', '.join(names)}")
        field_type = typing.get_type_hints(cls)[k]
      if last:
        node[k] = value
        break
      child = dict(node.get(k) or {})
      node[k] = child
      node = child
      cls = field_type if cls is not None and dataclasses.is_dataclass(field_type) else None
  return data


def load_config(path: str | None, overrides: Sequence[str] = ()) -> MetaTrainConfig:
  """Reads a YAML config (None: all defaults), applies `--set` overrides, validates."""
  data = {}
  if path is not None:
    with open(path) as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
      raise ValueError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
  return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: MetaTrainConfig) -> str:
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---- building objects -------------------------------------------------------------------
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


def build_lopt(cfg: LOptConfig):
  """The learned optimizer named by `cfg`, constructed with `cfg.options`."""
  cls = lopt_class(cfg.name)
  valid = [f.name for f in dataclasses.fields(cls)] + list(getattr(cls, "legacy_config_keys", ()))
  bad = [k for k in cfg.options if k not in valid]
  if bad:
    raise ValueError(f"unknown config key 'lopt.options.{bad[0]}' for {cls.__name__}; valid keys: "
                     f"{', '.join(valid)}")
  # The LearnedOptimizer contract: YAML lists become tuples (static fields must hash).
  return cls.from_config(dict(cfg.options))


def build_schedule(cfg: TruncationConfig):
  if cfg.kind == "constant":
    return truncation.ConstantTruncation(horizon=cfg.horizon)
  if cfg.kind == "log_uniform":
    return truncation.LogUniformTruncation(min_length=cfg.min_length, max_length=cfg.max_length)
  raise ValueError(f"unknown truncation.kind {cfg.kind!r}; expected 'constant' or 'log_uniform'")


def build_estimators(cfg: MetaTrainConfig, lopt) -> list:
  """One estimator per task family, all with the same settings."""
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


def build_family(name: str, cfg: TaskConfig, *, full_batch: bool = False):
  """The named meta-training family, augmented as `cfg` says (and on its full batch)."""
  family = get_family(name, cfg.data_dir)
  if full_batch:
    family = FullBatchFamily(family)
  if cfg.param_scale_range is None:
    return family
  if len(cfg.param_scale_range) != 2:
    raise ValueError(f"task.param_scale_range must be [low, high], got {list(cfg.param_scale_range)}")
  return ParamScaleFamily(family, tuple(cfg.param_scale_range))


def initial_meta_params(cfg: LOptConfig, lopt):
  """The meta-parameters `lopt.init_from` names (None without it), checked against `lopt`."""
  if cfg.init_from is None:
    return None
  source = cfg.init_from
  if os.path.exists(source):
    loaded, meta_params, _ = learned_opt.load(source)
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


def build_outer_optimizer(cfg: OuterConfig):
  return make_outer_optimizer(cfg.optimizer, cfg.learning_rate, grad_clip=cfg.grad_clip,
                              **cfg.options)
