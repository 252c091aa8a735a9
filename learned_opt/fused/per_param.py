"""The per-parameter network of a learned optimizer, on the fused kernel or on XLA.

`per_param_updates` is the part of `PerParamMLP.update` and of `HierarchicalLOpt.update`
that runs once per coordinate: given the features already computed by
`learned_opt.features.compute` (whose per-coordinate arrays the fused path leaves unused,
so XLA never materializes them) it returns every tensor's update. `select` decides which
path runs: the Pallas kernel on GPU, XLA elsewhere, or either one when forced.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from learned_opt import features as feats
from learned_opt.base import sanitize
from learned_opt.fused import layout

MODES = ("auto", "xla", "pallas", "interpret")
_EXACT = ("highest", "float32", "Precision.HIGHEST")


def select(mode: str) -> Optional[bool]:
  """Which path `mode` selects: None for XLA, else the kernel's `interpret` flag.

  Args:
    mode: "auto" (the kernel when `jax.default_backend() == "gpu"`, XLA otherwise),
      "xla", "pallas" (the compiled kernel; GPU only) or "interpret" (the kernel in
      Pallas interpret mode: any backend, slow, for tests).
  """
  if mode not in MODES:
    raise ValueError(f"fused must be one of {MODES}, got {mode!r}")
  if mode == "auto":
    return False if jax.default_backend() == "gpu" else None
  if mode == "pallas" and jax.default_backend() != "gpu":
    raise ValueError(f"fused='pallas' needs a GPU backend, but jax.default_backend() is "
                     f"{jax.default_backend()!r}; use fused='interpret' or 'xla'")
  return {"xla": None, "pallas": False, "interpret": True}[mode]


def channels(spec: feats.FeatureSpec) -> tuple[layout.Channel, ...]:
  """The kernel's input channels for `spec`, in `spec.param_names()` order.

  Adafactor's row/column factors (a gather by row and column) and Muon's direction (a
  matrix iteration) are not elementwise, so they arrive precomputed as side channels.
  """
  names = spec.param_names()
  out, side = [], 0
  for group in spec.param_groups:
    if group in ("momentum", "adam"):
      out += [layout.Channel(group, k) for k in range(len(spec.momentum_decays))]
    elif group in layout.IN_KERNEL:
      out.append(layout.Channel(group))
    else:  # as many side channels as the group has names ("adafactor/dir", ...)
      width = sum(1 for nm in names if nm == group or nm.startswith((group + "/", group + "@")))
      out += [layout.Channel("side", side + j) for j in range(width)]
      side += width
  assert len(out) == len(spec.param_names())
  return tuple(out)


def _kernel():
  """The Pallas kernel module, imported on the first fused update rather than with
  `learned_opt`: it loads `jax.experimental.pallas`, which most users never need."""
  from learned_opt.fused import kernel
  return kernel


def _channel(chans, j: int) -> jax.Array:
  """Channel j of one leaf's features: a list of arrays, or one stacked [*shape, F]."""
  return chans[j] if isinstance(chans, (list, tuple)) else chans[..., j]


def per_param_updates(spec: feats.FeatureSpec, f: feats.Features,
                      fstate: feats.FeatureState, grads, params, *, w_in: jax.Array,
                      b_in: jax.Array, hidden: Sequence = (), w_out: jax.Array,
                      b_out: jax.Array, exp_mult: float, step, weight_decay: float = 0.0,
                      out_scales: Optional[Sequence[float]] = None, interpret: bool = False,
                      block_size: int = 256, num_warps: int = 4, precision=None) -> list:
  """Each tensor's update from the shared per-parameter MLP, by the fused kernel.

  Computes, for tensor i, `out_scales[i] * (d * exp(clip(exp_mult * s)) * step[i] -
  weight_decay * p)` with `(d, s) = MLP_i(x)`, `x` = `f.per_param[i]` (but formed inside
  the kernel), ReLU hidden layers, the first layer `x @ w_in + b_in[i]`.

  Args:
    spec: the feature selection that produced `f`.
    f, fstate: `features.compute(spec, grads, params, state)`; `fstate` holds the
      advanced momenta / second moments the kernel reads.
    grads, params: pytrees of the step (flattened in `jax.tree.leaves` order).
    w_in: `[F, H1]` shared, or `[n_leaves, F, H1]` per tensor.
    b_in: `[n_leaves, H1]` first-layer bias of each tensor.
    hidden: sequence of `{"w": [H_i, H_{i+1}], "b": [H_{i+1}]}` (shared).
    w_out, b_out: `[H, 2]` and `[2]` shared, or `[n, H, 2]` and `[n, 2]` per tensor.
    exp_mult: multiplier of the log-magnitude output.
    step: scalar or `[n_leaves]` multiplier of the update.
    weight_decay: coefficient of `-p` (already times the step size), a Python float.
    out_scales: per-tensor Python floats (muP multipliers) or None.
    interpret: Pallas interpret mode (CPU tests).
    block_size, num_warps, precision: see `kernel.leaf_update`.

  Returns:
    List of updates, one per leaf of `params`, each shaped and typed like its leaf.
  """
  g_leaves, p_leaves = jax.tree.leaves(grads), jax.tree.leaves(params)
  n = len(p_leaves)
  if precision is None and str(jax.config.jax_default_matmul_precision) in _EXACT:
    # Follow `jax.default_matmul_precision("highest")` as XLA's dots do (else TF32 on GPU).
    precision = jax.lax.Precision.HIGHEST
  chans = channels(spec)
  is_side = jnp.asarray([c.kind == "side" for c in chans])
  side_cols = [j for j, c in enumerate(chans) if c.kind == "side"]
  uses_m = any(c.kind in ("momentum", "adam") for c in chans)
  uses_v = any(c.kind in ("rms", "adam") for c in chans)
  m_rows, nu_row = feats.moment_rows(spec)
  # exp(-log RMS) is the normalizer features.compute divided by; folded into w_in.
  inv = jnp.exp(-f.per_tensor)  # [n, F]
  step = jnp.broadcast_to(jnp.asarray(step, jnp.float32), (n,))
  hidden = tuple((layer["w"], layer["b"]) for layer in hidden)
  fk = _kernel()
  out = []
  for i in range(n):
    g, p = g_leaves[i], p_leaves[i]
    w1 = w_in if w_in.ndim == 2 else w_in[i]
    w1 = jnp.where(is_side[:, None], w1, w1 * inv[i][:, None])
    wo = w_out if w_out.ndim == 2 else w_out[i]
    bo = b_out if b_out.ndim == 1 else b_out[i]
    side = None
    if side_cols:
      side = jnp.stack([_channel(f.per_param[i], j) for j in side_cols])
    gs = sanitize(g)
    scal = layout.LeafScalars(
        grad_rsqrt_ms=jax.lax.rsqrt(jnp.mean(jnp.square(gs)) + feats.TINY), step=step[i],
        weight_decay=jnp.float32(weight_decay),
        out_scale=jnp.float32(1.0 if out_scales is None else out_scales[i]))
    has_scale = out_scales is not None and out_scales[i] != 1.0
    out.append(fk.leaf_update(
        g, p, fstate.moments[i] if uses_m or uses_v else None, side,
        channels=chans, momentum_rows=m_rows, nu_row=nu_row, w_in=w1, b_in=b_in[i], hidden=hidden, w_out=wo, b_out=bo,
        scalars=scal, exp_mult=exp_mult, has_wd=bool(weight_decay), has_scale=has_scale,
        interpret=interpret, block_size=block_size, num_warps=num_warps,
        precision=precision))
  return out
