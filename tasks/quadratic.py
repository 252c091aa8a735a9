"""Noisy quadratic problems with controlled conditioning.

f(x) = 1/2 (x - x* - n)^T A (x - x* - n), A = Q diag(lambda) Q^T with eigenvalues
log-spaced between 1 and the sampled condition number, Q a random rotation, and n
minibatch noise (so gradients are stochastic, like a real task's).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.tasks import base


@struct.dataclass
class QuadraticCfg:
  eigenvalues: jax.Array   # [dim]
  rotation: jax.Array      # [dim, dim], orthogonal
  optimum: jax.Array       # [dim]
  noise_scale: jax.Array   # []
  init_scale: jax.Array    # []


class QuadraticFamily(base.TaskFamily):
  """Quadratics in `dim` dimensions; log10 condition number sampled in a range.

  Attributes:
    dim: problem dimension (static).
    log10_cond_range: the sampled log10 condition number of A.
    noise_range: range of the minibatch noise scale (0 gives exact gradients).
    rotate: rotate the eigenbasis (False keeps A diagonal, axis-aligned).
  """

  dim: int = struct.field(pytree_node=False, default=32)
  log10_cond_range: tuple[float, float] = struct.field(pytree_node=False, default=(0.0, 3.0))
  noise_range: tuple[float, float] = struct.field(pytree_node=False, default=(0.0, 0.1))
  rotate: bool = struct.field(pytree_node=False, default=True)

  def _cfg(self, log10_cond, key, noise_scale, init_scale) -> QuadraticCfg:
    k_rot, k_opt = jax.random.split(key)
    eig = jnp.logspace(0.0, 1.0, self.dim) ** log10_cond
    eig = eig / jnp.mean(eig)
    if self.rotate:
      q, r = jnp.linalg.qr(jax.random.normal(k_rot, (self.dim, self.dim)))
      rotation = q * jnp.sign(jnp.diag(r))
    else:
      rotation = jnp.eye(self.dim)
    optimum = jax.random.normal(k_opt, (self.dim,))
    return QuadraticCfg(eig, rotation, optimum, jnp.asarray(noise_scale, jnp.float32),
                        jnp.asarray(init_scale, jnp.float32))

  def sample(self, key):
    k_cond, k_noise, k_init, k_rest = jax.random.split(key, 4)
    log10_cond = jax.random.uniform(k_cond, (), minval=self.log10_cond_range[0],
                                    maxval=self.log10_cond_range[1])
    noise = jax.random.uniform(k_noise, (), minval=self.noise_range[0], maxval=self.noise_range[1])
    init_scale = jnp.exp(jax.random.uniform(k_init, (), minval=jnp.log(0.5), maxval=jnp.log(2.0)))
    return self._cfg(log10_cond, k_rest, noise, init_scale)

  def default_cfg(self):
    mid = 0.5 * (self.log10_cond_range[0] + self.log10_cond_range[1])
    return self._cfg(jnp.asarray(mid), jax.random.key(0), self.noise_range[0], 1.0)

  def init_params(self, cfg, key):
    return {"x": cfg.init_scale * jax.random.normal(key, (self.dim,))}

  def loss(self, cfg, params, key, batch):
    del key
    delta = params["x"] - cfg.optimum - batch["noise"]
    z = cfg.rotation.T @ delta
    return 0.5 * jnp.sum(cfg.eigenvalues * z * z)

  def batch(self, cfg, key, split="train"):
    del split
    return {"noise": cfg.noise_scale * jax.random.normal(key, (self.dim,))}

  def full_batch(self, cfg, split="train"):
    del split
    return {"noise": jnp.zeros((self.dim,))}

  def reference_loss(self, cfg):
    # E[f(x0)] with x0 ~ N(0, s^2 I), x* ~ N(0, I) and mean(eig) = 1.
    return 0.5 * self.dim * (1.0 + cfg.init_scale**2)

  @property
  def name(self):
    return f"quadratic_{self.dim}d"
