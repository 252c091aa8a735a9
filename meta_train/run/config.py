"""Meta-training run configs: YAML validated against frozen dataclasses.

A config is read once (`load_config`, with `--set key=value` overrides) into a frozen
`MetaTrainConfig`; `build.py` turns it into objects (learned optimizer, estimators, outer
optax optimizer) and after that only pytrees flow. Unknown keys and mistyped values
fail with an error naming the key, the value and what was expected; so do values out
of range (`validation.py`, run when each section is built) and YAML syntax errors (file,
line and column). Where a float is expected, a string that parses as one is taken as
that float: YAML 1.1 reads `3e-4` (no dot) as a string, and that is how people type it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from learned_opt.meta_train.run import validation
# The builders live in build.py; callers reach them here (config_lib.build_lopt, ...).
from learned_opt.meta_train.run.build import (build_estimators, build_family, build_lopt,  # noqa: F401
                                              build_outer_optimizer, build_schedule,
                                              initial_meta_params, lopt_class)


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

  def __post_init__(self):
    validation.check_section("task", self)


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

  def __post_init__(self):
    validation.check_section("truncation", self)


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

  def __post_init__(self):
    validation.check_section("estimator", self)


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

  def __post_init__(self):
    validation.check_section("outer", self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """checkpoint_every: outer steps between run checkpoints; keep_checkpoints: how many
  are kept; log_every: outer steps between metrics lines (always to metrics.jsonl);
  tensorboard: also write TensorBoard events to the run's tb/ folder (off by default:
  it needs tensorboardX, which is not a dependency; on without it, the run warns once,
  naming `pip install tensorboardX`, and writes only metrics.jsonl); export: file name
  of the exported meta-parameters inside the run folder (None: no export)."""
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 1
  tensorboard: bool = False
  export: str | None = "final.lopt"

  def __post_init__(self):
    validation.check_section("run", self)


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

  def __post_init__(self):
    validation.check_config(self)


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
  if tp is float and isinstance(value, str):
    parsed = validation.parse_float(value)
    if parsed is not None:
      return parsed
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


def _yaml_error(e: yaml.YAMLError, where: str, one_line: bool) -> ValueError:
  """One line naming `where`, the line and column (1-based; the column only for a
  one-line text such as a --set value) and the problem."""
  mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
  problem = getattr(e, "problem", None) or str(e).splitlines()[0]
  context = getattr(e, "context", None)
  if mark is None:
    at = f"{where}: invalid YAML"
  elif one_line:
    at = f"{where}: invalid YAML at column {mark.column + 1} of the value"
  else:
    at = f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML"
  return ValueError(f"{at}: {problem}" + (f" ({context})" if context else ""))


def parse_yaml(text: str, where: str, *, one_line: bool = False) -> Any:
  """`yaml.safe_load(text)`, with syntax errors as a one-line ValueError naming `where`
  (a file: with line and column, as editors and compilers write them)."""
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise _yaml_error(e, where, one_line) from e


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
    value = parse_yaml(raw, f"--set {item!r}", one_line=True)
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
    try:
      with open(path) as f:
        text = f.read()
    except OSError as e:  # a directory, no permission, ...
      raise ValueError(f"cannot read config {path}: {e.strerror or e}") from e
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
      raise ValueError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
  return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: MetaTrainConfig) -> str:
  """The config as YAML (what a run folder's config.yaml holds)."""
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


_UNSET = "<unset>"


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                prefix: str = "") -> list[tuple[str, Any, Any]]:
  """`(dotted key, old value, new value)` for every leaf where two config dicts differ
  (`config_to_dict` form; a key present on one side only shows "<unset>" on the other)."""
  out = []
  for k in sorted(set(old) | set(new), key=str):
    a, b = old.get(k, _UNSET), new.get(k, _UNSET)
    key = f"{prefix}{k}"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += config_diff(a, b, key + ".")
    elif a != b:
      out.append((key, a, b))
  return out
