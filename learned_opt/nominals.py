"""Nominal rules: the hand-designed update a learned optimizer corrects.

A learned optimizer with a nominal does not produce the whole step: its network outputs
a bounded correction `d` and log-scale around a rule known to work on any task (Adam,
hypergradient Adam, Prodigy), which is what keeps it from diverging out of distribution
(the "nominal" terms of VeLO-style optimizers). Its output weights start near zero
(`NOMINAL_OUT_INIT`), so an untrained optimizer *is* its nominal.

A nominal is a frozen, hashable dataclass (its fields are static config) implementing
`Nominal`; `PerParamMLP(nominal=...)` and `HierarchicalLOpt(nominal=...)` take an
instance, or None for no nominal:

    HierarchicalLOpt(nominal=AdamHDNominal(rate_max_log_scale=0.693))

For convenience and old configs they also take the names in `NOMINALS` ("adam",
"adam_hd", "prodigy"; "none" is None) and the `config()` dicts written to checkpoint
headers (`{"kind": "adam_hd", "rate": 0.05, ...}`), through `resolve`.

Adding a nominal: subclass `Nominal` as a `@dataclasses.dataclass(frozen=True)` with a
unique `kind`, implement `leaf_update` (and `init` / `tensor_inputs` / `advance` if it
keeps state or talks to the per-tensor LSTM), and pass an instance. To save and load
optimizers that use it, list it in `NOMINALS` (built-ins) or call `register_nominal`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from learned_opt import feature_state
from learned_opt.base import check_positive, sanitize
from learned_opt.baselines import hypergradient as hd

NOMINAL_RESIDUAL_CLIP = 3.0     # |learned correction| <= this, in units of the nominal's direction
NOMINAL_MAX_LOG_SCALE = 4.0     # learned step-size factor within [e^-4, e^4]
NOMINAL_OUT_INIT = 0.01         # output weights start this small: untrained == the nominal
_ADAM_EPS = 1e-8


class StepInputs(NamedTuple):
  """What a nominal may read at one step; lists follow `jax.tree.leaves(params)` order.

  Attributes:
    spec: the optimizer's `features.FeatureSpec`.
    features: this step's `features.Features` (from `features.compute`).
    fstate: the `features.FeatureState` after this step's accumulation.
    grads: raw gradient leaves (unsanitized, any float dtype).
    params: float32 parameter leaves.
  """
  spec: Any
  features: Any
  fstate: Any
  grads: Sequence[jax.Array]
  params: Sequence[jax.Array]


class Nominal(abc.ABC):
  """A rule a learned optimizer corrects. Subclasses are frozen dataclasses.

  Per step the optimizer calls, in order: `tensor_inputs` (HierarchicalLOpt's LSTM reads
  them), `advance` (once, with the head's extra outputs) and `leaf_update` per tensor.
  The state is whatever `init` returns (a pytree, kept in the optimizer's state).
  Values that two of these need are computed once and passed on (`carry`, `values`):
  a value computed twice is the same forward, but its meta-gradient sums differently.

  Attributes:
    kind: the name in configs and checkpoint headers (a key of `NOMINALS`).
    required_features: feature groups the rule reads (validated at construction).
    keeps_state: whether `init` returns a non-empty state.
    num_tensor_inputs: columns `tensor_inputs` adds to each tensor's LSTM input.
  """

  kind: ClassVar[str] = ""
  required_features: ClassVar[tuple[str, ...]] = ()
  keeps_state: ClassVar[bool] = False
  num_tensor_inputs: ClassVar[int] = 0
  # Flat optimizer keys of old configs -> this class's fields (see `resolve`).
  legacy_keys: ClassVar[dict[str, str]] = {}

  @property
  def num_head_outputs(self) -> int:
    """Extra per-tensor outputs of the LSTM's head that `advance` reads."""
    return 0

  def config(self) -> dict[str, Any]:
    """`{"kind": kind, **fields}`, JSON-able (tuples become lists); `resolve` reads it."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v
                                  for k, v in values.items()}}

  def compute_options(self, spec) -> dict[str, Any]:
    """Extra keyword arguments for `features.compute` (e.g. `cosine_momentum`)."""
    del spec
    return {}

  def init(self, params: Sequence[jax.Array]) -> Any:
    """The state for float32 parameter leaves `params`."""
    del params
    return ()

  def tensor_inputs(self, state, inputs: StepInputs) -> tuple[list[jax.Array], Any]:
    """`(columns, carry)`: [n_tensors, k] arrays, `num_tensor_inputs` columns in all,
    for the LSTM, and anything `advance` reads again."""
    del state, inputs
    return [], None

  def advance(self, state, inputs: StepInputs, head: jax.Array, carry) -> tuple[Any, Any]:
    """`(values, new_state)`: what `leaf_update` reads this step, and the next state.

    `head` is [n_tensors, num_head_outputs], the LSTM head's extra outputs (unbounded:
    clip them); `carry` is the second output of `tensor_inputs`.
    """
    del inputs, head, carry
    return None, state

  @abc.abstractmethod
  def leaf_update(self, values, inputs: StepInputs, i: int, correction: jax.Array,
                  log_scale: jax.Array, *, step_mult, max_log_scale: float,
                  residual_clip: float) -> jax.Array:
    """The additive float32 update of tensor `i`, before weight decay and muP.

    Args:
      values: the first output of `advance`.
      inputs: this step's inputs.
      i: index of the tensor in `inputs.params`.
      correction: the network's per-coordinate correction `d`, shaped like the tensor.
      log_scale: the network's log step factor (per coordinate or per tensor).
      step_mult: the optimizer's step size.
      max_log_scale, residual_clip: the trust region: `|correction|` and `|log_scale|`
        are to be clipped to these (see `nominal_adam_update`).
    """


def check_class(cls) -> None:
  """Raises `TypeError` unless `cls` is a frozen-dataclass `Nominal` subclass with a kind."""
  if not (isinstance(cls, type) and issubclass(cls, Nominal)):
    raise TypeError(f"a nominal must be a learned_opt.nominals.Nominal subclass, got {cls!r}")
  params = getattr(cls, "__dataclass_params__", None)
  # Optimizers are static jit configs: the nominal must hash and compare by value.
  if params is None or not params.frozen:
    raise TypeError(f"{cls.__name__} must be a @dataclasses.dataclass(frozen=True)")
  if not isinstance(cls.kind, str) or not cls.kind:
    raise TypeError(f"{cls.__name__} needs a non-empty class attribute `kind`")


def adam_momentum_index(spec) -> int:
  """Index of the momentum decay closest to 0.9: Adam's first moment."""
  decays = spec.momentum_decays
  return min(range(len(decays)), key=lambda j: abs(decays[j] - 0.9))


def adam_direction(spec, fstate, leaf_index: int) -> jax.Array:
  """Adam's bias-corrected m / (sqrt(v) + eps) for one leaf, from the feature state.

  Uses the momentum decay closest to 0.9 and `spec.rms_decay`; `fstate` is the state
  after this step's accumulation (its step counter is already 1 at the first update).
  """
  decays = spec.momentum_decays
  k = adam_momentum_index(spec)
  t = fstate.step.astype(jnp.float32)
  m_hat = feature_state.momenta(spec, fstate, leaf_index)[k] / (1.0 - decays[k] ** t)
  v_hat = feature_state.second_moment(spec, fstate, leaf_index) / (1.0 - spec.rms_decay ** t)
  return m_hat / (jnp.sqrt(v_hat) + _ADAM_EPS)


def nominal_adam_update(adam: jax.Array, correction: jax.Array, log_scale: jax.Array, *,
                        step_mult, max_log_scale: float = NOMINAL_MAX_LOG_SCALE,
                        residual_clip: float = NOMINAL_RESIDUAL_CLIP) -> jax.Array:
  """`-(adam + clip(correction)) * exp(clip(log_scale)) * step_mult`.

  Both clips bound how far a learned optimizer can stray from Adam, whatever its
  meta-parameters: per coordinate at most (1 + residual_clip) * e^max_log_scale *
  step_mult.
  """
  d = jnp.clip(correction, -residual_clip, residual_clip)
  scale = jnp.exp(jnp.clip(log_scale, -max_log_scale, max_log_scale))
  return -(adam + d) * scale * step_mult


@dataclasses.dataclass(frozen=True)
class AdamNominal(Nominal):
  """Adam at the optimizer's `step_mult` (Kingma & Ba 2015): `adam_direction` reads the
  feature state (the "adam" feature group), so it keeps no state of its own."""

  kind: ClassVar[str] = "adam"
  required_features: ClassVar[tuple[str, ...]] = ("adam",)

  def leaf_update(self, values, inputs, i, correction, log_scale, *, step_mult,
                  max_log_scale, residual_clip):
    del values
    return nominal_adam_update(adam_direction(inputs.spec, inputs.fstate, i), correction,
                               log_scale, step_mult=step_mult, max_log_scale=max_log_scale,
                               residual_clip=residual_clip)


@dataclasses.dataclass(frozen=True)
class AdamHDNominal(Nominal):
  """Adam with per-tensor learning rates adapted by hypergradient descent.

  `learned_opt.baselines.adam_hd` at the optimizer's `step_mult`: each tensor's log
  learning rate moves by `rate * cos(g_t, m_{t-1})` within +-`max_log_lr`. The LSTM
  reads that cosine and the log rate before this step's move (2 tensor inputs); the
  learned log factor stays within e^+-max_log_scale of the rate, and their product
  within the rate's own bound: a factor that compounds with a rate already at its
  ceiling diverges on long full-batch runs.

  Attributes:
    rate: change of the log learning rate per step at cosine 1.
    max_log_lr: the learning-rate factor stays within [e^-max_log_lr, e^max_log_lr].
    rate_max_log_scale: if > 0, one more head output sets each tensor's rate within
      e^+-this of `rate`, so the learned part steers how fast rates adapt; 0 keeps
      the rate fixed.
  """

  kind: ClassVar[str] = "adam_hd"
  required_features: ClassVar[tuple[str, ...]] = ("adam",)
  keeps_state: ClassVar[bool] = True
  num_tensor_inputs: ClassVar[int] = 2
  legacy_keys: ClassVar[dict[str, str]] = {
      "hypergradient_rate": "rate", "hypergradient_max_log_lr": "max_log_lr",
      "hypergradient_rate_max_log_scale": "rate_max_log_scale"}
  rate: float = hd.DEFAULT_RATE
  max_log_lr: float = hd.DEFAULT_MAX_LOG_LR
  rate_max_log_scale: float = 0.0

  def __post_init__(self):
    for name in ("rate", "max_log_lr", "rate_max_log_scale"):
      check_positive(name, getattr(self, name), allow_zero=True)

  @property
  def num_head_outputs(self) -> int:
    return int(self.rate_max_log_scale > 0)

  def compute_options(self, spec):
    # The cosine (gradient vs Adam's momentum from before this step) comes from the
    # features' pass over memory.
    return {"cosine_momentum": adam_momentum_index(spec)}

  def init(self, params):
    return (jnp.zeros((len(params),), jnp.float32),)

  def tensor_inputs(self, state, inputs):
    cos = hd.cosine_from_sums(*inputs.features.momentum_sums.T)
    # The rate before this step's move, which the LSTM may steer.
    return [jnp.where(jnp.isfinite(cos), cos, 0.0)[:, None], state[0][:, None]], cos

  def advance(self, state, inputs, head, carry):
    rate = self.rate
    if self.rate_max_log_scale > 0:
      r = self.rate_max_log_scale
      rate = rate * jnp.exp(jnp.clip(head[:, 0], -r, r))
    log_lr = hd.next_log_lr(state[0], carry, rate=rate, max_log_lr=self.max_log_lr)
    return log_lr, (log_lr,)

  def leaf_update(self, values, inputs, i, correction, log_scale, *, step_mult,
                  max_log_scale, residual_clip):
    cap = self.max_log_lr
    total = jnp.clip(values[i] + jnp.clip(log_scale, -max_log_scale, max_log_scale), -cap, cap)
    return nominal_adam_update(adam_direction(inputs.spec, inputs.fstate, i), correction,
                               total, step_mult=step_mult, max_log_scale=cap,
                               residual_clip=residual_clip)


# Prodigy (Mishchenko & Defazio 2024) estimates its own step size from the distance
# travelled from the initial point, so it needs no learning rate; as a nominal it gives a
# learned optimizer a step size that is right to a small factor on tasks whose best Adam
# learning rate is far from the meta-training tasks'. The betas are explicit because
# `prodigy_step_size` reproduces optax's step size from its state.
PRODIGY_BETAS = (0.9, 0.999)


def prodigy_nominal() -> optax.GradientTransformation:
  """optax's Prodigy at learning rate 1 (its own default): the transform `ProdigyNominal`
  runs and corrects."""
  return optax.contrib.prodigy(1.0, betas=PRODIGY_BETAS)


def prodigy_step_size(state) -> jax.Array:
  """The scalar step size d * bias correction that optax's Prodigy applies in the update
  that follows `state` (`update = -step * m / (sqrt(v) + d * eps)`)."""
  b1, b2 = PRODIGY_BETAS
  t = state.count.astype(jnp.float32) + 1.0
  return state.estim_lr * jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)


