"""The inner-problem protocol: `TaskFamily` (abstract) and `Task` (final).

A `TaskFamily` is a frozen pytree: its data arrays are leaves, its shape-defining
settings (maximum widths, sequence length, dataset name) are static fields. A family
samples a *task config*, a pytree of arrays (init scale, active width, activation id,
batch size, ...), so configs of one family stack and `jax.vmap` runs many tasks at
once. `family.task(cfg)` binds a config to the family; the resulting `Task` exposes
the four functions that every inner loop and meta-training needs.

Shape-changing hyperparameters (width, depth, batch size) are sampled too: the arrays
are allocated at the family's maximum and masked down to the sampled value, which is
what lets configs with different widths vmap together.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

Params = Any
Batch = Mapping[str, jax.Array]
TaskCfg = Any

# Upper bound of a normalized meta-loss; a diverged or NaN loss maps here.
NORMALIZED_LOSS_CAP = 4.0


class TaskFamily(struct.PyTreeNode, abc.ABC):
  """A distribution over inner problems of one kind.

  Subclasses are `flax.struct` dataclasses (frozen pytrees). They implement:
    sample(key) -> cfg            a pytree of arrays (vmappable over keys)
    default_cfg() -> cfg          a fixed, representative config
    init_params(cfg, key) -> params
    loss(cfg, params, key, batch) -> scalar
    batch(cfg, key, split) -> batch   sampled inside jit from in-memory arrays
    reference_loss(cfg) -> scalar  the loss scale used by the normalizer
  """

  @abc.abstractmethod
  def sample(self, key: jax.Array) -> TaskCfg:
    """Samples a task config: a pytree of arrays with static shapes."""

  @abc.abstractmethod
  def default_cfg(self) -> TaskCfg:
    """A fixed, representative task config (the family's named task)."""

  @abc.abstractmethod
  def init_params(self, cfg: TaskCfg, key: jax.Array) -> Params:
    """Initial parameters of the inner model."""

  @abc.abstractmethod
  def loss(self, cfg: TaskCfg, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
    """Scalar training loss of `params` on `batch`."""

  @abc.abstractmethod
  def batch(self, cfg: TaskCfg, key: jax.Array, split: str = "train") -> Batch:
    """A minibatch drawn inside jit from the family's in-memory arrays."""

  @abc.abstractmethod
  def reference_loss(self, cfg: TaskCfg) -> jax.Array:
    """A typical loss at initialization; normalization divides by it."""

  def full_batch(self, cfg: TaskCfg, split: str = "train") -> Batch:
    """The deterministic full batch used by full-batch training (SafeRate tests)."""
    raise NotImplementedError(f"{type(self).__name__} has no full-batch mode")

  def metrics(self, cfg: TaskCfg, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """Extra evaluation metrics (e.g. accuracy); loss is always reported by callers."""
    del cfg, params, batch
    return {}

  def task(self, cfg: TaskCfg | None = None) -> "Task":
    """Binds a config (default: `default_cfg()`) to this family."""
    return Task(family=self, cfg=self.default_cfg() if cfg is None else cfg)

  @property
  def name(self) -> str:
    return type(self).__name__


def normalize_loss(loss: jax.Array, reference: jax.Array, cap: float = NORMALIZED_LOSS_CAP) -> jax.Array:
  """Maps any loss, NaN and inf included, to a finite value in [0, cap].

  The loss is divided by the task's reference loss (its typical value at
  initialization), so tasks with different loss scales weigh alike in a meta-loss;
  anything non-finite or above `cap` reads as `cap` (a diverged run), so a meta-loss
  is always finite and bounded.
  """
  ratio = loss / jnp.maximum(reference, 1e-12)
  ratio = jnp.where(jnp.isfinite(ratio), ratio, cap)
  return jnp.clip(ratio, 0.0, cap)


class Task(struct.PyTreeNode):
  """One inner problem: a family plus a sampled config. Final; do not subclass."""

  family: TaskFamily
  cfg: TaskCfg

  def init(self, key: jax.Array) -> Params:
    return self.family.init_params(self.cfg, key)

  def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
    return self.family.loss(self.cfg, params, key, batch)

  def batch(self, key: jax.Array, split: str = "train") -> Batch:
    return self.family.batch(self.cfg, key, split)

  def full_batch(self, split: str = "train") -> Batch:
    return self.family.full_batch(self.cfg, split)

  def normalize(self, loss: jax.Array) -> jax.Array:
    return normalize_loss(loss, self.family.reference_loss(self.cfg))

  def metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
    return self.family.metrics(self.cfg, params, batch)

  @property
  def name(self) -> str:
    return self.family.name
