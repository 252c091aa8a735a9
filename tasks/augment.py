"""Task augmentation: a family whose parameters are randomly rescaled, per tensor.

`ParamScaleFamily(base, scale_range)` trains `phi` where the base model sees `theta =
s * phi`, with one scale `s` per parameter tensor drawn log-uniformly from
`scale_range` per task. The loss landscape is the base task's, but the optimizer sees
parameters scaled by 1/s and gradients scaled by s, so the best Adam learning rate of a
tensor moves by the factor 1/s. A learned optimizer meta-trained on such tasks cannot
rely on one learning rate; it has to read the right step size of each tensor off its
features (parameter and gradient scales, loss progress). This is the "reparameterized
weights" task augmentation of Metz et al. (2022, "VeLO") and learned_optimization.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.tasks.base import TaskFamily


class ParamScaleFamily(TaskFamily):
  """`base` with every parameter tensor reparameterized as `theta = s * phi`.

  Attributes:
    base: the family to augment.
    scale_range: (low, high), 0 < low <= high: the log-uniform range of each tensor's s
      (low == high: one fixed scale, as the safeguard suite's rescaled tasks use).
  """

  base: TaskFamily
  scale_range: tuple[float, float] = struct.field(pytree_node=False, default=(0.1, 10.0))

  def __post_init__(self):
    low, high = self.scale_range
    if not (0.0 < low <= high):
      raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, "
                       f"got {self.scale_range!r}")

  def _num_tensors(self, base_cfg) -> int:
    shapes = jax.eval_shape(self.base.init_params, base_cfg, jax.random.key(0))
    return len(jax.tree.leaves(shapes))

  def sample(self, key):
    k_base, k_scale = jax.random.split(key)
    base_cfg = self.base.sample(k_base)
    low, high = self.scale_range
    log_s = jax.random.uniform(k_scale, (self._num_tensors(base_cfg),),
                               minval=jnp.log(low), maxval=jnp.log(high))
    return {"base": base_cfg, "scales": jnp.exp(log_s)}

  def default_cfg(self):
    """The base's default config at the range's geometric mean scale (1 for a range
    symmetric around 1; the scale itself for a one-point range)."""
    base_cfg = self.base.default_cfg()
    mid = (self.scale_range[0] * self.scale_range[1]) ** 0.5
    return {"base": base_cfg, "scales": jnp.full((self._num_tensors(base_cfg),), mid, jnp.float32)}

  def _theta(self, cfg, phi):
    leaves, treedef = jax.tree.flatten(phi)
    if len(leaves) != cfg["scales"].shape[0]:
      raise ValueError(f"params have {len(leaves)} tensors but the task config scales "
                       f"{cfg['scales'].shape[0]}")
    return jax.tree.unflatten(treedef, [x * s.astype(x.dtype) for x, s in zip(leaves, cfg["scales"])])

  def init_params(self, cfg, key):
    theta = self.base.init_params(cfg["base"], key)
    leaves, treedef = jax.tree.flatten(theta)
    return jax.tree.unflatten(treedef, [x / s.astype(x.dtype) for x, s in zip(leaves, cfg["scales"])])

  def loss(self, cfg, params, key, batch):
    return self.base.loss(cfg["base"], self._theta(cfg, params), key, batch)

  def batch(self, cfg, key, split="train"):
    return self.base.batch(cfg["base"], key, split)

  def full_batch(self, cfg, split="train"):
    return self.base.full_batch(cfg["base"], split)

  def reference_loss(self, cfg):
    return self.base.reference_loss(cfg["base"])

  def metrics(self, cfg, params, batch):
    return self.base.metrics(cfg["base"], self._theta(cfg, params), batch)

  @property
  def name(self):
    return f"{self.base.name}_pscale"


class FullBatchFamily(TaskFamily):
  """`base` trained on its deterministic full batch at every step (no gradient noise).

  Meta-training on these next to the minibatch originals shows a learned optimizer
  tasks whose best step size is larger (exact gradients tolerate it), which held-out
  full-batch tasks need.
  """

  base: TaskFamily

  def sample(self, key):
    return self.base.sample(key)

  def default_cfg(self):
    return self.base.default_cfg()

  def init_params(self, cfg, key):
    return self.base.init_params(cfg, key)

  def loss(self, cfg, params, key, batch):
    return self.base.loss(cfg, params, key, batch)

  def batch(self, cfg, key, split="train"):
    del key
    return self.base.full_batch(cfg, split)

  def full_batch(self, cfg, split="train"):
    return self.base.full_batch(cfg, split)

  def reference_loss(self, cfg):
    return self.base.reference_loss(cfg)

  def metrics(self, cfg, params, batch):
    return self.base.metrics(cfg, params, batch)

  @property
  def name(self):
    return f"{self.base.name}_fullbatch"