def nominal_prodigy_update(prodigy_update: jax.Array, correction: jax.Array,
                           log_scale: jax.Array, *, step: jax.Array,
                           max_log_scale: float = NOMINAL_MAX_LOG_SCALE,
                           residual_clip: float = NOMINAL_RESIDUAL_CLIP) -> jax.Array:
  """`(prodigy_update - clip(correction) * step) * exp(clip(log_scale))`: Prodigy's update
  plus a bounded correction in units of its step size, scaled by a bounded factor."""
  d = jnp.clip(correction, -residual_clip, residual_clip)
  scale = jnp.exp(jnp.clip(log_scale, -max_log_scale, max_log_scale))
  return (prodigy_update - d * step) * scale


@dataclasses.dataclass(frozen=True)
class ProdigyNominal(Nominal):
  """optax's Prodigy at learning rate 1: learning-rate free, so `step_mult` is unused.

  The update is `(prodigy - d * step) * exp(log_scale)` with `step` Prodigy's own step
  size, so the learned factor is relative to Prodigy's estimate. The state is
  `(optax's ProdigyState,)` over the list of parameter leaves (a list is a pytree: no
  tree is rebuilt per step).
  """

  kind: ClassVar[str] = "prodigy"
  keeps_state: ClassVar[bool] = True

  def init(self, params):
    return (prodigy_nominal().init(list(params)),)

  def advance(self, state, inputs, head, carry):
    del head, carry
    (pstate,) = state
    step = prodigy_step_size(pstate)  # the step of the update below, from the old state
    grads = [sanitize(g) for g in inputs.grads]
    updates, pstate = prodigy_nominal().update(grads, pstate, list(inputs.params))
    return (updates, step), (pstate,)

  def leaf_update(self, values, inputs, i, correction, log_scale, *, step_mult,
                  max_log_scale, residual_clip):
    del inputs, step_mult
    updates, step = values
    return nominal_prodigy_update(updates[i], correction, log_scale, step=step,
                                  max_log_scale=max_log_scale, residual_clip=residual_clip)


