"""The learner: the outer optax update of the meta-parameters, and the run's keys.

Learner state (meta-parameters, outer optimizer state, step) is kept apart from worker
state (the estimators' pools). Keys are a pure function of (seed, outer step,
accumulation index, family index) (`run_keys`, `estimate_key`), so any outer step can be
recomputed from a checkpoint, and a pool split over workers (same key to all; tasks
fold in their global index) gives the same estimate. Every trainer (`trainer.py`, the
Ray pool) uses these functions; none derives keys of its own.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from learned_opt.meta_train.estimators.base import GradEstimate

@struct.dataclass
class LearnerState:
  """meta_params: theta; opt_state: the outer optimizer's state; step: int32 []."""
  meta_params: Any
  opt_state: Any
  step: jax.Array


# The outer optimizers a config may name: an explicit table, not a look-up of any
# attribute of optax by string. Python callers can pass the optax factory itself.
OUTER_OPTIMIZERS = {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "lion": optax.lion,
    "rmsprop": optax.rmsprop, "lamb": optax.lamb, "nadam": optax.nadam,
    "adabelief": optax.adabelief, "adagrad": optax.adagrad,
}


def make_outer_optimizer(name="adam", learning_rate: float = 1e-3, *,
                         grad_clip: float | None = 1.0, **options) -> optax.GradientTransformation:
  """An optax optimizer after global-norm clipping (non-finite estimates are skipped by
  `apply_estimate`, whatever the transform).

  Args:
    name: a key of `OUTER_OPTIMIZERS` (e.g. "adam"), or an optax factory called as
      `name(learning_rate, **options)` (e.g. `optax.adamw`).
    learning_rate: outer learning rate.
    grad_clip: clip the estimate's global norm to this before the update; None: off.
    **options: further keyword arguments of the optimizer (b1, weight_decay, ...).
  """
  alias = name if callable(name) else OUTER_OPTIMIZERS.get(name)
  if alias is None:
    raise ValueError(f"unknown outer optimizer {name!r}; expected one of "
                     f"{', '.join(OUTER_OPTIMIZERS)} or an optax factory")
  try:
    inner = alias(learning_rate, **options)
  except TypeError as e:
    raise ValueError(f"outer optimizer {getattr(alias, '__name__', name)!r} rejected options "
                     f"{options!r}: {e}") from e
  if grad_clip is not None:
    inner = optax.chain(optax.clip_by_global_norm(grad_clip), inner)
  return inner


def init_learner(meta_params: Any, optimizer: optax.GradientTransformation) -> LearnerState:
  return LearnerState(meta_params=meta_params, opt_state=optimizer.init(meta_params),
                      step=jnp.zeros((), jnp.int32))


def estimate_key(steps_key: jax.Array, step: jax.Array, accum_index: int, family_index: int) -> jax.Array:
  """The key of one estimate: every worker of a split pool is given this same key."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(steps_key, step), accum_index),
                            family_index)


def apply_estimate(optimizer: optax.GradientTransformation, learner: LearnerState,
                   estimate: GradEstimate) -> tuple[LearnerState, dict[str, jax.Array]]:
  """One outer update; returns the new learner state and scalar metrics.

  A non-finite estimate is skipped (theta and the optimizer state stay as they were,
  the step counter advances, metrics["skipped"] is 1). The guard lives here rather than
  in an `optax.apply_if_finite` wrapper so that any optax transform a caller passes is
  protected, and so a NaN can never reach theta after any number of bad estimates.
  """
  return _apply(optimizer, learner, estimate)


def _apply_impl(optimizer, learner, estimate):
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(estimate.grad)]))
  updates, opt_state = optimizer.update(estimate.grad, learner.opt_state, learner.meta_params)
  meta_params = optax.apply_updates(learner.meta_params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  meta_params, opt_state = keep((meta_params, opt_state), (learner.meta_params, learner.opt_state))
  metrics = {"meta_loss": estimate.meta_loss, "grad_norm": optax.tree.norm(estimate.grad),
             "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
             "skipped": (~finite).astype(jnp.int32),
             **{f"num_{k}": v for k, v in estimate.counts.items()}}
  return LearnerState(meta_params, opt_state, learner.step + 1), metrics


_apply = jax.jit(_apply_impl, static_argnums=0)


class RunKeys(NamedTuple):
  """The keys of a run, all derived from its seed.

  theta: initializes the meta-parameters.
  pool: initializes the estimators' pools (family f: `fold_in(pool, f)`).
  steps: the outer steps' estimates (see `estimate_key`).
  """
  theta: jax.Array
  pool: jax.Array
  steps: jax.Array


def run_keys(seed: int) -> RunKeys:
  """The keys of run `seed`: the one key schedule of every trainer."""
  k_init, k_steps = jax.random.split(jax.random.key(seed))
  k_theta, k_pool = jax.random.split(k_init)
  return RunKeys(k_theta, k_pool, k_steps)


def pool_key(seed: int, family_index: int) -> jax.Array:
  """The key the pool of estimator `family_index` is initialized with."""
  return jax.random.fold_in(run_keys(seed).pool, family_index)
