"""The learned-optimizer contract: `LearnedOptimizer`, and `LearnedLR`, the simplest one.

A learned optimizer is an update rule `update(theta, grads, state, params)` whose weights
`theta` (the *meta-parameters*) meta-training learns. Architectures are frozen
`flax.struct` dataclasses whose configuration lives in static (hashable) fields, so an
instance passes through `jax.jit` / `jax.vmap` as a value and one compiled function
serves every instance with an equal config; meta-parameters and optimizer states are
plain pytrees of arrays (dicts, NamedTuples or `flax.struct` dataclasses).

Updates are additive, as in optax: `new_params = optax.apply_updates(params, updates)`.
`learned_opt.to_optax` turns any `LearnedOptimizer` plus meta-parameters into an
`optax.GradientTransformationExtraArgs`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

MetaParams = Any
OptState = Any
Params = Any
Updates = Any


class LearnedOptimizer(struct.PyTreeNode, abc.ABC):
  """Abstract learned optimizer. Subclasses are frozen `flax.struct` dataclasses.

  Every config field of a subclass must be declared with
  `struct.field(pytree_node=False)` and hold a JSON-able, hashable value (numbers,
  strings, bools, tuples of those), so that `config()` / `from_config()` round-trip
  through a checkpoint header and two instances with equal configs share one jit cache
  entry.

  Subclasses set `name` (the architecture name written to checkpoints) and implement:

    init_meta_params(key) -> theta
    init(theta, params, *, num_steps=None) -> state        (state holds a step counter)
    update(theta, grads, state, params, *, loss=None, key=None, value_fn=None)
        -> (updates, new_state)

  `num_steps` (the training horizon) may be a Python int or a traced int32 scalar (the
  meta-training engine vmaps `init` over tasks with different horizons); optimizers that
  need no horizon accept `None`. `loss` is the scalar training loss at `params` (a
  traced array), `key` a PRNG key for stochastic optimizers, `value_fn(params) -> loss`
  an optional closure for features that evaluate the loss elsewhere.
  """

  name: ClassVar[str] = ""

  @abc.abstractmethod
  def init_meta_params(self, key: jax.Array) -> MetaParams:
    """Initial meta-parameters: a pytree (nested dicts) of float32 arrays."""

  @abc.abstractmethod
  def init(self, meta_params: MetaParams, params: Params, *, num_steps=None) -> OptState:
    """Optimizer state for `params` (float32, whatever the params' dtype)."""

  @abc.abstractmethod
  def update(self, meta_params: MetaParams, grads: Updates, state: OptState, params: Params, *,
             loss: Optional[jax.Array] = None, key: Optional[jax.Array] = None,
             value_fn: Optional[Callable[[Params], jax.Array]] = None) -> tuple[Updates, OptState]:
    """One step: additive updates shaped (and typed) like `params`, and the new state."""

  def feature_names(self) -> tuple[str, ...]:
    """Names of the input features in the order the network reads them (for headers)."""
    return ()

  @property
  def needs_value_fn(self) -> bool:
    """Whether `update` reads `value_fn` (the "saferate" feature): training loops then
    pass the loss on the step's batch as a function of the params."""
    spec = getattr(self, "spec", None)
    return spec is not None and "saferate" in spec.features

  def config(self) -> dict[str, Any]:
    """The static config as a JSON-able dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = _to_json(value)
    return out

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> "LearnedOptimizer":
    """Rebuilds an instance from `config()`; unknown keys raise `ValueError`."""
    if not isinstance(config, dict):
      raise ValueError(f"{cls.__name__} config must be a dict, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"{cls.__name__} config has unknown keys {unknown}; expected a subset "
                       f"of {sorted(known)}")
    return cls(**{k: _from_json(v) for k, v in config.items()})


def _to_json(value):
  if isinstance(value, (tuple, list)):
    return [_to_json(v) for v in value]
  return value


def _from_json(value):
  # JSON has no tuples; static fields must be hashable, so lists come back as tuples.
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  return value


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  """Raises `ValueError` naming `name` if `value` is not a positive (or >= 0) number."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def to_float32(tree):
  """Casts every leaf to float32: learned optimizers compute and keep state in float32."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# Squares of gradient entries must stay finite in float32 (max ~3e38): entries are
# clipped to +-1e12 and NaNs read as 0, so one bad coordinate never poisons a tensor.
GRAD_BOUND = 1e12


def sanitize(g: jax.Array) -> jax.Array:
  """float32 gradient with NaN -> 0 and entries clipped to +-GRAD_BOUND."""
  g = jnp.asarray(g, jnp.float32)
  # One compare and select (clip already maps +-inf to +-GRAD_BOUND): this runs inside
  # every per-coordinate loop of the learned optimizers.
  return jnp.where(jnp.isnan(g), 0.0, jnp.clip(g, -GRAD_BOUND, GRAD_BOUND))


def cast_like(updates, params):
  """Casts each update leaf to the dtype of the matching parameter (e.g. bfloat16)."""
  return jax.tree.map(lambda u, p: u.astype(jnp.asarray(p).dtype), updates, params)


def horizon_array(num_steps, *, required: bool, who: str) -> jax.Array:
  """The training horizon as a float32 scalar; `inf` when absent and not required."""
  if num_steps is None:
    if required:
      raise ValueError(f"{who} needs num_steps (the training horizon) because a selected "
                       "feature depends on the training fraction; got num_steps=None")
    return jnp.asarray(jnp.inf, jnp.float32)
  if isinstance(num_steps, (int, float)) and not isinstance(num_steps, bool) and num_steps <= 0:
    raise ValueError(f"num_steps must be a positive number of steps, got {num_steps!r}")
  return jnp.asarray(num_steps, jnp.float32)


class LearnedLRState(NamedTuple):
  """State of `LearnedLR`: step counter and Adam moments (empty tuples for SGD)."""
  step: jax.Array  # int32 []
  mu: Any
  nu: Any


class LearnedLR(LearnedOptimizer):
  """SGD or Adam whose only meta-parameter is the log step size.

  `update = -exp(theta["log_lr"]) * d`, with `d` the gradient (`direction="sgd"`) or the
  bias-corrected Adam direction `m_hat / (sqrt(v_hat) + eps)` (`direction="adam"`,
  Kingma & Ba 2015). The meta-gradient is known in closed form (`d update / d theta =
  update`), which makes this the reference optimizer for gradient-estimator tests.

  Attributes:
    init_lr: initial step size, `theta["log_lr"] = log(init_lr)`.
    direction: "sgd" or "adam".
    b1, b2, eps: Adam's decays and epsilon (ignored for "sgd").
  """

  name: ClassVar[str] = "learned_lr"
  init_lr: float = struct.field(pytree_node=False, default=0.01)
  direction: str = struct.field(pytree_node=False, default="sgd")
  b1: float = struct.field(pytree_node=False, default=0.9)
  b2: float = struct.field(pytree_node=False, default=0.999)
  eps: float = struct.field(pytree_node=False, default=1e-8)

  def __post_init__(self):
    check_positive("init_lr", self.init_lr)
    if self.direction not in ("sgd", "adam"):
      raise ValueError(f"direction must be 'sgd' or 'adam', got {self.direction!r}")

  def init_meta_params(self, key):
    del key
    return {"log_lr": jnp.log(jnp.asarray(self.init_lr, jnp.float32))}

  def init(self, meta_params, params, *, num_steps=None):
    del meta_params, num_steps
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    if self.direction == "sgd":
      return LearnedLRState(jnp.zeros((), jnp.int32), (), ())
    return LearnedLRState(jnp.zeros((), jnp.int32), zeros(), zeros())

  def update(self, meta_params, grads, state, params, *, loss=None, key=None, value_fn=None):
    del loss, key, value_fn
    lr = jnp.exp(meta_params["log_lr"])
    g = jax.tree.map(sanitize, grads)
    step = state.step + 1
    if self.direction == "sgd":
      d, mu, nu = g, (), ()
    else:
      mu = optax.tree.update_moment(g, state.mu, self.b1, 1)
      nu = optax.tree.update_moment_per_elem_norm(g, state.nu, self.b2, 2)
      mu_hat = optax.tree.bias_correction(mu, self.b1, step)
      nu_hat = optax.tree.bias_correction(nu, self.b2, step)
      d = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + self.eps), mu_hat, nu_hat)
    updates = jax.tree.map(lambda x: -lr * x, d)
    return cast_like(updates, params), LearnedLRState(step, mu, nu)


# Bound on the log-magnitude of an update multiplier: exp(+-40) keeps every update finite
# in float32 even when a network's output blows up on extreme inputs.
MAX_LOG_SCALE = 40.0


def magnitude_update(direction: jax.Array, magnitude: jax.Array, *, exp_mult: float,
                     step_mult) -> jax.Array:
  """`direction * exp(exp_mult * magnitude) * step_mult`, the update rule of Metz et al.

  (2022, "Practical tradeoffs between memory, compute, and performance in learned
  optimizers"): the network outputs a direction and a log-magnitude per parameter; the
  small `exp_mult` keeps initial magnitudes near 1. The exponent is clipped to +-40.
  """
  log_scale = jnp.clip(exp_mult * magnitude, -MAX_LOG_SCALE, MAX_LOG_SCALE)
  return direction * jnp.exp(log_scale) * step_mult


# nominal="adam" (PerParamMLP, HierarchicalLOpt): a learned optimizer that corrects Adam;
# nominal="prodigy" (HierarchicalLOpt): one that corrects Prodigy (see `prodigy_nominal`);
# nominal="adam_hd" (HierarchicalLOpt): one that corrects Adam with hypergradient-adapted
# per-tensor learning rates (`learned_opt.baselines.adam_hd`).
NOMINALS = ("none", "adam", "prodigy", "adam_hd")
NOMINAL_RESIDUAL_CLIP = 3.0     # |learned correction| <= this, in units of Adam's direction
NOMINAL_MAX_LOG_SCALE = 4.0     # learned step-size factor within [e^-4, e^4]
NOMINAL_OUT_INIT = 0.01         # output weights start this small: untrained == Adam
_ADAM_EPS = 1e-8


def check_nominal(nominal: str, features, fused: str, *, allowed=NOMINALS) -> None:
  """Validates a `nominal` setting against the feature selection and the fused mode."""
  if nominal not in allowed:
    raise ValueError(f"nominal must be one of {allowed}, got {nominal!r}")
  if nominal in ("adam", "adam_hd") and "adam" not in features:
    raise ValueError(f"nominal={nominal!r} needs the 'adam' feature group; features are "
                     f"{tuple(features)}")
  if nominal != "none" and fused in ("pallas", "interpret"):
    raise ValueError(f"nominal={nominal!r} runs on the XLA path; got fused={fused!r} "
                     f"(use 'auto' or 'xla')")


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
  from learned_opt import feature_state  # local: it imports this module
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


# Prodigy (Mishchenko & Defazio 2024) estimates its own step size from the distance
# travelled from the initial point, so it needs no learning rate; as a nominal it gives a
# learned optimizer a step size that is right to a small factor on tasks whose best Adam
# learning rate is far from the meta-training tasks'. The betas are explicit because
# `prodigy_step_size` reproduces optax's step size from its state.
PRODIGY_BETAS = (0.9, 0.999)


def prodigy_nominal():
  """optax's Prodigy at learning rate 1 (its own default): the transform a
  nominal="prodigy" optimizer runs and corrects."""
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