# The one name -> class table: configs, checkpoint headers and legacy strings resolve here.
NOMINALS: dict[str, type[Nominal]] = {
    cls.kind: cls for cls in (AdamNominal, AdamHDNominal, ProdigyNominal)}


def register_nominal(cls: type[Nominal]) -> type[Nominal]:
  """Adds a user-defined nominal to `NOMINALS` (usable as a class decorator), so
  optimizers using it round-trip through `config()` and checkpoints; returns `cls`."""
  check_class(cls)
  if NOMINALS.get(cls.kind, cls) is not cls:
    raise ValueError(f"nominal kind {cls.kind!r} is already registered for "
                     f"{NOMINALS[cls.kind].__qualname__}")
  NOMINALS[cls.kind] = cls
  return cls


def _from_dict(value: dict) -> Nominal:
  kind = value.get("kind")
  if kind not in NOMINALS:
    raise ValueError(f"nominal config {value!r} has kind {kind!r}; expected one of "
                     f"{tuple(NOMINALS)}")
  fields = {f.name for f in dataclasses.fields(NOMINALS[kind])}
  if set(value) - fields - {"kind"}:
    raise ValueError(f"nominal config for kind {kind!r} has unknown keys "
                     f"{sorted(set(value) - fields - {'kind'})}; expected {sorted(fields)}")
  # JSON has no tuples; fields must hash.
  return NOMINALS[kind](**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in value.items() if k != "kind"})


