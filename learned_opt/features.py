"""Inputs of the learned optimizers: per-parameter, per-tensor and global features.

Three kinds of features feed every architecture:

* **per-parameter** channels, one value per coordinate, stacked on a trailing axis
  `[*leaf.shape, F]`; each channel is normalized per tensor by its RMS over the tensor
  (the second-moment normalizer of Metz et al. 2022, "Practical tradeoffs between memory,
  compute, and performance in learned optimizers"), so the network sees O(1) inputs
  whatever the tensor's scale;
* **per-tensor** features: the log of each channel's per-tensor RMS (the scale the
  normalization divided out), so a network can still express scale-dependent rules
  (e.g. plain SGD = normalized gradient * exp(log RMS of the gradient));
* **global** features, shared by all tensors: step embeddings, training fraction and
  loss features.

Selectable per-parameter groups (`FeatureSpec.features`, in any order; the order is the
channel order and is recorded in checkpoint headers):

  "grad"          the gradient
  "clipped_grad"  the normalized gradient clipped to [-3, 3] (robust to outliers)
  "param"         the parameter value
  "momentum"      EMAs of the gradient, one channel per decay in `momentum_decays`
  "rms"           sqrt of the EMA of g^2 (decay `rms_decay`)
  "adam"          m / sqrt(v) for each momentum decay (Kingma & Ba 2015)
  "adafactor"     3 channels: g / sqrt(v_hat) with v_hat the factored row/column second
                  moment, and the row and column factors 1/sqrt(r), 1/sqrt(c) (Shazeer &
                  Stern 2018); tensors with fewer than 2 dims use the full v instead
  "muon"          the momentum closest to decay 0.95, orthogonalized by 5 Newton-Schulz
                  steps (Jordan et al. 2024); >2-D tensors are viewed as
                  [prod(shape[:-1]), shape[-1]]; vectors and scalars use the momentum
  "saferate"      the SafeRate step `eta * d` along the Adam direction d = -m / sqrt(v)
                  (momentum closest to decay 0.9), eta certified by Taylor enclosures of
                  the loss (`learned_opt.baselines.saferate_step`, trust region
                  SAFERATE_MAX_LR); needs `update(..., value_fn=...)` and costs a Taylor-
                  mode pass of the loss, hence off by default. eta reaches the network
                  through the channel's per-tensor log RMS.

and global groups: "step_embed" (tanh(t / s - 1) for timescales s; needs no horizon),
"train_frac" (t / num_steps and tanh bumps around it; needs `num_steps`; past the
horizon the fraction stays at 1), "loss" (the current loss relative to EMAs of it at
`loss_decays` and EMAs relative to the first loss, clipped to [-5, 5]; needs `loss`).

"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from learned_opt import _sums
from learned_opt.base import sanitize
from learned_opt.baselines.saferate import saferate_step
# The state's types and accessors are part of this module's API (re-exported).
from learned_opt.feature_state import (FeatureState, advance_moments,  # noqa: F401
                                       init_state, is_matrix, moment_decays, moment_rows,
                                       momenta, previous_momentum_sums, second_moment)

from learned_opt.feature_state import float32_zeros as _zeros

_is_matrix = is_matrix  # the name other modules use

try:  # optax exposes this only from its contrib/_muon module (no public alias in 0.2.x).
  from optax.contrib._muon import orthogonalize_via_newton_schulz as _optax_orthogonalize
except ImportError:  # pragma: no cover - depends on the optax version
  _optax_orthogonalize = None

PARAM_GROUPS = ("grad", "clipped_grad", "param", "momentum", "rms", "adam", "adafactor", "muon",
                "saferate")
GLOBAL_GROUPS = ("step_embed", "train_frac", "loss")
STEP_TIMESCALES = (1.0, 10.0, 100.0, 1000.0, 10000.0)
FRAC_CENTERS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Keller Jordan's quintic Newton-Schulz coefficients (the ones optax's muon uses).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Added under square roots: keeps 0/0 at 0 and is far below any meaningful RMS.
TINY = 1e-30
CLIP = 3.0
SAFERATE_MAX_LR = 1.0
LOSS_FEATURE_CLIP = 5.0


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Which features an architecture reads, and their hyperparameters (hashable)."""
  features: tuple[str, ...]
  momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99)
  rms_decay: float = 0.999
  loss_decays: tuple[float, ...] = (0.9, 0.99)

  def __post_init__(self):
    if isinstance(self.features, str) or not isinstance(self.features, Sequence):
      raise ValueError(f"features must be a tuple of names, got {self.features!r}")
    known = PARAM_GROUPS + GLOBAL_GROUPS
    for name in self.features:
      if name not in known:
        raise ValueError(f"unknown feature {name!r}; expected one of {known}")
    if len(set(self.features)) != len(self.features):
      raise ValueError(f"features must not repeat, got {self.features}")
    if not any(f in PARAM_GROUPS for f in self.features):
      raise ValueError(f"features must include a per-parameter group from {PARAM_GROUPS}, "
                       f"got {self.features}")
    for name, decays in (("momentum_decays", self.momentum_decays),
                         ("loss_decays", self.loss_decays), ("rms_decay", (self.rms_decay,))):
      if not decays or not all(isinstance(d, (int, float)) and 0.0 <= d < 1.0 for d in decays):
        raise ValueError(f"{name} must be non-empty numbers in [0, 1), got {decays!r}")

  @property
  def param_groups(self) -> tuple[str, ...]:
    return tuple(f for f in self.features if f in PARAM_GROUPS)

  @property
  def needs_momenta(self) -> bool:
    return bool({"momentum", "adam", "muon", "saferate"} & set(self.features))

  @property
  def needs_nu(self) -> bool:
    return bool({"rms", "adam", "adafactor", "saferate"} & set(self.features))

  @property
  def needs_horizon(self) -> bool:
    return "train_frac" in self.features

  @property
  def muon_index(self) -> int:
    return min(range(len(self.momentum_decays)),
               key=lambda i: abs(self.momentum_decays[i] - 0.95))

  @property
  def saferate_index(self) -> int:
    return min(range(len(self.momentum_decays)),
               key=lambda i: abs(self.momentum_decays[i] - 0.9))

  def param_names(self) -> tuple[str, ...]:
    """Names of the per-parameter channels in order."""
    names = []
    for f in self.param_groups:
      if f in ("momentum", "adam"):
        names += [f"{f}@{d}" for d in self.momentum_decays]
      elif f == "adafactor":
        names += ["adafactor/dir", "adafactor/row", "adafactor/col"]
      else:
        names.append(f)
    return tuple(names)

  def tensor_names(self) -> tuple[str, ...]:
    """Names of the per-tensor features (log RMS of each per-parameter channel)."""
    return tuple(f"log_rms/{n}" for n in self.param_names())

  def global_names(self) -> tuple[str, ...]:
    names = []
    if "step_embed" in self.features:
      names += [f"step_embed@{s:g}" for s in STEP_TIMESCALES]
    if "train_frac" in self.features:
      names += ["train_frac"] + [f"train_frac@{c:g}" for c in FRAC_CENTERS]
    if "loss" in self.features:
      names += [f"loss/vs_ema@{d}" for d in self.loss_decays]
      names += [f"loss/ema@{d}_vs_first" for d in self.loss_decays]
    return tuple(names)

  def all_names(self) -> tuple[str, ...]:
    return self.param_names() + self.tensor_names() + self.global_names()


