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
import inspect
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
  `struct.field(pytree_node=False)` and hold a hashable value that is JSON-able
  (numbers, strings, bools, None, tuples of those) or has a `config()` method returning
  a JSON dict that the constructor accepts back (e.g. a `learned_opt.nominals.Nominal`),
  so that `config()` / `from_config()` round-trip through a checkpoint header and two
  instances with equal configs share one jit cache entry. Keys that old configs wrote
  and that are no field any more are init-only arguments (`dataclasses.InitVar`) that
  `__post_init__` folds into the fields; `from_config` accepts them too.

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
  # True for optimizers that output a direction and take their step size from the user
  # (`direction(...)`, `to_optax(..., learning_rate=...)`); False: `update` is the step.
  takes_learning_rate: ClassVar[bool] = False

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

  def at_use(self) -> "LearnedOptimizer":
    """This optimizer without settings that only meta-training reads (itself here)."""
    return self

  def with_learning_rate(self, meta_params: MetaParams, learning_rate, *, num_steps=None,
                         seed: int = 0):
    """None, or the optax transform that `to_optax(..., learning_rate=...)` returns for an
    optimizer meta-trained inside a harness of its own (see `NormalizedMLP`)."""
    del meta_params, learning_rate, num_steps, seed
    return None

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
    """Rebuilds an instance from `config()` (or an older config: the constructor's
    init-only arguments are accepted); unknown keys raise `ValueError`."""
    if not isinstance(config, dict):
      raise ValueError(f"{cls.__name__} config must be a dict, got {type(config).__name__}")
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"{cls.__name__} config has unknown keys {unknown}; expected a subset "
                       f"of {sorted(known)}")
    return cls(**{k: _from_json(v) for k, v in config.items()})


def _to_json(value):
  if isinstance(value, (tuple, list)):
    return [_to_json(v) for v in value]
  to_config = getattr(value, "config", None)
  if callable(to_config):  # a config object, e.g. a nominal: {"kind": ..., **fields}
    return to_config()
  return value


def _from_json(value):
  # JSON has no tuples; static fields must be hashable, so lists come back as tuples
  # (dicts, the configs of config objects, are rebuilt by the constructor).
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
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