def _fold_legacy(nominal: Optional[Nominal], given, legacy: dict[str, Any]) -> Optional[Nominal]:
  for key, value in legacy.items():
    if value is None:
      continue
    owner = next(c for c in NOMINALS.values() if key in c.legacy_keys)
    field = owner.legacy_keys[key]
    default = next(f.default for f in dataclasses.fields(owner) if f.name == field)
    if not isinstance(nominal, owner):
      # Old configs wrote every flat key, defaults included: only a value that would be
      # silently dropped is an error.
      if value != default:
        raise ValueError(f"{key} needs nominal={owner.kind!r}, got nominal={given!r}")
      continue
    current = getattr(nominal, field)
    if current not in (default, value):
      raise ValueError(f"{key}={value!r} conflicts with nominal={nominal!r}; give "
                       f"{owner.__name__}.{field} once")
    try:
      nominal = dataclasses.replace(nominal, **{field: value})
    except ValueError as e:
      raise ValueError(f"{key}={value!r} ({owner.__name__}.{field}): {e}") from e
  return nominal


def resolve(value, *, legacy: Optional[dict[str, Any]] = None) -> Optional[Nominal]:
  """The `Nominal` (or None) that an optimizer's `nominal` argument names.

  Args:
    value: None or "none" (no nominal), a name in `NOMINALS` (its defaults), a
      `config()` dict (`{"kind": ..., **fields}`, as in checkpoint headers) or a
      `Nominal` instance (returned as is).
    legacy: old flat optimizer keys (e.g. `hypergradient_rate`, each a key of some
      `Nominal.legacy_keys`) -> value, or None if not given; folded into that nominal.

  Raises:
    ValueError: `value` names no nominal, or a legacy key's value needs another nominal.
    TypeError: a `Nominal` that is not a frozen dataclass.
  """
  if value is None or value == "none":
    nominal = None
  elif isinstance(value, Nominal):
    check_class(type(value))
    nominal = value
  elif isinstance(value, str) and value in NOMINALS:
    nominal = NOMINALS[value]()
  elif isinstance(value, dict):
    nominal = _from_dict(value)
  else:
    raise ValueError(f"nominal must be one of {('none',) + tuple(NOMINALS)}, a config dict "
                     f"with 'kind', a learned_opt.nominals.Nominal or None, got {value!r}")
  return _fold_legacy(nominal, value, legacy or {})


def check(nominal: Optional[Nominal], features, fused: str) -> None:
  """Validates a resolved `nominal` against the feature selection and the fused mode."""
  if nominal is None:
    return
  for group in nominal.required_features:
    if group not in features:
      raise ValueError(f"nominal={nominal!r} needs the {group!r} feature group; features "
                       f"are {tuple(features)}")
  if fused in ("pallas", "interpret"):
    raise ValueError(f"nominal={nominal!r} runs on the XLA path; got fused={fused!r} "
                     "(use 'auto' or 'xla')")