class Features(NamedTuple):
  """What the networks read, one entry per parameter leaf (flattened tree order)."""
  per_param: list        # per leaf, a list of F channels [*shape] (float32), normalized per tensor
  per_tensor: jax.Array  # [n_leaves, F] log RMS of each raw channel
  global_: jax.Array     # [G]
  raw: list = ()         # per leaf, the F channels before normalization
  inv_rms: Any = None    # [n_leaves, F]: per_param[i][j] == raw[i][j] * inv_rms[i, j]
  momentum_sums: Any = None  # [n_leaves, 3] sums of g^2, m^2, g m (`cosine_momentum`)


def _newton_schulz(x: jax.Array) -> jax.Array:
  coeffs = jnp.asarray(NS_COEFFS, jnp.float32)
  if _optax_orthogonalize is not None:
    return _optax_orthogonalize(x, coeffs, NS_STEPS)
  # Fallback when optax moves its helper: the same quintic iteration, 5 steps.
  a, b, c = NS_COEFFS
  transposed = x.shape[0] > x.shape[1]
  x = x.T if transposed else x
  x = x / (jnp.linalg.norm(x) + 1e-8)
  for _ in range(NS_STEPS):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if transposed else x


def _leaf_features(spec: FeatureSpec, g, p, acc, r, c):
  """Raw channels of one leaf (a list of arrays shaped like it) and its accumulators.

  Channels stay separate arrays (never stacked) so XLA fuses their computation,
  normalization and the per-parameter network into few passes over memory.
  """
  shape = g.shape
  m = v = None
  if acc is not None:
    acc = advance_moments(spec, acc, g)
    if spec.needs_momenta:
      m = [acc[k] for k in range(len(spec.momentum_decays))]
    if spec.needs_nu:
      v = acc[-1]
  chans, squares = [], {}  # squares: channel index -> its square, where cheaper than x * x
  for f in spec.param_groups:
    if f == "grad":
      chans.append(g)
    elif f == "clipped_grad":
      g_n = g * jax.lax.rsqrt(jnp.mean(jnp.square(g)) + TINY)
      chans.append(jnp.clip(g_n, -CLIP, CLIP))
    elif f == "param":
      chans.append(p)
    elif f == "momentum":
      chans += list(m)
    elif f == "rms":
      squares[len(chans)] = v
      chans.append(v * jax.lax.rsqrt(v + TINY))  # sqrt(v); shares the adam channels' rsqrt
    elif f == "adam":
      inv = jax.lax.rsqrt(v + TINY)
      inv_sq = 1.0 / (v + TINY)
      for mi in m:
        squares[len(chans)] = jnp.square(mi) * inv_sq
        chans.append(mi * inv)
    elif f == "adafactor":
      if _is_matrix(shape):
        g2 = jnp.square(g).reshape(-1, shape[-1])
        b = spec.rms_decay
        r = b * r + (1.0 - b) * jnp.mean(g2, axis=1)
        c = b * c + (1.0 - b) * jnp.mean(g2, axis=0)
        inv_r = jax.lax.rsqrt(r + TINY)[:, None]
        inv_c = jax.lax.rsqrt(c + TINY)[None, :]
        # v_hat = r c^T / mean(r), formed from r / mean(r) so no product overflows.
        v_hat = (r / (jnp.mean(r) + TINY))[:, None] * c[None, :]
        g_2d = g.reshape(-1, shape[-1])
        chans += [(g_2d * jax.lax.rsqrt(v_hat + TINY)).reshape(shape),
                  jnp.broadcast_to(inv_r, g_2d.shape).reshape(shape),
                  jnp.broadcast_to(inv_c, g_2d.shape).reshape(shape)]
      else:
        inv = jax.lax.rsqrt(v + TINY)
        chans += [g * inv, inv, inv]
    elif f == "saferate":
      chans.append(None)  # filled by `compute`: it needs every tensor's direction at once
    elif f == "muon":
      mu = m[spec.muon_index]
      if _is_matrix(shape):
        chans.append(_newton_schulz(mu.reshape(-1, shape[-1])).reshape(shape))
      else:
        chans.append(mu)
  return chans, squares, (m, v, r, c, acc)


