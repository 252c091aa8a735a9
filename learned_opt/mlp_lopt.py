"""`PerParamMLP`: one small MLP applied to every coordinate of every tensor.

Follows the per-parameter MLP learned optimizer of Metz et al. (2022, "Practical
tradeoffs between memory, compute, and performance in learned optimizers"): each
coordinate's normalized features go through a shared MLP whose two outputs are a
direction `d` and a log-magnitude `s`; the update is `d * exp(exp_mult * s) * step_mult`.
Per-tensor features (log RMS of each channel) and global features (step, training
fraction, loss) are the same for every coordinate of a tensor, so instead of copying them
into every coordinate's input they enter the first layer as a per-tensor bias: same
function, a fraction of the memory traffic.

With a nominal (`learned_opt.nominals`, e.g. `nominal=AdamNominal()` or "adam") the
network instead corrects a hand-designed rule: with Adam the update is
`-(adam + d) * exp(s) * step_mult`, with Adam's bias-corrected direction m / sqrt(v),
`d` and `s` clipped, and both output weights initialized near zero, so an untrained
optimizer is Adam at `step_mult` and meta-training learns per-coordinate corrections
and step-size schedules around it. Learned optimizers built this way start from a
rule known to work on any task, which is what keeps them from diverging out of
distribution (the motivation of "nominal" terms in VeLO-style optimizers).
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt import features as feats
from learned_opt import fused as fused_lib
from learned_opt import nominals
from learned_opt.base import LearnedOptimizer, cast_like, check_positive, magnitude_update

_init = jax.nn.initializers.lecun_normal()


class PerParamMLPState(NamedTuple):
  """State of `PerParamMLP`: only the feature accumulators (step counter inside)."""
  features: feats.FeatureState

  @property
  def step(self):
    return self.features.step


class PerParamMLP(LearnedOptimizer):
  """Per-parameter MLP learned optimizer.

  Attributes:
    hidden_sizes: widths of the hidden layers (ReLU), shared by all parameters.
    features: selected feature groups, see `learned_opt.features`.
    momentum_decays: decays of the momentum / Adam-direction channels.
    rms_decay: decay of the second-moment (and Adafactor) accumulators.
    loss_decays: decays of the loss EMAs of the "loss" feature.
    exp_mult: `a` in `d * exp(a * s) * step_mult`.
    step_mult: global step size of the update.
    weight_decay: decoupled weight decay; adds `-step_mult * weight_decay * param`.
    mup: if True, multiply the update of every >=2-D tensor by `mup_base_fan_in /
      fan_in` (muP / muLO width transfer, see `features.mup_scale`).
    mup_base_fan_in: the fan-in at which the muP multiplier is 1 (the meta-training width).
    fused: per-parameter network path: "auto" (the fused Pallas kernel on GPU, XLA
      elsewhere), "xla", "pallas" (GPU only) or "interpret" (Pallas interpret mode, for
      tests); see `learned_opt.fused`.
    nominal: None (Metz et al.'s rule above) or a `learned_opt.nominals.Nominal` that
      keeps no state and needs no per-tensor network, e.g. `AdamNominal()`: the
      network's outputs correct Adam's direction (the momentum decay closest to 0.9,
      with `rms_decay`) and scale its step: `-(adam + clip(d)) * exp(clip(exp_mult *
      s)) * step_mult`, within the default trust region (`nominals.
      NOMINAL_RESIDUAL_CLIP`, `NOMINAL_MAX_LOG_SCALE`). Runs on the XLA path. The
      constructor also takes "none", the names in `nominals.NOMINALS` and
      `Nominal.config()` dicts.
  """

  name: ClassVar[str] = "per_param_mlp"
  hidden_sizes: tuple = struct.field(pytree_node=False, default=(32, 32))
  features: tuple = struct.field(pytree_node=False, default=(
      "grad", "clipped_grad", "param", "momentum", "rms", "adam", "adafactor", "step_embed"))
  momentum_decays: tuple = struct.field(pytree_node=False, default=(0.5, 0.9, 0.99))
  rms_decay: float = struct.field(pytree_node=False, default=0.999)
  loss_decays: tuple = struct.field(pytree_node=False, default=(0.9, 0.99))
  exp_mult: float = struct.field(pytree_node=False, default=0.001)
  step_mult: float = struct.field(pytree_node=False, default=0.001)
  weight_decay: float = struct.field(pytree_node=False, default=0.0)
  mup: bool = struct.field(pytree_node=False, default=False)
  mup_base_fan_in: int = struct.field(pytree_node=False, default=32)
  fused: str = struct.field(pytree_node=False, default="auto")
  nominal: Optional[nominals.Nominal] = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    given = self.nominal
    object.__setattr__(self, "nominal", nominals.resolve(given))  # frozen: normalize once
    self._check_nominal_fits(given)
    nominals.check(self.nominal, self.features, self.fused)
    if self.fused not in fused_lib.MODES:
      raise ValueError(f"fused must be one of {fused_lib.MODES}, got {self.fused!r}")
    if not self.hidden_sizes or not all(isinstance(h, int) and h > 0 for h in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be a non-empty tuple of positive ints, "
                       f"got {self.hidden_sizes!r}")
    check_positive("exp_mult", self.exp_mult)
    check_positive("step_mult", self.step_mult)
    check_positive("weight_decay", self.weight_decay, allow_zero=True)
    check_positive("mup_base_fan_in", self.mup_base_fan_in)
    self.spec  # validates the feature selection now, not at the first update

  def _check_nominal_fits(self, given: Any) -> None:
    nominal = self.nominal
    if nominal is None:
      return
    # Nothing here reads LSTM inputs or head outputs, and the state has no nominal slot.
    needs = [what for what, used in (("keeps state", nominal.keeps_state),
                                     ("reads per-tensor inputs", nominal.num_tensor_inputs),
                                     ("has head outputs", nominal.num_head_outputs)) if used]
    if needs:
      raise ValueError(f"PerParamMLP has no per-tensor network or nominal state, so its "
                       f"nominal must need neither (e.g. 'adam' / AdamNominal()); got "
                       f"nominal={given!r}, which {' and '.join(needs)} (use "
                       f"HierarchicalLOpt)")

  @property
  def spec(self) -> feats.FeatureSpec:
    return feats.FeatureSpec(tuple(self.features), tuple(self.momentum_decays),
                             self.rms_decay, tuple(self.loss_decays))

  def feature_names(self):
    return self.spec.all_names()

  def init_meta_params(self, key):
    spec = self.spec
    sizes = (len(spec.param_names()),) + tuple(self.hidden_sizes)
    keys = jax.random.split(key, len(sizes) + 2)
    h1 = sizes[1]
    theta = {
        "w_param": _init(keys[0], (sizes[0], h1)),
        "w_tensor": _init(keys[1], (len(spec.tensor_names()), h1)) * 0.1,
        "w_global": _init(keys[2], (max(len(spec.global_names()), 1), h1)),
        "b1": jnp.zeros((h1,)),
        "hidden": [{"w": _init(k, (a, b)), "b": jnp.zeros((b,))}
                   for k, a, b in zip(keys[3:], sizes[1:-1], sizes[2:])],
        "out": {"w": _init(keys[-1], (sizes[-1], 2)), "b": jnp.zeros((2,))},
    }
    if self.nominal is not None:  # start as the nominal: corrections and log-scale near zero
      theta["out"]["w"] = theta["out"]["w"] * nominals.NOMINAL_OUT_INIT
    return jax.tree.map(lambda x: x.astype(jnp.float32), theta)

  def init(self, meta_params, params, *, num_steps=None):
    del meta_params
    return PerParamMLPState(feats.init_state(self.spec, params, num_steps))

  def update(self, meta_params, grads, state, params, *, loss=None, key=None, value_fn=None):
    del key
    f, fstate = feats.compute(self.spec, grads, params, state.features, loss=loss,
                              value_fn=value_fn)
    theta = meta_params
    glob = f.global_ if f.global_.shape[0] else jnp.zeros((1,))
    # [n_leaves, H1]: everything a tensor's coordinates share, folded into one bias.
    bias = f.per_tensor @ theta["w_tensor"] + glob @ theta["w_global"] + theta["b1"]
    leaves, treedef = jax.tree.flatten(params)
    interpret = None if self.nominal is not None else fused_lib.select(self.fused)
    if interpret is not None:  # one kernel per tensor: features and MLP stay in registers
      out = fused_lib.per_param_updates(
          self.spec, f, fstate, grads, params, w_in=theta["w_param"], b_in=bias,
          hidden=theta["hidden"], w_out=theta["out"]["w"], b_out=theta["out"]["b"],
          exp_mult=self.exp_mult, step=self.step_mult,
          weight_decay=self.step_mult * self.weight_decay, interpret=interpret,
          out_scales=[feats.mup_scale(jnp.shape(p), base_fan_in=self.mup_base_fan_in)
                      for p in leaves] if self.mup else None)
      return cast_like(jax.tree.unflatten(treedef, out), params), PerParamMLPState(fstate)
    out, nominal_inputs, nominal_values = [], None, None
    if self.nominal is not None:
      nominal_inputs = nominals.StepInputs(self.spec, f, fstate, jax.tree.leaves(grads),
                                           [jnp.asarray(p, jnp.float32) for p in leaves])
      # Checked at construction: no state, no LSTM columns, no head outputs.
      _, carry = self.nominal.tensor_inputs((), nominal_inputs)
      nominal_values, _ = self.nominal.advance(
          (), nominal_inputs, jnp.zeros((len(leaves), 0), jnp.float32), carry)
    for i, p in enumerate(leaves):
      x = feats.stack_raw(f, i)  # [N, F]; the normalizers fold into the first layer
      h = jax.nn.relu(x @ (f.inv_rms[i][:, None] * theta["w_param"]) + bias[i])
      for layer in theta["hidden"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
      o = (h @ theta["out"]["w"] + theta["out"]["b"]).reshape(jnp.shape(p) + (2,))
      if self.nominal is not None:
        u = self.nominal.leaf_update(
            nominal_values, nominal_inputs, i, o[..., 0], self.exp_mult * o[..., 1],
            step_mult=self.step_mult, max_log_scale=nominals.NOMINAL_MAX_LOG_SCALE,
            residual_clip=nominals.NOMINAL_RESIDUAL_CLIP)
      else:
        u = magnitude_update(o[..., 0], o[..., 1], exp_mult=self.exp_mult,
                             step_mult=self.step_mult)
      if self.weight_decay:
        u = u - self.step_mult * self.weight_decay * jnp.asarray(p, jnp.float32)
      if self.mup:
        u = u * feats.mup_scale(jnp.shape(p), base_fan_in=self.mup_base_fan_in)
      out.append(u)
    updates = jax.tree.unflatten(treedef, out)
    return cast_like(updates, params), PerParamMLPState(fstate)

