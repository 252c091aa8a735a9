"""`PerParamLSTM`: a coordinate-wise LSTM learned optimizer.

Follows Andrychowicz et al. (2016, "Learning to learn by gradient descent by gradient
descent"): one small LSTM, shared by all coordinates, carries a hidden state per
parameter (kept in the optimizer state, `[*leaf.shape, hidden_size]` for h and c) and
reads that coordinate's normalized features each step. Its outputs, a direction and a
log-magnitude, are turned into an update as in `PerParamMLP`. The output layer also
reads the features directly (a linear skip), so simple rules such as SGD are exactly
representable and meta-training starts from a well-conditioned point.

The cell is written out here instead of using `flax.linen.OptimizedLSTMCell` because its
input splits into per-coordinate features and per-tensor/global features that enter
as a per-tensor bias (one small matmul per tensor instead of copying them into every
coordinate's input); flax's cells take one dense input.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt import features as feats
from learned_opt.base import (LearnedOptimizer, cast_like, check_positive, magnitude_update)

_init = jax.nn.initializers.lecun_normal()


class PerParamLSTMState(NamedTuple):
  """State of `PerParamLSTM`: feature accumulators and per-coordinate LSTM carries."""
  features: feats.FeatureState
  h: Any  # per leaf [*shape, hidden_size]
  c: Any  # per leaf [*shape, hidden_size]

  @property
  def step(self):
    return self.features.step


class PerParamLSTM(LearnedOptimizer):
  """Per-parameter LSTM learned optimizer.

  Attributes:
    hidden_size: LSTM width per coordinate (its state costs 2 * hidden_size floats per
      parameter).
    features, momentum_decays, rms_decay, loss_decays: feature selection, see
      `learned_opt.features`.
    exp_mult, step_mult: update = `d * exp(exp_mult * s) * step_mult`.
    weight_decay: decoupled weight decay; adds `-step_mult * weight_decay * param`.
    mup, mup_base_fan_in: muP width-transfer multiplier, see `features.mup_scale`.
  """

  name: ClassVar[str] = "per_param_lstm"
  hidden_size: int = struct.field(pytree_node=False, default=8)
  features: tuple = struct.field(pytree_node=False, default=(
      "grad", "clipped_grad", "param", "momentum", "rms", "adam", "step_embed"))
  momentum_decays: tuple = struct.field(pytree_node=False, default=(0.5, 0.9, 0.99))
  rms_decay: float = struct.field(pytree_node=False, default=0.999)
  loss_decays: tuple = struct.field(pytree_node=False, default=(0.9, 0.99))
  exp_mult: float = struct.field(pytree_node=False, default=0.001)
  step_mult: float = struct.field(pytree_node=False, default=0.001)
  weight_decay: float = struct.field(pytree_node=False, default=0.0)
  mup: bool = struct.field(pytree_node=False, default=False)
  mup_base_fan_in: int = struct.field(pytree_node=False, default=32)

  def __post_init__(self):
    if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
      raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
    check_positive("exp_mult", self.exp_mult)
    check_positive("step_mult", self.step_mult)
    check_positive("weight_decay", self.weight_decay, allow_zero=True)
    check_positive("mup_base_fan_in", self.mup_base_fan_in)
    self.spec  # validates the feature selection now

  @property
  def spec(self) -> feats.FeatureSpec:
    return feats.FeatureSpec(tuple(self.features), tuple(self.momentum_decays),
                             self.rms_decay, tuple(self.loss_decays))

  def feature_names(self):
    return self.spec.all_names()

  def init_meta_params(self, key):
    spec = self.spec
    n_p, n_t = len(spec.param_names()), len(spec.tensor_names())
    n_g = max(len(spec.global_names()), 1)
    h4 = 4 * self.hidden_size
    k = jax.random.split(key, 8)
    # Forget-gate bias +1 (Jozefowicz et al. 2015): carries persist from the start.
    b = jnp.zeros((h4,)).at[self.hidden_size:2 * self.hidden_size].set(1.0)
    theta = {
        "cell": {"w_param": _init(k[0], (n_p, h4)), "w_tensor": _init(k[1], (n_t, h4)) * 0.1,
                 "w_global": _init(k[2], (n_g, h4)), "w_h": _init(k[3], (self.hidden_size, h4)),
                 "b": b},
        "out": {"w_h": _init(k[4], (self.hidden_size, 2)), "w_param": _init(k[5], (n_p, 2)),
                "w_tensor": _init(k[6], (n_t, 2)) * 0.1, "w_global": _init(k[7], (n_g, 2)),
                "b": jnp.zeros((2,))},
    }
    return jax.tree.map(lambda x: x.astype(jnp.float32), theta)

  def init(self, meta_params, params, *, num_steps=None):
    del meta_params
    zeros = [jnp.zeros(jnp.shape(p) + (self.hidden_size,), jnp.float32)
             for p in jax.tree.leaves(params)]
    return PerParamLSTMState(feats.init_state(self.spec, params, num_steps), zeros,
                             [jnp.zeros_like(z) for z in zeros])

  def update(self, meta_params, grads, state, params, *, loss=None, key=None, value_fn=None):
    del key
    f, fstate = feats.compute(self.spec, grads, params, state.features, loss=loss,
                              value_fn=value_fn)
    cell, head = meta_params["cell"], meta_params["out"]
    glob = f.global_ if f.global_.shape[0] else jnp.zeros((1,))
    gate_bias = f.per_tensor @ cell["w_tensor"] + glob @ cell["w_global"] + cell["b"]
    out_bias = f.per_tensor @ head["w_tensor"] + glob @ head["w_global"] + head["b"]
    leaves, treedef = jax.tree.flatten(params)
    hs, cs, out = [], [], []
    for i, (p, h, c) in enumerate(zip(leaves, state.h, state.c)):
      # [N, F] and [N, H], flattened: see `PerParamMLP.update`.
      x = feats.stack_raw(f, i)
      inv = f.inv_rms[i][:, None]  # the per-tensor normalizers, folded into the weights
      h, c = h.reshape(x.shape[0], -1), c.reshape(x.shape[0], -1)
      z = x @ (inv * cell["w_param"]) + h @ cell["w_h"] + gate_bias[i]
      zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
      h = jax.nn.sigmoid(zo) * jnp.tanh(c)
      o = (h @ head["w_h"] + x @ (inv * head["w_param"]) + out_bias[i]).reshape(jnp.shape(p) + (2,))
      h, c = h.reshape(jnp.shape(p) + (-1,)), c.reshape(jnp.shape(p) + (-1,))
      u = magnitude_update(o[..., 0], o[..., 1], exp_mult=self.exp_mult, step_mult=self.step_mult)
      if self.weight_decay:
        u = u - self.step_mult * self.weight_decay * jnp.asarray(p, jnp.float32)
      if self.mup:
        u = u * feats.mup_scale(jnp.shape(p), base_fan_in=self.mup_base_fan_in)
      hs.append(h)
      cs.append(c)
      out.append(u)
    updates = jax.tree.unflatten(treedef, out)
    return cast_like(updates, params), PerParamLSTMState(fstate, hs, cs)