def _global_features(spec: FeatureSpec, state: FeatureState, loss):
  """Global features and the updated loss EMAs."""
  t = state.step.astype(jnp.float32)
  out = []
  if "step_embed" in spec.features:
    out.append(jnp.tanh(t / jnp.asarray(STEP_TIMESCALES, jnp.float32) - 1.0))
  if "train_frac" in spec.features:
    frac = jnp.clip(t / state.num_steps, 0.0, 1.0)
    centers = jnp.asarray(FRAC_CENTERS, jnp.float32)
    out += [frac[None], jnp.tanh(10.0 * (frac - centers))]
  loss_ema, loss_first = state.loss_ema, state.loss_first
  if "loss" in spec.features:
    if loss is None:
      raise ValueError("the 'loss' feature needs the training loss: pass update(..., loss=...)")
    loss = jnp.nan_to_num(jnp.asarray(loss, jnp.float32), nan=1e30, posinf=1e30, neginf=-1e30)
    first = state.step == 0
    decays = jnp.asarray(spec.loss_decays, jnp.float32)
    loss_first = jnp.where(first, loss, loss_first)
    loss_ema = jnp.where(first, loss, decays * loss_ema + (1.0 - decays) * loss)
    rel = lambda a, ref: jnp.clip((a - ref) / (jnp.abs(ref) + 1e-8),
                                  -LOSS_FEATURE_CLIP, LOSS_FEATURE_CLIP)
    out += [rel(loss, loss_ema), rel(loss_ema, loss_first)]
  g = jnp.concatenate(out) if out else _zeros((0,))
  return g, loss_ema, loss_first


