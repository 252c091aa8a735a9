"""The accumulators behind the features: momenta, second moment, Adafactor factors, loss EMAs.

Each leaf's momenta and EMA of g^2 live in ONE array `[K + 1, *shape]` (`FeatureState.
moments`), so one elementwise loop advances them all and reads the gradient once (XLA:CPU
fuses no sibling loops); `momenta`, `second_moment` and `moment_rows` read it.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from learned_opt.base import horizon_array

# `spec` arguments are `learned_opt.features.FeatureSpec`s, named in annotations only:
# features.py imports this module, so importing it back would be a cycle.


class FeatureState(NamedTuple):
  """Accumulators behind the features; unused ones are empty tuples."""
  step: jax.Array        # int32 []
  num_steps: jax.Array   # float32 [] (inf when no horizon was given)
  moments: Any           # per leaf [A, *shape]: the K momenta (if used), then the EMA of
                         # g^2 (if used); one array so one loop advances all of them
  rows: Any              # per leaf [prod(shape[:-1])] (matrices) or [] (others)
  cols: Any              # per leaf [shape[-1]] (matrices) or []
  loss_ema: jax.Array    # float32 [len(loss_decays)]
  loss_first: jax.Array  # float32 []


def is_matrix(shape) -> bool:
  return len(shape) >= 2 and shape[-1] > 1 and math.prod(shape[:-1]) > 1


def float32_zeros(shape):
  return jnp.zeros(shape, jnp.float32)


def init_state(spec: FeatureSpec, params, num_steps) -> FeatureState:
  """Zero accumulators for `params`; `num_steps` as given to `LearnedOptimizer.init`."""
  leaves = jax.tree.leaves(params)
  a = len(moment_decays(spec))
  moments = [float32_zeros((a, *jnp.shape(p))) for p in leaves] if a else ()
  rows, cols = (), ()
  if "adafactor" in spec.features:
    shapes = [jnp.shape(p) for p in leaves]
    rows = [float32_zeros((math.prod(s[:-1]),)) if is_matrix(s) else float32_zeros(())
            for s in shapes]
    cols = [float32_zeros((s[-1],)) if is_matrix(s) else float32_zeros(()) for s in shapes]
  return FeatureState(
      step=jnp.zeros((), jnp.int32),
      num_steps=horizon_array(num_steps, required=spec.needs_horizon, who="this optimizer"),
      moments=moments, rows=rows, cols=cols,
      loss_ema=float32_zeros((len(spec.loss_decays),)), loss_first=float32_zeros(()))


def moment_decays(spec: FeatureSpec) -> tuple[float, ...]:
  """Decays of the rows of `FeatureState.moments`: the momenta's, then `rms_decay`."""
  return ((spec.momentum_decays if spec.needs_momenta else ())
          + ((spec.rms_decay,) if spec.needs_nu else ()))


def moment_rows(spec: FeatureSpec) -> tuple[tuple[int, ...], Optional[int]]:
  """Rows of `FeatureState.moments[i]`: one per momentum decay (empty if none is kept),
  and the second moment's (None if not kept)."""
  k = len(spec.momentum_decays) if spec.needs_momenta else 0
  return tuple(range(k)), (k if spec.needs_nu else None)


def momenta(spec: FeatureSpec, state: FeatureState, i: int) -> list:
  """Leaf `i`'s K momenta (one array per decay in `spec.momentum_decays`)."""
  if not spec.needs_momenta:
    raise ValueError(f"features {spec.features} keep no momenta")
  return [state.moments[i][r] for r in moment_rows(spec)[0]]


def second_moment(spec: FeatureSpec, state: FeatureState, i: int) -> jax.Array:
  """Leaf `i`'s EMA of the squared gradient (decay `spec.rms_decay`)."""
  if not spec.needs_nu:
    raise ValueError(f"features {spec.features} keep no second moment")
  return state.moments[i][moment_rows(spec)[1]]


def advance_moments(spec: FeatureSpec, acc: jax.Array, g: jax.Array) -> jax.Array:
  """All EMAs of one leaf in one elementwise expression over the stacked `[A, *shape]`.

  Separate arrays cost one loop each, and each loop reads the gradient again (XLA:CPU
  does not fuse sibling loops); a select on the row index keeps it one loop.
  """
  decays = jnp.asarray(moment_decays(spec), jnp.float32).reshape((-1,) + (1,) * g.ndim)
  target = g[None]
  if spec.needs_nu:
    is_square = jnp.arange(acc.shape[0]).reshape(decays.shape) == acc.shape[0] - 1
    target = jnp.where(is_square, jnp.square(g)[None], target)
  return decays * acc + (1.0 - decays) * target


def previous_momentum_sums(sums: jax.Array, decay: float, step: jax.Array) -> jax.Array:
  """[sum g^2, sum m^2, sum g m] with m the momentum BEFORE this step, from the same sums
  over the momentum after it, `m_new = decay * m + (1 - decay) * g`.

  Exact zeros at the first step (m = 0), where the algebra would leave float32 rounding.
  """
  gg, nn, gn = sums[0], sums[1], sums[2]
  a = 1.0 - decay
  gm = (gn - a * gg) / decay
  mm = jnp.maximum(nn - 2.0 * a * gn + a * a * gg, 0.0) / (decay * decay)
  first = step == 0
  return jnp.stack([gg, jnp.where(first, 0.0, mm), jnp.where(first, 0.0, gm)])
