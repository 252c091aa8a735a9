"""`NormalizedMLP`: a tiny per-parameter MLP whose output is RMS-normalized per tensor.

The network decides only the *direction* of each tensor's step; the step size comes from
outside, from the user's learning rate or schedule (with decoupled weight decay), as
in the normalized learned update rule of Celo2 (Moudgil, Knyazev & Belilovsky, ICLR
2026). Per step, in one pass over memory (`learned_opt.features`): the per-parameter
features (gradient, momenta at several decays, RMS, parameter, Adam direction, ...),
each normalized per tensor, go through a shared MLP (default 2 hidden layers of 8 ReLU
units) with one output `o`; per-tensor and global features enter its first layer as a
per-tensor bias (as in `PerParamMLP`). Per tensor, `d = o / (rms(o) + eps)`.

Sign convention (exact):

* `direction(...)` returns `d`, signed like the gradient (optax's `scale_by_*`
  convention, e.g. `scale_by_adam`): `<d, g> > 0` for a descent rule, and each tensor
  of `d` has RMS 1 (up to `eps`). `optax.scale_by_learning_rate(lr)` then applies
  `-lr * d`; `learned_opt.scale_by_normalized_mlp` is this `d` as an optax transform.
* `update(...)` (the `LearnedOptimizer` contract, additive) returns
  `-lr_t * (d + meta_train_weight_decay * p)`: with `meta_train_lr` unset, `lr_t = 1`
  and no decay, i.e. `-d`, a descent update of unit RMS per tensor; with it set, the
  meta-training schedule below. Users never call `update` with a learning rate: they
  use `learned_opt.to_optax(..., learning_rate=...)` or `learned_opt.normalized_mlp`.

Meta-training (`update` is what the unroll engine applies): `meta_train_lr` makes it
apply the step as at use, linear warmup over 5% of the task's horizon (`num_steps` of
`init`) then cosine decay to 0 (`learned_opt.baselines.warmup_cosine`), peak
`meta_train_lr`, or with `meta_train_lr_max` a peak drawn log-uniformly per task in
`[meta_train_lr, meta_train_lr_max]` from the first update's key (so both members of
an antithetic pair, which share keys, draw the same rate).

Initialization: hidden units 0 and 1 of every layer carry `relu(z)` and `relu(-z)` of
one input channel `z` (the Adam direction at the momentum decay closest to 0.9, by
default) and the output reads their difference, so the untrained network outputs `z`
plus a small random part: an untrained optimizer is per-tensor normalized Adam, a
descent direction on any task, and meta-training starts from a rule known to work
(the motivation of the nominal rules in `learned_opt.nominals`). The seed units are
ordinary weights: meta-training is free to change them.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt import features as feats
from learned_opt import fused as fused_lib
from learned_opt import normalized_optax
from learned_opt.base import LearnedOptimizer, cast_like, check_positive, horizon_array, sanitize
from learned_opt.baselines.scheduled import WARMUP_FRACTION

_init = jax.nn.initializers.lecun_normal()
INIT_RULES = ("adam", "momentum", "grad", "random")
# Output weights of the non-seed hidden units start this small: the untrained direction
# is the seed channel plus a ~10% random part, a descent direction with high margin.
RANDOM_OUT_INIT = 0.1
_SEED_DECAY = 0.9  # the seed reads the momentum / Adam channel of the decay closest to this


class NormalizedMLPState(NamedTuple):
  """State of `NormalizedMLP`.

  Attributes:
    features: the feature accumulators (step counter and horizon inside).
    lr: float32 [], the peak of this task's meta-training schedule (`meta_train_lr`,
      or drawn at the first update when `meta_train_lr_max` is set); unused at use.
  """
  features: feats.FeatureState
  lr: jax.Array

  @property
  def step(self):
    return self.features.step


class HarnessedState(NamedTuple):
  """State of `NormalizedMLP` meta-trained through its harness (`meta_train_harness`).

  Attributes:
    chain: the state of `learned_opt.normalized_mlp(...)`, the transform that runs.
    lr: float32 [], this task's peak learning rate (as `NormalizedMLPState.lr`).
    step: int32 [], updates so far.
    num_steps: the horizon of the warmup-cosine schedule (inf: constant rate).
  """
  chain: Any
  lr: jax.Array
  step: jax.Array
  num_steps: jax.Array


def warmup_cosine_unit(step: jax.Array, horizon: jax.Array, *,
                       warmup_fraction: float = WARMUP_FRACTION) -> jax.Array:
  """`learned_opt.baselines.warmup_cosine(1.0, horizon)(step)` for a traced horizon.

  The meta-training engine vmaps tasks of different horizons, and optax's schedule
  needs a Python int; this is the same function in jnp. An infinite horizon (no
  `num_steps` given) gives a constant 1.
  """
  t = jnp.asarray(step, jnp.float32)
  horizon = jnp.asarray(horizon, jnp.float32)
  finite = jnp.isfinite(horizon)
  total = jnp.where(finite, horizon, 1.0)  # keeps the unused branch finite
  warm = jnp.maximum(1.0, jnp.round(warmup_fraction * total))
  frac = jnp.clip((t - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
  unit = jnp.where(t < warm, t / warm, 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
  return jnp.where(finite, unit, 1.0)


class NormalizedMLP(LearnedOptimizer):
  """Per-parameter MLP whose update direction is RMS-normalized per tensor.

  See the module docstring for the rule, the sign convention and the initialization.

  Attributes:
    hidden_sizes: widths of the hidden ReLU layers (each >= 2 unless
      `init_rule="random"`: two units per layer carry the seed channel).
    features: selected feature groups, see `learned_opt.features` (not "saferate":
      under the Newton-Schulz harness the network sees only the hidden matrices, while
      a `value_fn` reads the whole parameter tree).
    momentum_decays: decays of the momentum / Adam-direction channels.
    rms_decay: decay of the second-moment accumulator.
    loss_decays: decays of the loss EMAs of the "loss" feature.
    eps: added to each tensor's RMS before dividing by it (a zero output stays zero).
    fused: per-parameter network path: "auto" (the fused Pallas kernel on GPU, XLA
      elsewhere), "xla", "pallas" (GPU only) or "interpret" (tests).
    init_rule: the channel the untrained network outputs: "adam" or "momentum" (at
      the decay closest to 0.9), "grad", or "random" (a plain LeCun-normal init, not
      a descent direction in general).
    meta_train_lr: None, or the peak learning rate `update` applies (warmup-cosine
      over the horizon); what meta-training applies, never used by `direction`.
    meta_train_lr_max: None, or with `meta_train_lr` the upper end of a per-task
      log-uniform peak.
    meta_train_weight_decay: decoupled weight decay `update` applies with
      `meta_train_lr` (times the scheduled rate, as `optax.add_decayed_weights`
      before `optax.scale_by_learning_rate` does at use).
    meta_train_harness: with `meta_train_lr`, `update` runs the whole of
      `learned_opt.normalized_mlp` (Newton-Schulz on hidden matrices, AdamW elsewhere,
      weight decay `meta_train_weight_decay`) under the sampled schedule, so the
      network is meta-trained where it will run; `to_optax(..., learning_rate=...)`
      then returns that harness too. False: the bare rule on every leaf.
    harness_consistent_rms: the harness's `consistent_rms` (meta-training and use):
      None for Muon's shape scale, or the RMS of the hidden matrices' orthogonalized
      steps per unit of rate (0.2 is AdamW's typical update RMS, so one rate suits
      both parts of the harness; with Muon's scale a 256-wide matrix steps ~1/16 as
      far as AdamW at the same rate).
    harness_learned_head: the harness's partition: False for `muon_labels` (the output
      head takes AdamW, as in Muon), True for `normalized_optax.learned_head_labels`
      (Celo2's released partition: the head takes the learned rule and Newton-Schulz,
      so a one-hidden-layer MLP has two learned tensors, not one).
  """

  name: ClassVar[str] = "normalized_mlp"
  takes_learning_rate: ClassVar[bool] = True
  hidden_sizes: tuple = struct.field(pytree_node=False, default=(8, 8))
  features: tuple = struct.field(pytree_node=False, default=(
      "grad", "clipped_grad", "param", "momentum", "rms", "adam", "step_embed"))
  momentum_decays: tuple = struct.field(pytree_node=False, default=(0.5, 0.9, 0.99))
  rms_decay: float = struct.field(pytree_node=False, default=0.999)
  loss_decays: tuple = struct.field(pytree_node=False, default=(0.9, 0.99))
  eps: float = struct.field(pytree_node=False, default=1e-8)
  fused: str = struct.field(pytree_node=False, default="auto")
  init_rule: str = struct.field(pytree_node=False, default="adam")
  meta_train_lr: Optional[float] = struct.field(pytree_node=False, default=None)
  meta_train_lr_max: Optional[float] = struct.field(pytree_node=False, default=None)
  meta_train_weight_decay: float = struct.field(pytree_node=False, default=0.0)
  meta_train_harness: bool = struct.field(pytree_node=False, default=False)
  harness_consistent_rms: Optional[float] = struct.field(pytree_node=False, default=None)
  harness_learned_head: bool = struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if self.fused not in fused_lib.MODES:
      raise ValueError(f"fused must be one of {fused_lib.MODES}, got {self.fused!r}")
    if self.init_rule not in INIT_RULES:
      raise ValueError(f"init_rule must be one of {INIT_RULES}, got {self.init_rule!r}")
    min_width = 1 if self.init_rule == "random" else 2
    if (not isinstance(self.hidden_sizes, tuple) or not self.hidden_sizes
        or not all(isinstance(h, int) and h >= min_width for h in self.hidden_sizes)):
      raise ValueError(f"hidden_sizes must be a non-empty tuple of ints >= {min_width} "
                       f"(init_rule={self.init_rule!r}), got {self.hidden_sizes!r}")
    if "saferate" in self.features:
      raise ValueError(f"NormalizedMLP does not take the 'saferate' feature (its value_fn "
                       f"reads the whole parameter tree; the harness hands the network a "
                       f"part of it); got features={self.features!r}")
    check_positive("eps", self.eps)
    if self.meta_train_lr is not None:
      check_positive("meta_train_lr", self.meta_train_lr)
    if self.meta_train_lr_max is not None:
      if self.meta_train_lr is None or not (isinstance(self.meta_train_lr_max, (int, float))
                                            and self.meta_train_lr_max >= self.meta_train_lr):
        raise ValueError(f"meta_train_lr_max must be a number >= meta_train_lr (which must "
                         f"be set), got meta_train_lr_max={self.meta_train_lr_max!r}, "
                         f"meta_train_lr={self.meta_train_lr!r}")
    check_positive("meta_train_weight_decay", self.meta_train_weight_decay, allow_zero=True)
    if not isinstance(self.meta_train_harness, bool):
      raise ValueError(f"meta_train_harness must be True or False, got {self.meta_train_harness!r}")
    if not isinstance(self.harness_learned_head, bool):
      raise ValueError(f"harness_learned_head must be True or False, got "
                       f"{self.harness_learned_head!r}")
    if self.harness_consistent_rms is not None:
      check_positive("harness_consistent_rms", self.harness_consistent_rms)
    if self.meta_train_harness and self.meta_train_lr is None:
      raise ValueError("meta_train_harness=True needs meta_train_lr (the harness's AdamW part "
                       "takes a learning rate); got meta_train_lr=None")
    self.seed_channel  # validates the feature selection and the seed now

  @property
  def spec(self) -> feats.FeatureSpec:
    return feats.FeatureSpec(tuple(self.features), tuple(self.momentum_decays),
                             self.rms_decay, tuple(self.loss_decays))

  @property
  def seed_channel(self) -> Optional[int]:
    """Index (in `spec.param_names()`) of the channel the untrained network outputs."""
    names = self.spec.param_names()
    if self.init_rule == "random":
      return None
    if self.init_rule == "grad":
      wanted = "grad"
    else:
      decay = min(self.momentum_decays, key=lambda d: abs(d - _SEED_DECAY))
      wanted = f"{self.init_rule}@{decay}"
    if wanted not in names:
      raise ValueError(f"init_rule={self.init_rule!r} needs the {wanted!r} channel, which "
                       f"features={self.features!r} do not compute; add the group or pass "
                       f"another init_rule from {INIT_RULES}")
    return names.index(wanted)

  def feature_names(self):
    return self.spec.all_names()

  def init_meta_params(self, key):
    spec = self.spec
    sizes = (len(spec.param_names()),) + tuple(self.hidden_sizes)
    keys = jax.random.split(key, len(sizes) + 2)
    h1 = sizes[1]
    w_param = _init(keys[0], (sizes[0], h1))
    w_tensor = _init(keys[1], (len(spec.tensor_names()), h1)) * 0.1
    w_global = _init(keys[2], (max(len(spec.global_names()), 1), h1))
    hidden = [{"w": _init(k, (a, b)), "b": jnp.zeros((b,))}
              for k, a, b in zip(keys[3:], sizes[1:-1], sizes[2:])]
    w_out = _init(keys[-1], (sizes[-1], 1))
    c = self.seed_channel
    if c is not None:
      pair = jnp.asarray([1.0, -1.0])
      # Units 0, 1 of layer 1: relu(+z), relu(-z), with z the seed channel alone.
      w_param = w_param.at[:, :2].set(0.0).at[c, :2].set(pair)
      w_tensor = w_tensor.at[:, :2].set(0.0)
      w_global = w_global.at[:, :2].set(0.0)
      # Later layers pass them on: relu(relu(z) - relu(-z)) = relu(z), and mirrored.
      for layer in hidden:
        layer["w"] = layer["w"].at[:, :2].set(0.0).at[:2, :2].set(
            jnp.asarray([[1.0, -1.0], [-1.0, 1.0]]))
      # Output: relu(z) - relu(-z) = z, plus the other units' small random part.
      w_out = (w_out * RANDOM_OUT_INIT).at[:2, 0].set(pair)
    theta = {"w_param": w_param, "w_tensor": w_tensor, "w_global": w_global,
             "b1": jnp.zeros((h1,)), "hidden": hidden,
             "out": {"w": w_out, "b": jnp.zeros((1,))}}
    return jax.tree.map(lambda x: x.astype(jnp.float32), theta)

  def init(self, meta_params, params, *, num_steps=None):
    lr = jnp.asarray(self.meta_train_lr or 0.0, jnp.float32)
    if self.meta_train_harness:  # the chain holds the features' state
      chain = self._harness(meta_params, lambda count: lr, num_steps).init(params)
      horizon = horizon_array(num_steps, required=self.spec.needs_horizon, who="this optimizer")
      return HarnessedState(chain, lr, jnp.zeros((), jnp.int32), horizon)
    return NormalizedMLPState(feats.init_state(self.spec, params, num_steps), lr)

  def at_use(self) -> "NormalizedMLP":
    """This architecture without its meta-training settings (what runs at use)."""
    return self.replace(meta_train_lr=None, meta_train_lr_max=None, meta_train_weight_decay=0.0,
                        meta_train_harness=False)

  def with_learning_rate(self, meta_params, learning_rate, *, num_steps=None, seed=0):
    """The optax transform `to_optax(..., learning_rate=...)` returns: the harness of
    `learned_opt.normalized_mlp` (weight decay `meta_train_weight_decay`) when the
    network was meta-trained inside it, else None (the bare direction and rate)."""
    if not self.meta_train_harness:
      return None
    return self._harness(meta_params, learning_rate, num_steps, seed=seed)

  def _harness(self, meta_params, schedule, num_steps, *, seed=0):
    return normalized_optax.normalized_mlp(self.at_use(), meta_params, schedule,
                                           weight_decay=self.meta_train_weight_decay,
                                           num_steps=num_steps, seed=seed,
                                           consistent_rms=self.harness_consistent_rms,
                                           label_fn=(normalized_optax.learned_head_labels
                                                     if self.harness_learned_head else None))

  def _draw_peak(self, step, current, key):
    """The task's peak rate: drawn log-uniformly at its first update (with
    `meta_train_lr_max`), kept after."""
    if self.meta_train_lr_max is None:
      return current
    lo, hi = math.log(self.meta_train_lr), math.log(self.meta_train_lr_max)
    drawn = (jnp.exp(jax.random.uniform(key, (), minval=lo, maxval=hi)) if key is not None
             else jnp.float32(math.exp(0.5 * (lo + hi))))
    return jnp.where(step == 0, drawn, current)

  def _harness_update(self, meta_params, grads, state, params, *, loss, key):
    peak = self._draw_peak(state.step, state.lr, key)
    schedule = lambda count: peak * warmup_cosine_unit(count, state.num_steps)
    updates, chain = self._harness(meta_params, schedule, state.num_steps).update(
        grads, state.chain, params, loss=loss, key=key)
    return cast_like(updates, params), HarnessedState(chain, peak, state.step + 1, state.num_steps)

  def direction(self, meta_params, grads, state, params, *, loss=None, key=None,
                value_fn=None):
    """`(d, new_state)`: per tensor the network's output scaled to RMS 1, signed like
    the gradient (the step is `-lr * d`); leaves shaped and typed like `params`."""
    del key, value_fn  # deterministic; no feature reads the loss elsewhere
    d, fstate = self._unit_outputs(meta_params, grads, state.features, params, loss=loss)
    return cast_like(d, params), NormalizedMLPState(fstate, state.lr)

  def update(self, meta_params, grads, state, params, *, loss=None, key=None, value_fn=None):
    """`-lr_t * (d + meta_train_weight_decay * p)` (module docstring): `-d` without
    `meta_train_lr`, the meta-training schedule's step with it. `key` draws the task's
    peak rate at its first update (with `meta_train_lr_max`)."""
    del value_fn
    if self.meta_train_harness:
      return self._harness_update(meta_params, grads, state, params, loss=loss, key=key)
    d, fstate = self._unit_outputs(meta_params, grads, state.features, params, loss=loss)
    if self.meta_train_lr is None:
      return cast_like(jax.tree.map(jnp.negative, d), params), NormalizedMLPState(fstate, state.lr)
    peak = self._draw_peak(state.features.step, state.lr, key)
    lr = peak * warmup_cosine_unit(state.features.step, state.features.num_steps)
    wd = self.meta_train_weight_decay
    updates = jax.tree.map(
        lambda u, p: -lr * (u + wd * jnp.asarray(p, jnp.float32)) if wd else -lr * u, d, params)
    return cast_like(updates, params), NormalizedMLPState(fstate, peak)

  def _unit_outputs(self, theta, grads, fstate, params, *, loss):
    """The per-tensor normalized network outputs (float32 tree) and the new features."""
    if not jax.tree.leaves(params):
      # Nothing to update: the harness's learned part of a model with no hidden matrix
      # (a linear model, a quadratic: every leaf goes to AdamW).
      return grads, fstate
    spec = self.spec
    f, fstate = feats.compute(spec, grads, params, fstate, loss=loss)
    glob = f.global_ if f.global_.shape[0] else jnp.zeros((1,))
    # [n_leaves, H1]: everything a tensor's coordinates share, folded into one bias.
    bias = f.per_tensor @ theta["w_tensor"] + glob @ theta["w_global"] + theta["b1"]
    leaves, treedef = jax.tree.flatten(params)
    interpret = fused_lib.select(self.fused)
    if interpret is not None:
      # The kernel computes d * exp(clip(exp_mult * s)) * step - wd * p: a zero
      # log-magnitude column, unit step and no decay leave exactly the output d.
      w_out, b_out = theta["out"]["w"], theta["out"]["b"]
      outs = fused_lib.per_param_updates(
          spec, f, fstate, grads, [jnp.asarray(p, jnp.float32) for p in leaves],
          w_in=theta["w_param"], b_in=bias, hidden=theta["hidden"],
          w_out=jnp.concatenate([w_out, jnp.zeros_like(w_out)], axis=1),
          b_out=jnp.concatenate([b_out, jnp.zeros_like(b_out)]), exp_mult=1.0, step=1.0,
          interpret=interpret)
    else:
      outs = []
      for i, p in enumerate(leaves):
        x = feats.stack_raw(f, i)  # [N, F]; the normalizers fold into the first layer
        h = jax.nn.relu(x @ (f.inv_rms[i][:, None] * theta["w_param"]) + bias[i])
        for layer in theta["hidden"]:
          h = jax.nn.relu(h @ layer["w"] + layer["b"])
        outs.append((h @ theta["out"]["w"] + theta["out"]["b"]).reshape(jnp.shape(p)))
    return jax.tree.unflatten(treedef, [self._normalize(o) for o in outs]), fstate

  def _normalize(self, o: jax.Array) -> jax.Array:
    # Sanitized first: an overflowing network (meta-training explores) must not turn a
    # whole tensor into NaN through its RMS.
    o = sanitize(o)
    rms = jnp.sqrt(jnp.mean(jnp.square(o))) if o.size else jnp.float32(0.0)
    return o / (rms + self.eps)