def _mean_squares(squares: list) -> jax.Array:
  """[len(squares)] means, computed in ONE pass over all channels (`_sums.sums`)."""
  return jnp.stack(_sums.sums(squares)) / math.prod(squares[0].shape)


def _saferate_channels(spec: FeatureSpec, params, accs, value_fn):
  """Per leaf, the SafeRate step eta * d along d = -m / sqrt(v)."""
  if value_fn is None:
    raise ValueError("the 'saferate' feature needs the loss as a function of the params: "
                     "pass update(..., value_fn=params -> loss)")
  direction = [-m[spec.saferate_index] * jax.lax.rsqrt(v + TINY) for m, v, *_ in accs]
  leaves, treedef = jax.tree.flatten(params)
  direction_tree = jax.tree.unflatten(
      treedef, [d.astype(jnp.asarray(p).dtype) for d, p in zip(direction, leaves)])
  eta, _ = saferate_step(value_fn, params, direction_tree, SAFERATE_MAX_LR)
  return [jnp.asarray(eta, jnp.float32) * d for d in direction]


def compute(spec: FeatureSpec, grads, params, state: FeatureState, *,
            loss: Optional[jax.Array] = None,
            value_fn: Optional[Callable] = None,
            cosine_momentum: Optional[int] = None) -> tuple[Features, FeatureState]:
  """Features for one optimizer step and the advanced accumulators.

  Args:
    spec: the selected features.
    grads: gradient pytree (any float dtype; sanitized to float32).
    params: parameter pytree with the same structure.
    state: accumulators from `init_state` or a previous call.
    loss: scalar training loss at `params`; required by the "loss" feature.
    value_fn: params -> scalar loss; required by the "saferate" feature.
    cosine_momentum: if given, `Features.momentum_sums` holds, per tensor, the sums of
      g^2, m^2 and g m, with m the momentum of that index from BEFORE this step (what the
      hypergradient cosine, `learned_opt.baselines.hypergradient.cosine_from_sums`,
      needs), computed in the same pass over memory as the normalizers.

  Returns:
    `(Features, new_state)`; `Features.per_param[i]` belongs to `jax.tree.leaves(params)[i]`.
  """
  g_leaves = [sanitize(g) for g in jax.tree.leaves(grads)]
  p_leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
  if len(g_leaves) != len(p_leaves):
    raise ValueError(f"grads have {len(g_leaves)} leaves but params have {len(p_leaves)}")
  n = len(g_leaves)
  moments = state.moments if moment_decays(spec) else [None] * n
  r = state.rows if "adafactor" in spec.features else [None] * n
  c = state.cols if "adafactor" in spec.features else [None] * n
  raws, squares, accs = [], [], []
  for i in range(n):
    raw, sq, acc = _leaf_features(spec, g_leaves[i], p_leaves[i], moments[i], r[i], c[i])
    raws.append(raw)
    squares.append(sq)
    accs.append(acc)
  if "saferate" in spec.features:
    safe = _saferate_channels(spec, params, accs, value_fn)
    raws = [[safe[i] if x is None else x for x in raw] for i, raw in enumerate(raws)]
  if cosine_momentum is not None and not spec.needs_momenta:
    raise ValueError(f"cosine_momentum={cosine_momentum} needs momenta; features are "
                     f"{spec.features}")
  if cosine_momentum is not None:
    decay = spec.momentum_decays[cosine_momentum]
    # Undoing the EMA divides by decay^2: below 0.5 read the old momentum instead.
    derive_old = decay >= 0.5
  per_param, scales, invs, momentum_sums = [], [], [], []
  for i, (raw, sq) in enumerate(zip(raws, squares)):
    sq = [sq.get(j, None) if sq.get(j, None) is not None else jnp.square(x)
          for j, x in enumerate(raw)]
    if cosine_momentum is not None:
      # Sums over this step's momentum, from which the previous one's follow: reading
      # the previous momentum here would make XLA copy the donated state.
      g = g_leaves[i]
      m = accs[i][0][cosine_momentum] if derive_old else momenta(spec, state, i)[cosine_momentum]
      sq += [g * g, m * m, g * m]
    ms = _mean_squares(sq)
    if cosine_momentum is not None:
      sums = ms[-3:] * math.prod(jnp.shape(raw[0]))
      momentum_sums.append(previous_momentum_sums(sums, decay, state.step)
                           if derive_old else sums)
      ms = ms[:-3]
    ms = ms + TINY
    inv = jax.lax.rsqrt(ms)
    per_param.append([x * inv[j] for j, x in enumerate(raw)])
    scales.append(0.5 * jnp.log(ms))
    invs.append(inv)
  glob, loss_ema, loss_first = _global_features(spec, state, loss)
  pick = lambda j, used: [a[j] for a in accs] if used else ()
  new_state = FeatureState(
      step=state.step + 1, num_steps=state.num_steps,
      moments=pick(4, bool(moment_decays(spec))),
      rows=pick(2, "adafactor" in spec.features), cols=pick(3, "adafactor" in spec.features),
      loss_ema=loss_ema, loss_first=loss_first)
  return Features(per_param, jnp.stack(scales), glob, raws, jnp.stack(invs),
                  jnp.stack(momentum_sums) if momentum_sums else None), new_state


