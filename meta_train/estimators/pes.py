"""Persistent evolution strategies (PES): unbiased ES over a sequence of truncations.

Each task keeps two inner states, one trained with theta + eps, one with theta - eps,
where eps is drawn afresh every truncation; `accum` holds the sum of the task's past
perturbations since it started. For a truncation with fresh noise eps_i,

    g = mean_i (L+_i - L-_i) / (2 sigma^2) * (accum_i + eps_i),

which, summed over the truncations of a task's life, is unbiased for the gradient of
the smoothed full-horizon objective (Vicol et al., 2021, "Unbiased Gradient Estimation
in Unrolled Computation Graphs with Persistent Evolution Strategies", Alg. 2).

When a task ends inside a truncation, the losses after the reset depend only on this
truncation's eps, so they are weighted by eps alone and the accumulator restarts at
eps: the estimator stays unbiased with staggered resets.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.meta_train.estimators import base as base
from learned_opt.meta_train.inner.unroll import InnerState


@struct.dataclass
class PESState:
  """Pool states of the + and - members (leaves [n, 2, ...]), the accumulated
  perturbations (meta-params-shaped leaves [n, ...]) and global indices int32 [n]."""
  pool: InnerState
  accum: Any
  index: jax.Array


class PES(base.GradientEstimator):
  """Antithetic PES; see the module docstring and `GradientEstimator`."""

  def _init(self, key, meta_params, indices) -> PESState:
    pool = self._new_pool(key, meta_params, indices)
    pool = jax.tree.map(lambda x: jnp.repeat(x[:, None], 2, axis=1), pool)
    accum = jax.tree.map(lambda t: jnp.zeros((indices.shape[0],) + jnp.shape(t), jnp.result_type(t)),
                         meta_params)
    return PESState(pool=pool, accum=accum, index=indices)

  def _estimate(self, key, meta_params, state: PESState):
    n = state.index.shape[0]
    eps_keys, fresh_keys = self._task_keys(key, state.index)
    eps = self._perturbations(eps_keys, meta_params)
    accum = jax.tree.map(jnp.add, state.accum, eps)
    # Members run theta +- eps; the states they continue from carry the effect of the
    # earlier perturbations, which is why the loss difference is weighted by accum.
    states, out = self._unroll_pairs(base.pair_params(meta_params, eps), state.pool, fresh_keys)
    # Steps at or after the first reset of this truncation (same for both members).
    after = jnp.cumsum(out.reset[:, 0], axis=-1) > 0                # [n, K]
    k = self.unroll_length
    before_loss = jnp.sum(out.meta_loss * ~after[:, None], axis=-1) / k   # [n, 2]
    after_loss = jnp.sum(out.meta_loss * after[:, None], axis=-1) / k
    d_before, c_before = self._robust_diff(before_loss[:, 0] - before_loss[:, 1])
    d_after, c_after = self._robust_diff(after_loss[:, 0] - after_loss[:, 1])
    scale = 1.0 / (2.0 * self.sigma**2)
    grad_sum = jax.tree.map(jnp.add, base.weighted_sum(d_before * scale, accum),
                            base.weighted_sum(d_after * scale, eps))
    counts = {name: c_before[name] + c_after[name] for name in c_before}
    was_reset = after[:, -1]
    new_accum = jax.tree.map(
        lambda a, e: jnp.where(was_reset.reshape((n,) + (1,) * (a.ndim - 1)), e, a), accum, eps)
    meta_loss = jnp.mean(before_loss + after_loss, axis=-1)
    return (PESState(pool=states, accum=new_accum, index=state.index),
            self._finish(grad_sum, meta_loss, counts, out, n))
