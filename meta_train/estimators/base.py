"""The gradient-estimator template shared by truncated ES and PES.

An estimator is a frozen pytree: the task family's data and the learned optimizer are
its leaves, its settings are static fields. Its state (the pool of inner tasks) is a
separate pytree, so worker-side state never mixes with the learner's (outer optimizer,
checkpoints, logging) and the Ray pool can ship states and estimates around as arrays.

Public `init` and `estimate` are jitted once per estimator configuration; subclasses
write only `_init` and `_estimate` (the evosax template, without jitting `self`).

Reproducibility across worker splits: an estimate depends only on (key, meta_params,
state). Every task folds its *global* pool index into the key, so splitting a pool of
N tasks over workers (each `init` with a slice of `indices`, every worker given the
same key) yields the same per-task results as one worker with all N.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt import compile as lopt_compile
from learned_opt.meta_train.inner import unroll
from learned_opt.meta_train.estimators.truncation import TruncationSchedule
from learned_opt.tasks.base import TaskFamily

MetaParams = Any
EstState = Any
COUNT_NAMES = ("nonfinite", "clipped", "resets", "diverged")


@struct.dataclass
class GradEstimate:
  """One meta-gradient estimate over a (part of a) pool.

  Attributes:
    grad: the estimate of d(meta-loss)/d(meta_params), averaged over this estimate's
      antithetic pairs; a pytree like meta_params.
    meta_loss: [] mean normalized meta-loss of the pairs (average of the two signs).
    num_pairs: [] how many antithetic pairs were averaged (weights when combining).
    counts: int32 [] counters summed over pairs: "nonfinite" (loss differences zeroed),
      "clipped" (differences clipped), "resets" (tasks restarted), "diverged" (task
      steps where a member's inner loss was not finite).
  """
  grad: MetaParams
  meta_loss: jax.Array
  num_pairs: jax.Array
  counts: dict[str, jax.Array]


def combine_estimates(estimates: Sequence[GradEstimate]) -> GradEstimate:
  """Pair-weighted mean of estimates (from accumulation steps or from workers)."""
  if not estimates:
    raise ValueError("combine_estimates needs at least one estimate, got none")
  weights = jnp.stack([e.num_pairs for e in estimates]).astype(jnp.float32)
  total = jnp.sum(weights)
  mean = lambda *xs: sum(w * x for w, x in zip(weights, xs)) / total
  return GradEstimate(
      grad=jax.tree.map(mean, *[e.grad for e in estimates]),
      meta_loss=mean(*[e.meta_loss for e in estimates]),
      num_pairs=jnp.sum(jnp.stack([e.num_pairs for e in estimates])),
      counts={k: sum(e.counts[k] for e in estimates) for k in estimates[0].counts})


def tree_normal(key: jax.Array, tree: Any, std: float) -> Any:
  """Gaussian noise N(0, std^2) shaped like `tree`, one key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                            for k, x in zip(keys, leaves)])


def pair_params(meta_params: MetaParams, eps: MetaParams) -> MetaParams:
  """Stacks theta + eps and theta - eps: leaves [N, 2, ...] from eps leaves [N, ...]."""
  return jax.tree.map(lambda t, e: jnp.stack([t + e, t - e], axis=1), meta_params, eps)


def weighted_sum(weights: jax.Array, tree: Any) -> Any:
  """sum_i weights[i] * tree[i] over the leading axis."""
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), tree)