def stack_raw(f: Features, i: int) -> jax.Array:
  """Leaf `i`'s raw channels as one `[N, F]` matrix, for a per-coordinate network.

  `x @ (f.inv_rms[i][:, None] * w)` then equals the normalized features times `w`.
  Flat and 2-D because XLA:CPU's YNNPACK fusion (`learned_opt.compiler_options`) runs a chain
  of matmuls as one kernel only on 2-D operands. The barrier keeps the stack a matrix:
  without it XLA rewrites `stack(channels) @ w` into F broadcast outer products, which
  no matmul kernel runs (3x slower on the 1M-parameter benchmark).
  """
  x = jnp.stack([jnp.ravel(c) for c in f.raw[i]], axis=-1)
  return jax.lax.optimization_barrier(x)


def fan_in(shape) -> int:
  """Fan-in of a weight of `shape` (flax layout: inputs first, outputs last); 1 for vectors."""
  return math.prod(shape[:-1]) if len(shape) >= 2 else 1


def mup_scale(shape, *, base_fan_in: int, power: float = 1.0) -> float:
  """muP-style update multiplier `(base_fan_in / fan_in) ** power` for >=2-D tensors.

  Following muP's Adam rule (Yang et al. 2022, "Tensor Programs V") as used for learned
  optimizers by muLO (Therien et al. 2024): matrix updates shrink as 1/fan_in, so the
  change of each layer's output stays O(1) as width grows; vectors (biases, norms) keep
  scale 1. The input layer's fan-in is the data dimension, fixed across widths, so its
  constant factor is absorbed by meta-training.
  """
  if len(shape) < 2:
    return 1.0
  return float(base_fan_in / fan_in(shape)) ** power
