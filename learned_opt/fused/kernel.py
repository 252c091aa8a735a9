"""Pallas kernel: one parameter tensor's features -> small MLP -> magnitude update, fused.

The XLA path of a per-parameter learned optimizer writes every coordinate's feature
vector ([N, F]) and hidden activations ([N, H] per layer) to device memory and reads
them back; for H = 32 that traffic, not the arithmetic, sets the step time. This kernel
keeps them in registers: each program loads a block of coordinates (gradient, parameter,
the already-advanced momenta and second moment, plus any channels the caller
precomputed), forms the channels, runs the MLP and writes only the update.

Per-tensor quantities (the channels' normalizers, the bias that folds per-tensor and
global features into the first layer) are reductions over the whole tensor, so they come
in as small inputs computed beforehand; the channel normalizer is folded into the first
layer's weights (`w_in[f] / rms_f`), which saves one multiply per channel and coordinate.

Written for the Triton backend of Pallas on GPU (sizes of in-kernel arrays must be powers
of two, so hidden widths are zero-padded; a tail block is masked); on CPU it runs in
Pallas interpret mode, which is how the tests check it against the XLA path.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Triton-specific masked load/store (the GPU backend this kernel is written for).
  from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - depends on the jax build
  plt = None

from learned_opt.base import MAX_LOG_SCALE, sanitize
from learned_opt.features import CLIP, TINY
from learned_opt.fused.layout import IN_KERNEL, Channel, LeafScalars  # noqa: F401 (re-export)

# tl.dot needs every dimension >= 16; narrower layers run as outer products instead.
_MIN_DOT = 16


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _pad_to(x: jax.Array, shape) -> jax.Array:
  return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _kernel(*refs, channels, n, block, n_hidden, dot_layers, exp_mult, momentum_rows,
            nu_row, has_moments, has_side, has_wd, has_scale, precision):
  it = iter(refs)
  g_ref, p_ref = next(it), next(it)
  moments_ref = next(it) if has_moments else None
  side_ref = next(it) if has_side else None
  w1_ref, b1_ref = next(it), next(it)
  hidden = [(next(it), next(it)) for _ in range(n_hidden)]
  wo_ref, bo_ref, sc_ref, u_ref = next(it), next(it), next(it), next(it)

  idx = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
  valid = idx < n
  # Masked lanes read 0 and are never stored: the tail block needs no padded copy.
  load = lambda ref: plt.load(ref, mask=valid, other=0).astype(jnp.float32)

  g = load(g_ref)
  g = sanitize(g)  # the one sanitizer: NaN -> 0, clip to +-GRAD_BOUND
  p = load(p_ref)
  row = lambda r: load(moments_ref.at[jnp.int32(r)])
  v = None if nu_row is None else row(nu_row)
  h = None
  for f, ch in enumerate(channels):
    if ch.kind == "grad":
      x = g
    elif ch.kind == "clipped_grad":
      x = jnp.clip(g * sc_ref[0], -CLIP, CLIP)
    elif ch.kind == "param":
      x = p
    elif ch.kind == "momentum":
      x = row(momentum_rows[ch.index])
    elif ch.kind == "rms":
      x = jnp.sqrt(v)
    elif ch.kind == "adam":
      x = row(momentum_rows[ch.index]) * jax.lax.rsqrt(v + TINY)
    else:  # "side": precomputed, already normalized
      x = load(side_ref.at[jnp.int32(ch.index)])
    term = x[:, None] * w1_ref[f, :][None, :]
    h = term if h is None else h + term
  h = jax.nn.relu(h + b1_ref[...][None, :])
  for (w_ref, b_ref), use_dot in zip(hidden, dot_layers):
    if use_dot:
      z = jnp.dot(h, w_ref[...], precision=precision, preferred_element_type=jnp.float32)
    else:
      # Triton cannot index a register tensor's column: a broadcast [B, a, c] product
      # reduced over a is the narrow-layer matmul.
      z = jnp.sum(h[:, :, None] * w_ref[...][None, :, :], axis=1)
    h = jax.nn.relu(z + b_ref[...][None, :])
  # Output width 2 is below tl.dot's minimum: two row reductions.
  d = jnp.sum(h * wo_ref[0, :][None, :], axis=1) + bo_ref[0]
  s = jnp.sum(h * wo_ref[1, :][None, :], axis=1) + bo_ref[1]
  log_scale = jnp.clip(exp_mult * s, -MAX_LOG_SCALE, MAX_LOG_SCALE)
  u = d * jnp.exp(log_scale) * sc_ref[1]
  if has_wd:
    u = u - sc_ref[2] * p
  if has_scale:
    u = u * sc_ref[3]
  plt.store(u_ref, u.astype(u_ref.dtype), mask=valid)


def leaf_update(g: jax.Array, p: jax.Array, moments: Optional[jax.Array],
                side: Optional[jax.Array], *, channels: tuple, momentum_rows: Sequence[int] = (),
                nu_row: Optional[int] = None, w_in: jax.Array,
                b_in: jax.Array, hidden: tuple, w_out: jax.Array, b_out: jax.Array,
                scalars: LeafScalars, exp_mult: float, has_wd: bool, has_scale: bool,
                interpret: bool = False, block_size: int = 256, num_warps: int = 4,
                precision=None) -> jax.Array:
  """The update of one tensor, computed by the fused kernel.

  `u = out_scale * (d * exp(clip(exp_mult * s, +-40)) * step - weight_decay * p)` with
  `(d, s) = MLP(x)`, `x_f = raw_f * w_in[f]` (normalizer folded into `w_in`), ReLU after
  every hidden layer (Metz et al. 2022, "Practical tradeoffs between memory, compute,
  and performance in learned optimizers").

  Args:
    g: gradient, any shape, any float dtype (sanitized in the kernel).
    p: parameter, same shape.
    moments: the advanced accumulators `[A, *shape]` float32 (`FeatureState.moments`: one
      array, so the kernel reads rows of it and XLA copies no slices), or None.
    side: precomputed, normalized channels `[S, *shape]` float32, or None.
    channels: tuple of `Channel`, one per row of `w_in`, in the network's input order.
    momentum_rows: row of `moments` holding momentum k (what "momentum"/"adam" channel
      k reads).
    nu_row: row of `moments` holding the second moment ("rms"/"adam"), or None.
    w_in: first-layer weights `[F, H1]`, rows already divided by the channel RMS.
    b_in: first-layer bias `[H1]` (per-tensor and global features folded in).
    hidden: tuple of `(w [H_i, H_{i+1}], b [H_{i+1}])` for the later hidden layers.
    w_out, b_out: output layer `[H_last, 2]`, `[2]`: direction and log-magnitude.
    scalars: `LeafScalars` of this tensor.
    exp_mult: multiplier of the log-magnitude.
    has_wd, has_scale: whether the weight-decay and out_scale terms apply (static).
    interpret: run in Pallas interpret mode (CPU, tests).
    block_size: coordinates per program (a power of two >= 16).
    num_warps: Triton warps per program.
    precision: `jax.lax.Precision` of the hidden-layer dots on GPU (DEFAULT: TF32).

  Returns:
    The update, shaped and typed like `p`.
  """
  if plt is None:
    raise RuntimeError("jax.experimental.pallas.triton is unavailable in this jax build; "
                       "use the XLA path (fused='xla')")
  if block_size < _MIN_DOT or block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two >= {_MIN_DOT}, got {block_size}")
  shape, n = p.shape, p.size
  if g.shape != shape:
    raise ValueError(f"gradient shape {g.shape} != parameter shape {shape}")
  needs_rows = any(c.kind in ("momentum", "adam", "rms") for c in channels)
  if needs_rows and moments is None:
    raise ValueError("momentum/adam/rms channels need `moments`")
  if w_in.shape[0] != len(channels):
    raise ValueError(f"w_in has {w_in.shape[0]} rows but {len(channels)} channels were given")
  # Pad widths to powers of two (Triton's rule); zero weights keep padded units at 0.
  widths = [w_in.shape[1]] + [w.shape[1] for w, _ in hidden]
  padded = [_next_pow2(max(h, 1)) for h in widths]
  w1 = _pad_to(w_in.astype(jnp.float32), (len(channels), padded[0]))
  b1 = _pad_to(b_in.astype(jnp.float32), (padded[0],))
  hid, dot_layers = [], []
  for (w, b), a, c in zip(hidden, padded[:-1], padded[1:]):
    hid += [_pad_to(w.astype(jnp.float32), (a, c)), _pad_to(b.astype(jnp.float32), (c,))]
    dot_layers.append(a >= _MIN_DOT and c >= _MIN_DOT)
  wo = _pad_to(w_out.astype(jnp.float32).T, (2, padded[-1]))
  sc = jnp.stack([jnp.asarray(x, jnp.float32) for x in scalars])

  grid = (pl.cdiv(n, block_size),)
  vec = pl.BlockSpec((block_size,), lambda i: (i,))
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  ins, specs = [g.reshape(n), p.reshape(n)], [vec, vec]
  if moments is not None:
    ins.append(moments.reshape(moments.shape[0], n))
    specs.append(pl.BlockSpec((moments.shape[0], block_size), lambda i: (0, i)))
  if side is not None:
    ins.append(side.reshape(side.shape[0], n))
    specs.append(pl.BlockSpec((side.shape[0], block_size), lambda i: (0, i)))
  small = [w1, b1, *hid, wo, b_out.astype(jnp.float32), sc]
  ins += small
  specs += [full(a) for a in small]
  kernel = functools.partial(
      _kernel, channels=tuple(channels), n=n, block=block_size, n_hidden=len(hidden),
      dot_layers=tuple(dot_layers), exp_mult=float(exp_mult),
      momentum_rows=tuple(momentum_rows), nu_row=nu_row, has_moments=moments is not None,
      has_side=side is not None, has_wd=bool(has_wd),
      has_scale=bool(has_scale), precision=precision)
  compiler_params = None
  if not interpret:
    compiler_params = plt.CompilerParams(num_warps=num_warps, num_stages=1)
  out = pl.pallas_call(
      kernel, grid=grid, in_specs=specs,
      out_specs=vec, out_shape=jax.ShapeDtypeStruct((n,), p.dtype),
      interpret=interpret, compiler_params=compiler_params)(*ins)
  return out.reshape(shape)
