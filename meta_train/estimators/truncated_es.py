"""Antithetic truncated evolution strategies over partial unrolls.

Each pool task runs a pair theta + eps_i, theta - eps_i (eps_i ~ N(0, sigma^2 I)) for
one truncation of K inner steps; both members start from the task's current inner
state and see the same batches. With L the mean normalized meta-loss over the
truncation,

    g = mean_i (L+_i - L-_i) / (2 sigma^2) * eps_i,

an unbiased estimate of the gradient of the Gaussian-smoothed *truncated* objective
(Salimans et al., 2017; Metz et al., 2019, "Understanding and correcting pathologies
in the training of learned optimizers"). It ignores how theta shaped the state a
truncation starts from, hence its short-horizon bias; PES (pes.py) removes it.
The pool continues from the + member's state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.meta_train.estimators import base as base
from learned_opt.meta_train.inner.unroll import InnerState


@struct.dataclass
class TruncatedESState:
  """Pool of inner tasks (leaves [n, ...]) and their global indices int32 [n]."""
  pool: InnerState
  index: jax.Array


class TruncatedES(base.GradientEstimator):
  """Antithetic truncated ES; see the module docstring and `GradientEstimator`."""

  def _init(self, key, meta_params, indices) -> TruncatedESState:
    return TruncatedESState(pool=self._new_pool(key, meta_params, indices), index=indices)

  def _estimate(self, key, meta_params, state: TruncatedESState):
    n = state.index.shape[0]
    eps_keys, fresh_keys = self._task_keys(key, state.index)
    eps = self._perturbations(eps_keys, meta_params)
    both = jax.tree.map(lambda x: jnp.repeat(x[:, None], 2, axis=1), state.pool)
    states, out = self._unroll_pairs(base.pair_params(meta_params, eps), both, fresh_keys)
    losses = jnp.mean(out.meta_loss, axis=-1)                      # [n, 2]
    diff, counts = self._robust_diff(losses[:, 0] - losses[:, 1])
    grad_sum = base.weighted_sum(diff / (2.0 * self.sigma**2), eps)
    pool = jax.tree.map(lambda x: x[:, 0], states)
    return (TruncatedESState(pool=pool, index=state.index),
            self._finish(grad_sum, jnp.mean(losses, axis=-1), counts, out, n))
