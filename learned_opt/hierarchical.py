"""`HierarchicalLOpt`: a per-tensor LSTM steering a tiny per-parameter MLP (VeLO-like).

Follows the hierarchical design of VeLO (Metz et al. 2022, "VeLO: Training versatile
learned optimizers by scaling up"): the expensive, expressive part runs once per tensor,
the part that runs per coordinate stays tiny.

* Per tensor, an LSTM (shared by all tensors, `flax.linen.OptimizedLSTMCell`) reads the
  tensor's statistics (log RMS of every feature channel, the parameter scale, its size
  and shape class), the global features (step, training fraction, loss) and a global
  summary: the mean of all tensors' LSTM outputs at the previous step, through which
  tensors communicate.
* Its head emits, per tensor, mixing weights over a bank of `num_mlps` tiny MLPs (their
  weights are averaged, so each coordinate runs ONE tiny MLP) and a log step scale.
* The per-parameter MLP (`features -> per_param_hidden -> 2`) outputs a direction `d` and
  log-magnitude `s`; the update is `d * exp(exp_mult * s) * exp(log_scale) * step_mult *
  param_scale`, where `param_scale = RMS(param) + param_scale_floor` makes steps relative
  to the tensor's size (the floor lets zero-initialized biases move).

With a nominal (`learned_opt.nominals`) the network corrects a hand-designed rule instead:
with `AdamNominal()` ("adam") the update is `-(adam + d) * exp(log_scale + exp_mult * s)
* step_mult`, an absolute step like Adam's, so the per-tensor LSTM acts as a learned
step-size controller and the tiny MLPs as bounded per-coordinate corrections; untrained,
it is Adam at `step_mult`. `ProdigyNominal()` ("prodigy") corrects optax's Prodigy the
same way, in units of Prodigy's own step size (untrained it is Prodigy, `step_mult`
unused). `AdamHDNominal()` ("adam_hd") corrects Adam whose per-tensor learning rate
adapts by hypergradient descent (`learned_opt.baselines.adam_hd`); the LSTM also reads
each tensor's log learning rate and the cosine that moved it and, with
`AdamHDNominal(rate_max_log_scale > 0)`, sets each tensor's hypergradient rate (one more
head output). A nominal may add such LSTM inputs, head outputs and state of its own
(`nominals.Nominal`); `nominal_max_log_scale` and `nominal_residual_clip` (0 turns the
per-coordinate corrections off) bound the learned part around any of them.

The head also reads its input linearly (a skip connection), so per-tensor step scales
that are linear in the statistics (e.g. plain SGD) are exactly representable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from learned_opt import features as feats
from learned_opt import fused as fused_lib
from learned_opt import nominals
from learned_opt.base import (MAX_LOG_SCALE, LearnedOptimizer, cast_like, check_positive,
                              magnitude_update)
from learned_opt.nominals import NOMINAL_MAX_LOG_SCALE, NOMINAL_RESIDUAL_CLIP

_init = jax.nn.initializers.lecun_normal()
_TENSOR_STATS = ("log_param_scale", "log_numel", "is_matrix")


def _tiny_mlp(chans, w1, b1, w2, b2):
  """The per-parameter MLP written as scalar arithmetic over the channel arrays.

  With a handful of inputs and hidden units, `[N, F] @ [F, H]` is a skinny matmul that
  XLA's CPU backend runs far below its dense rate and that materializes [N, H] hidden
  activations; as elementwise expressions XLA fuses features, network and update into
  one loop that keeps the hidden units in registers.
  """
  hidden = []
  for j in range(w1.shape[1]):
    z = b1[j]
    for k, x in enumerate(chans):
      z = z + x * w1[k, j]
    hidden.append(jax.nn.relu(z))
  outs = []
  for o in range(2):
    z = b2[o]
    for j, h in enumerate(hidden):
      z = z + h * w2[j, o]
    outs.append(z)
  return outs[0], outs[1]


class HierarchicalState(NamedTuple):
  """State of `HierarchicalLOpt`."""
  features: feats.FeatureState
  lstm_c: jax.Array   # [n_tensors, tensor_hidden]
  lstm_h: jax.Array   # [n_tensors, tensor_hidden]
  summary: jax.Array  # [tensor_hidden]: mean of lstm_h over tensors, previous step
  nominal: tuple = ()  # the nominal's own state (`Nominal.init`); () without one

  @property
  def step(self):
    return self.features.step


class HierarchicalLOpt(LearnedOptimizer):
  """Hierarchical learned optimizer: per-tensor LSTM + mixture of tiny per-parameter MLPs.

  Attributes:
    tensor_hidden: width of the per-tensor LSTM.
    num_mlps: size of the bank of per-parameter MLPs the LSTM mixes.
    per_param_hidden: hidden width of the per-parameter MLP (keep tiny: its cost is paid
      for every coordinate).
    features, momentum_decays, rms_decay, loss_decays: feature selection, see
      `learned_opt.features`.
    exp_mult, step_mult: see the module docstring.
    param_scale_floor: added to the tensor RMS in `param_scale`.
    weight_decay: decoupled weight decay; adds `-step_mult * weight_decay * param`.
    mup: if True, multiply the update of every >=2-D tensor by
      `sqrt(mup_base_fan_in / fan_in)`: the relative-to-RMS step already scales as
      1/sqrt(fan_in) under a muP/standard init, the square root completes muP's 1/fan_in.
    mup_base_fan_in: the fan-in at which the muP multiplier is 1.
    fused: per-parameter MLP path: "auto" (the fused Pallas kernel on GPU, XLA
      elsewhere), "xla", "pallas" (GPU only) or "interpret" (tests); see `learned_opt.fused`.
    nominal: None (steps relative to the tensor RMS, above) or the
      `learned_opt.nominals.Nominal` the network corrects (XLA path), e.g.
      `AdamNominal()`, `AdamHDNominal(rate_max_log_scale=0.693)` or `ProdigyNominal()`.
      The constructor also takes "none", the names in `nominals.NOMINALS` and
      `Nominal.config()` dicts.
    nominal_max_log_scale: with a nominal, the learned step factor stays within
      [e^-m, e^m] of the nominal's step (a trust region around a rule known to work).
    nominal_residual_clip: with a nominal, the per-coordinate correction stays within
      +-this, in units of the nominal's direction; 0 leaves the direction its own.
    hypergradient_rate, hypergradient_max_log_lr, hypergradient_rate_max_log_scale:
      init-only spellings of old configs, folded into `AdamHDNominal`'s `rate`,
      `max_log_lr` and `rate_max_log_scale` (they need nominal "adam_hd").
  """

  name: ClassVar[str] = "hierarchical"
  # Init-only keys that configs may still give (`meta_train` config checks read this).
  legacy_config_keys: ClassVar[tuple[str, ...]] = (
      "hypergradient_rate", "hypergradient_max_log_lr", "hypergradient_rate_max_log_scale")
  tensor_hidden: int = struct.field(pytree_node=False, default=32)
  num_mlps: int = struct.field(pytree_node=False, default=4)
  per_param_hidden: int = struct.field(pytree_node=False, default=4)
  features: tuple = struct.field(pytree_node=False, default=(
      "grad", "param", "momentum", "rms", "adam", "step_embed"))
  momentum_decays: tuple = struct.field(pytree_node=False, default=(0.9, 0.99))
  rms_decay: float = struct.field(pytree_node=False, default=0.999)
  loss_decays: tuple = struct.field(pytree_node=False, default=(0.9, 0.99))
  exp_mult: float = struct.field(pytree_node=False, default=0.001)
  step_mult: float = struct.field(pytree_node=False, default=0.01)
  param_scale_floor: float = struct.field(pytree_node=False, default=0.01)
  weight_decay: float = struct.field(pytree_node=False, default=0.0)
  mup: bool = struct.field(pytree_node=False, default=False)
  mup_base_fan_in: int = struct.field(pytree_node=False, default=32)
  fused: str = struct.field(pytree_node=False, default="auto")
  nominal: Optional[nominals.Nominal] = struct.field(pytree_node=False, default=None)
  nominal_max_log_scale: float = struct.field(pytree_node=False, default=NOMINAL_MAX_LOG_SCALE)
  nominal_residual_clip: float = struct.field(pytree_node=False, default=NOMINAL_RESIDUAL_CLIP)
  # Old configs' flat adam_hd keys: not stored, folded into the nominal (None: not given).
  # Init-only, so reading them gives None: read `nominal.rate` etc. (A property reading
  # the nominal would break `replace`, which passes init-only values back in.)
  hypergradient_rate: dataclasses.InitVar[Optional[float]] = None
  hypergradient_max_log_lr: dataclasses.InitVar[Optional[float]] = None
  hypergradient_rate_max_log_scale: dataclasses.InitVar[Optional[float]] = None

  def __post_init__(self, hypergradient_rate, hypergradient_max_log_lr,
                    hypergradient_rate_max_log_scale):
    legacy = {"hypergradient_rate": hypergradient_rate,
              "hypergradient_max_log_lr": hypergradient_max_log_lr,
              "hypergradient_rate_max_log_scale": hypergradient_rate_max_log_scale}
    # Frozen dataclass: the nominal is normalized to a `Nominal` (or None) once, here.
    object.__setattr__(self, "nominal", nominals.resolve(self.nominal, legacy=legacy))
    nominals.check(self.nominal, self.features, self.fused)
    check_positive("nominal_max_log_scale", self.nominal_max_log_scale, allow_zero=True)
    check_positive("nominal_residual_clip", self.nominal_residual_clip, allow_zero=True)
    if self.fused not in fused_lib.MODES:
      raise ValueError(f"fused must be one of {fused_lib.MODES}, got {self.fused!r}")
    for name in ("tensor_hidden", "num_mlps", "per_param_hidden"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_positive("exp_mult", self.exp_mult)
    check_positive("step_mult", self.step_mult)
    check_positive("param_scale_floor", self.param_scale_floor)
    check_positive("weight_decay", self.weight_decay, allow_zero=True)
    check_positive("mup_base_fan_in", self.mup_base_fan_in)
    self.spec  # validates the feature selection now

  @property
  def spec(self) -> feats.FeatureSpec:
    return feats.FeatureSpec(tuple(self.features), tuple(self.momentum_decays),
                             self.rms_decay, tuple(self.loss_decays))

  def feature_names(self):
    return self.spec.all_names() + _TENSOR_STATS

  @property
  def _cell(self) -> nn.OptimizedLSTMCell:
    return nn.OptimizedLSTMCell(features=self.tensor_hidden)

  def _tensor_input_size(self) -> int:
    spec = self.spec
    return (len(spec.tensor_names()) + len(_TENSOR_STATS) + len(spec.global_names())
            + self.tensor_hidden + self._nominal_sizes[0])

  @property
  def _nominal_sizes(self) -> tuple[int, int]:
    """The nominal's extra LSTM inputs and head outputs per tensor."""
    if self.nominal is None:
      return 0, 0
    return self.nominal.num_tensor_inputs, self.nominal.num_head_outputs

  def init_meta_params(self, key):
    n_p, hid, k_mlps = len(self.spec.param_names()), self.per_param_hidden, self.num_mlps
    d_in = self._tensor_input_size()
    k = jax.random.split(key, 6)
    x = jnp.zeros((1, d_in))
    carry = self._cell.initialize_carry(k[0], x.shape)
    lstm = self._cell.init(k[0], carry, x)["params"]
    n_out = k_mlps + 1 + self._nominal_sizes[1]  # mixing logits, log step scale, nominal's
    # Small head: the bank starts uniformly mixed and the step scale near exp(0) = 1.
    theta = {
        "lstm": lstm,
        "head": {"w_h": _init(k[1], (self.tensor_hidden, n_out)) * 0.01,
                 "w_in": _init(k[2], (d_in, n_out)) * 0.01, "b": jnp.zeros((n_out,))},
        "bank": {"w1": jax.vmap(lambda kk: _init(kk, (n_p, hid)))(jax.random.split(k[3], k_mlps)),
                 "b1": jnp.zeros((k_mlps, hid)),
                 "w2": jax.vmap(lambda kk: _init(kk, (hid, 2)))(jax.random.split(k[4], k_mlps)),
                 "b2": jnp.zeros((k_mlps, 2))},
    }
    if self.nominal is not None:  # untrained == the nominal: corrections start tiny
      theta["bank"]["w2"] = theta["bank"]["w2"] * nominals.NOMINAL_OUT_INIT
    return jax.tree.map(lambda a: a.astype(jnp.float32), theta)

  def init(self, meta_params, params, *, num_steps=None):
    del meta_params
    n = len(jax.tree.leaves(params))
    # Separate buffers: a state that aliases one array twice cannot be donated to jit.
    zeros = lambda: jnp.zeros((n, self.tensor_hidden), jnp.float32)
    nominal = () if self.nominal is None else self.nominal.init(
        [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)])
    return HierarchicalState(feats.init_state(self.spec, params, num_steps), zeros(), zeros(),
                             jnp.zeros((self.tensor_hidden,), jnp.float32), nominal)

  def update(self, meta_params, grads, state, params, *, loss=None, key=None, value_fn=None):
    del key
    nominal = self.nominal
    f, fstate = feats.compute(
        self.spec, grads, params, state.features, loss=loss, value_fn=value_fn,
        **({} if nominal is None else nominal.compute_options(self.spec)))
    leaves, treedef = jax.tree.flatten(params)
    n = len(leaves)
    p32 = [jnp.asarray(p, jnp.float32) for p in leaves]
    nominal_inputs, extra_inputs, carry = None, [], None
    if nominal is not None:
      nominal_inputs = nominals.StepInputs(self.spec, f, fstate, jax.tree.leaves(grads), p32)
      extra_inputs, carry = nominal.tensor_inputs(state.nominal, nominal_inputs)
    names = self.spec.param_names()
    if "param" in names:  # reuse the features' per-tensor RMS: saves a pass over params
      rms = jnp.sqrt(jnp.maximum(jnp.exp(2.0 * f.per_tensor[:, names.index("param")]) - feats.TINY, 0.0))
    else:
      rms = jnp.stack([jnp.sqrt(jnp.mean(jnp.square(p))) for p in p32])
    param_scale = rms + self.param_scale_floor
    shape_stats = jnp.asarray([[math.log(max(math.prod(jnp.shape(p)), 1)) / 10.0,
                                float(feats._is_matrix(jnp.shape(p)))] for p in leaves],
                              jnp.float32).reshape(n, 2)
    x_in = jnp.concatenate([
        f.per_tensor, jnp.log(param_scale)[:, None], shape_stats,
        jnp.broadcast_to(f.global_, (n, f.global_.shape[0])),
        jnp.broadcast_to(state.summary, (n, self.tensor_hidden))] + extra_inputs, axis=1)
    (c, h), _ = self._cell.apply({"params": meta_params["lstm"]}, (state.lstm_c, state.lstm_h), x_in)
    head = meta_params["head"]
    out = h @ head["w_h"] + x_in @ head["w_in"] + head["b"]   # [n, num_mlps + 1 + extra]
    mix = jax.nn.softmax(out[:, :self.num_mlps], axis=-1)      # [n, K]
    log_scale = jnp.clip(out[:, self.num_mlps], -MAX_LOG_SCALE, MAX_LOG_SCALE)
    nominal_values, nominal_state = None, state.nominal
    if nominal is not None:
      nominal_values, nominal_state = nominal.advance(state.nominal, nominal_inputs,
                                                      out[:, self.num_mlps + 1:], carry)
    bank = meta_params["bank"]
    # Mixing weights, not outputs: each coordinate then runs a single tiny MLP.
    w1 = jnp.einsum("nk,kfh->nfh", mix, bank["w1"])
    b1 = mix @ bank["b1"]
    w2 = jnp.einsum("nk,khd->nhd", mix, bank["w2"])
    b2 = mix @ bank["b2"]
    step = self.step_mult * param_scale * jnp.exp(log_scale)  # [n]
    new_state = HierarchicalState(fstate, c, h, jnp.mean(h, axis=0), nominal_state)
    interpret = None if nominal is not None else fused_lib.select(self.fused)
    if interpret is not None:  # one kernel per tensor: features and MLP stay in registers
      updates = fused_lib.per_param_updates(
          self.spec, f, fstate, grads, params, w_in=w1, b_in=b1, w_out=w2, b_out=b2,
          exp_mult=self.exp_mult, step=step, weight_decay=self.step_mult * self.weight_decay,
          interpret=interpret,
          out_scales=[feats.mup_scale(p.shape, base_fan_in=self.mup_base_fan_in, power=0.5)
                      for p in p32] if self.mup else None)
      return cast_like(jax.tree.unflatten(treedef, updates), params), new_state
    updates = []
    # The raw channels with each tensor's normalizer folded into the first layer's
    # weights: F fewer multiplies per coordinate than normalizing the channels first.
    w1_raw = w1 * f.inv_rms[:, :, None]
    for i, (chans, p) in enumerate(zip(f.raw, p32)):
      d, s = _tiny_mlp(chans, w1_raw[i], b1[i], w2[i], b2[i])
      if nominal is not None:
        u = nominal.leaf_update(nominal_values, nominal_inputs, i, d,
                                log_scale[i] + self.exp_mult * s, step_mult=self.step_mult,
                                max_log_scale=self.nominal_max_log_scale,
                                residual_clip=self.nominal_residual_clip)
      else:
        u = magnitude_update(d, s, exp_mult=self.exp_mult, step_mult=step[i])
      if self.weight_decay:
        u = u - self.step_mult * self.weight_decay * p
      if self.mup:  # absolute (Adam-like) steps need muP's full 1/fan_in
        u = u * feats.mup_scale(p.shape, base_fan_in=self.mup_base_fan_in,
                                power=1.0 if nominal is not None else 0.5)
      updates.append(u)
    return cast_like(jax.tree.unflatten(treedef, updates), params), new_state
