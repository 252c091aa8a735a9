"""The meta-trainer interface, and `MetaTrainer`, its in-process implementation.

A trainer owns the estimators (worker side) and the outer optimizer (learner side) and
offers one interface that the run loop (`run/runner.py`) drives, whatever runs the
estimates: `MetaTrainer` here in this process, `distributed.pool.RayMetaTrainer` on Ray
actors. Both take their keys from `outer.run_keys` / `outer.estimate_key` and combine
estimates with `estimators.base.combine_estimates`, so with a fixed seed they run the
same outer steps.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import optax

from learned_opt.meta_train.estimators.base import combine_estimates
from learned_opt.meta_train.learner import outer
from learned_opt.meta_train.learner.outer import LearnerState


class Trainer(abc.ABC):
  """What the run loop needs of a meta-trainer.

  Attributes:
    estimators: one `GradientEstimator` per task family.
    optimizer: the outer optax transform (see `outer.make_outer_optimizer`).
    accumulate: estimates per estimator averaged into one outer update.

  `states` (what `init` and `step` return next to the learner) is the trainer's own
  handle on the pools; `gather_states` turns it into the pools in the in-process layout
  (one state per estimator, tasks in global order), which is what run checkpoints hold,
  and `scatter_states` turns such a list back into a handle, so a run resumes with any
  trainer and any number of workers.
  """

  def __init__(self, estimators: Sequence[Any], optimizer: optax.GradientTransformation, *,
               accumulate: int = 1):
    if not estimators:
      raise ValueError(f"{type(self).__name__} needs at least one estimator, got none")
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
      raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
    self.estimators = list(estimators)
    self.optimizer = optimizer
    self.accumulate = accumulate

  @property
  def lopt(self):
    """The learned optimizer being meta-trained."""
    return self.estimators[0].lopt

  @property
  def inner_steps_per_outer_step(self) -> int:
    """Inner steps (tasks x 2 signs x K) run per outer step."""
    return self.accumulate * sum(2 * e.num_tasks * e.unroll_length for e in self.estimators)

  def init_meta_params(self, seed: int, meta_params: Any | None = None) -> Any:
    """`meta_params`, or a fresh initialization from the run's theta key."""
    if meta_params is None:
      meta_params = self.lopt.init_meta_params(outer.run_keys(seed).theta)
    return meta_params

  @abc.abstractmethod
  def init(self, seed: int, meta_params: Any | None = None) -> tuple[LearnerState, Any]:
    """Learner state and pool states for run seed `seed` (theta from `meta_params`, or
    initialized from the seed)."""

  @abc.abstractmethod
  def step(self, seed: int, learner: LearnerState, states: Any) -> tuple[LearnerState, Any, dict]:
    """One outer step: estimates from every estimator, then one outer update; returns
    the new learner, pool states and scalar metrics."""

  @abc.abstractmethod
  def gather_states(self, states: Any, meta_params: Any | None = None) -> list:
    """The pools in the in-process layout (what a run checkpoint stores)."""

  @abc.abstractmethod
  def scatter_states(self, pool_states: Sequence[Any]) -> Any:
    """Pools in the in-process layout (e.g. from a checkpoint) -> this trainer's states."""

  def close(self) -> None:
    """Releases what the trainer holds (workers, a Ray it started)."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class MetaTrainer(Trainer):
  """In-process meta-training: the estimators run in this process.

  Args:
    estimators: one `GradientEstimator` per task family.
    optimizer: the outer optax transform (see `outer.make_outer_optimizer`).
    accumulate: estimates per estimator averaged into one outer update.
  """

  def init(self, seed: int, meta_params: Any | None = None) -> tuple[LearnerState, list]:
    meta_params = self.init_meta_params(seed, meta_params)
    learner = outer.init_learner(meta_params, self.optimizer)
    states = [e.init(outer.pool_key(seed, f), meta_params) for f, e in enumerate(self.estimators)]
    return learner, states

  def step(self, seed: int, learner: LearnerState, states: list) -> tuple[LearnerState, list, dict]:
    steps_key = outer.run_keys(seed).steps
    estimates, states = [], list(states)
    for j in range(self.accumulate):
      for f, est in enumerate(self.estimators):
        key = outer.estimate_key(steps_key, learner.step, j, f)
        states[f], e = est.estimate(key, learner.meta_params, states[f])
        estimates.append(e)
    combined = estimates[0] if len(estimates) == 1 else combine_estimates(estimates)
    learner, metrics = outer.apply_estimate(self.optimizer, learner, combined)
    return learner, states, metrics

  def gather_states(self, states: list, meta_params: Any | None = None) -> list:
    del meta_params  # in-process pools are always initialized
    return list(states)

  def scatter_states(self, pool_states: Sequence[Any]) -> list:
    if len(pool_states) != len(self.estimators):
      raise ValueError(f"expected pool states for {len(self.estimators)} estimators, got "
                       f"{len(pool_states)}")
    return list(pool_states)
