"""Truncation schedules: how many inner steps each task lives before it is reset.

A schedule samples a task's horizon (its total number of inner steps) when the task
starts. Meta-training unrolls each task `unroll_length` steps at a time (a
truncation); a task reaching its horizon is reset to a freshly sampled task.

The first life of every task in a pool is shortened by a random offset (uniform in
[unroll_length, horizon]) so that tasks do not all reset in lock-step: a pool that
resets together sees only early-training states in some outer steps and only late ones
in others, which biases truncated estimators (Vicol et al., 2021, "Unbiased Gradient
Estimation in Unrolled Computation Graphs with Persistent Evolution Strategies").
"""
from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
from flax import struct


class TruncationSchedule(struct.PyTreeNode, abc.ABC):
  """Samples inner-training horizons (abstract). Subclasses are frozen, all-static."""

  @abc.abstractmethod
  def sample_horizon(self, key: jax.Array) -> jax.Array:
    """An int32 scalar: the number of inner steps of a newly started task."""

  @property
  @abc.abstractmethod
  def min_horizon(self) -> int:
    """The shortest horizon this schedule can sample."""

  @property
  @abc.abstractmethod
  def max_horizon(self) -> int:
    """The longest horizon this schedule can sample."""

  def first_horizon(self, key: jax.Array, unroll_length: int) -> jax.Array:
    """The horizon of a pool task's first life: a random part of a sampled horizon.

    Uniform in [min(unroll_length, h), h] for a sampled horizon h, so first resets are
    spread over the whole horizon while a first life still spans a full truncation.
    """
    k_h, k_off = jax.random.split(key)
    horizon = self.sample_horizon(k_h)
    low = jnp.minimum(unroll_length, horizon)
    return jax.random.randint(k_off, (), low, horizon + 1).astype(jnp.int32)

  def check(self, unroll_length: int) -> None:
    """Raises ValueError if a truncation of `unroll_length` steps cannot fit a task."""
    if unroll_length < 1:
      raise ValueError(f"unroll_length must be >= 1, got {unroll_length}")
    if self.min_horizon < unroll_length:
      # A task shorter than a truncation would reset twice in one unroll; the engine
      # prepares one fresh task per truncation, so this is refused up front.
      raise ValueError(
          f"the truncation schedule's shortest horizon ({self.min_horizon}) is below "
          f"unroll_length ({unroll_length}); expected min horizon >= unroll_length")


class ConstantTruncation(TruncationSchedule):
  """Every task runs exactly `horizon` inner steps.

  Attributes:
    horizon: inner steps per task.
  """
  horizon: int = struct.field(pytree_node=False, default=200)

  def __post_init__(self):
    if not isinstance(self.horizon, int) or self.horizon < 1:
      raise ValueError(f"ConstantTruncation.horizon must be a positive int, got {self.horizon!r}")

  def sample_horizon(self, key):
    del key
    return jnp.asarray(self.horizon, jnp.int32)

  @property
  def min_horizon(self):
    return self.horizon

  @property
  def max_horizon(self):
    return self.horizon


class LogUniformTruncation(TruncationSchedule):
  """Horizons log-uniform in [min_length, max_length] (both included).

  Mixing short and long tasks teaches an optimizer to use its training-fraction input
  instead of assuming one horizon (Metz et al., 2022, "VeLO", Sec. 4).

  Attributes:
    min_length: shortest horizon.
    max_length: longest horizon.
  """
  min_length: int = struct.field(pytree_node=False, default=50)
  max_length: int = struct.field(pytree_node=False, default=500)

  def __post_init__(self):
    if not (isinstance(self.min_length, int) and isinstance(self.max_length, int)
            and 1 <= self.min_length <= self.max_length):
      raise ValueError("LogUniformTruncation expects ints 1 <= min_length <= max_length, got "
                       f"min_length={self.min_length!r}, max_length={self.max_length!r}")

  def sample_horizon(self, key):
    u = jax.random.uniform(key, (), minval=math.log(self.min_length),
                           maxval=math.log(self.max_length + 1))
    return jnp.clip(jnp.floor(jnp.exp(u)), self.min_length, self.max_length).astype(jnp.int32)

  @property
  def min_horizon(self):
    return self.min_length

  @property
  def max_horizon(self):
    return self.max_length