class GradientEstimator(struct.PyTreeNode, abc.ABC):
  """Antithetic evolution-strategies estimator over a pool of truncated unrolls.

  Attributes:
    family: the task family the pool samples from.
    lopt: the learned optimizer being meta-trained.
    schedule: the truncation schedule (task horizons).
    num_tasks: tasks in the pool (each runs one antithetic pair).
    unroll_length: inner steps per truncation (K).
    sigma: standard deviation of the perturbations epsilon ~ N(0, sigma^2 I).
    meta_loss_split: "train" (training loss of each step) or "test" (loss on a test
      batch after each update) as the meta-loss.
    loss_diff_clip: if set, the loss difference L+ - L- is clipped to [-c, c].
    loss_diff_sign: use only the sign of the loss difference (robust to outliers; the
      estimate's scale then no longer tracks the gradient's).
    stagger: shorten each task's first life by a random offset so that tasks do not
      reset in lock-step (see truncation.py).
    population_map: "vmap", "map" or "auto" (see unroll.resolve_population_map).
    map_batch_size: members vectorized together per `lax.map` iteration.
  """
  family: TaskFamily
  lopt: Any
  schedule: TruncationSchedule
  num_tasks: int = struct.field(pytree_node=False, default=8)
  unroll_length: int = struct.field(pytree_node=False, default=20)
  sigma: float = struct.field(pytree_node=False, default=0.01)
  meta_loss_split: str = struct.field(pytree_node=False, default="train")
  loss_diff_clip: float | None = struct.field(pytree_node=False, default=None)
  loss_diff_sign: bool = struct.field(pytree_node=False, default=False)
  stagger: bool = struct.field(pytree_node=False, default=True)
  population_map: str = struct.field(pytree_node=False, default="auto")
  map_batch_size: int | None = struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
      raise ValueError(f"num_tasks must be a positive int, got {self.num_tasks!r}")
    if not self.sigma > 0:
      raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
    if self.meta_loss_split not in unroll.META_LOSS_SPLITS:
      raise ValueError(f"unknown meta_loss_split {self.meta_loss_split!r}; expected one of "
                       f"{unroll.META_LOSS_SPLITS}")
    if self.loss_diff_clip is not None and not self.loss_diff_clip > 0:
      raise ValueError(f"loss_diff_clip must be > 0 or None, got {self.loss_diff_clip!r}")
    unroll.resolve_population_map(self.population_map)
    self.schedule.check(self.unroll_length)

  # ---- public, jitted ------------------------------------------------------------
  def init(self, key: jax.Array, meta_params: MetaParams, *,
           indices: jax.Array | None = None) -> EstState:
    """The initial pool state.

    Args:
      key: PRNG key of the run; task i is seeded by fold_in(key, i).
      meta_params: meta-parameters the optimizer states are initialized with.
      indices: int32 [n] global indices of the tasks this state holds (default: all
        `num_tasks`); workers of a split pool pass disjoint slices.
    """
    if indices is None:
      indices = jnp.arange(self.num_tasks, dtype=jnp.int32)
    return _jit_init(_classes(self), self, key, meta_params, jnp.asarray(indices, jnp.int32))

  def estimate(self, key: jax.Array, meta_params: MetaParams,
               state: EstState) -> tuple[EstState, GradEstimate]:
    """Advances the pool one truncation and returns the meta-gradient estimate."""
    return _jit_estimate(_classes(self), self, key, meta_params, state)

  # ---- written by subclasses ----------------------------------------------------
  @abc.abstractmethod
  def _init(self, key, meta_params, indices) -> EstState:
    ...

  @abc.abstractmethod
  def _estimate(self, key, meta_params, state) -> tuple[EstState, GradEstimate]:
    ...

  # ---- shared pieces --------------------------------------------------------------
  def _new_pool(self, key, meta_params, indices) -> unroll.InnerState:
    """Fresh tasks [n], task i seeded by fold_in(key, i)."""

    def one(index):
      k_task, k_horizon = jax.random.split(jax.random.fold_in(key, index))
      horizon = (self.schedule.first_horizon(k_horizon, self.unroll_length) if self.stagger
                 else self.schedule.sample_horizon(k_horizon))
      return unroll.new_inner_state(self.family, self.lopt, meta_params, k_task, horizon)

    return jax.vmap(one)(indices)

  def _task_keys(self, key, indices):
    """Per-task (perturbation key, fresh-task key) for this truncation."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(indices)
    return keys[:, 0], keys[:, 1]

  def _perturbations(self, eps_keys, meta_params):
    return jax.vmap(lambda k: tree_normal(k, meta_params, self.sigma))(eps_keys)

  def _unroll_pairs(self, thetas, states, fresh_keys):
    """Unrolls members [N, 2] (leaves [N, 2, ...]); returns states and outputs [N, 2, K].

    Both members of a pair restart, if their task ends, from the same fresh task (same
    config, parameters and batches), with the optimizer state of their own theta.
    """
    n = fresh_keys.shape[0]
    k_fresh, k_horizon = jax.vmap(jax.random.split, out_axes=1)(fresh_keys)
    horizons = jax.vmap(self.schedule.sample_horizon)(k_horizon)
    flat = lambda t: jax.tree.map(lambda x: x.reshape((2 * n,) + x.shape[2:]), t)
    pair = lambda t: jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), t)

    def member(theta, state, k, horizon):
      fresh = unroll.new_inner_state(self.family, self.lopt, theta, k, horizon)
      return unroll.unroll_member(self.family, self.lopt, theta, state, fresh,
                                  num_steps=self.unroll_length,
                                  meta_loss_split=self.meta_loss_split)

    states, out = unroll.map_population(member, flat(thetas), flat(states), pair(k_fresh),
                                        pair(horizons), mode=self.population_map,
                                        batch_size=self.map_batch_size)
    unflat = lambda t: jax.tree.map(lambda x: x.reshape((n, 2) + x.shape[1:]), t)
    return unflat(states), unflat(out)

  def _robust_diff(self, diff):
    """Zeroes non-finite loss differences, then clips or signs them; returns counts."""
    finite = jnp.isfinite(diff)
    diff = jnp.where(finite, diff, 0.0)
    clipped = jnp.zeros((), jnp.int32)
    if self.loss_diff_clip is not None:
      clipped = jnp.sum(jnp.abs(diff) > self.loss_diff_clip).astype(jnp.int32)
      diff = jnp.clip(diff, -self.loss_diff_clip, self.loss_diff_clip)
    if self.loss_diff_sign:
      diff = jnp.sign(diff)
    return diff, {"nonfinite": jnp.sum(~finite).astype(jnp.int32), "clipped": clipped}

  def _finish(self, grad_sum, meta_loss, counts, out, n):
    counts = {**counts,
              "resets": jnp.sum(out.reset[:, 0]).astype(jnp.int32),
              "diverged": jnp.sum(jnp.any(out.diverged, axis=1)).astype(jnp.int32)}
    return GradEstimate(grad=jax.tree.map(lambda g: g / n, grad_sum),
                        meta_loss=jnp.mean(meta_loss),
                        num_pairs=jnp.asarray(n, jnp.int32), counts=counts)


# The classes of the estimator, its optimizer and its family are a static argument: JAX
# (0.10) compares the treedefs of two flax classes with equal static fields as equal
# (`PES` and `TruncatedES` built with the same settings), so a compilation cached for one
# could otherwise serve the other.
def _classes(est) -> tuple[type, ...]:
  return type(est), type(est.lopt), type(est.family)


@lopt_compile.jit(static_argnums=0)
def _jit_init(classes, est, key, meta_params, indices):
  del classes
  return est._init(key, meta_params, indices)


@lopt_compile.jit(static_argnums=0)
def _jit_estimate(classes, est, key, meta_params, state):
  del classes
  return est._estimate(key, meta_params, state)
