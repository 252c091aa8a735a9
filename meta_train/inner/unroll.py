"""The unroll engine: inner-task states advanced K steps at a time by a learned optimizer.

Each step is `loop.inner_step`, the step every lopt trainer takes.

One *member* is one inner task trained by one (possibly perturbed) copy of the
meta-parameters. `unroll_member` advances a member `num_steps` inner steps under
`lax.scan`; `map_population` runs it over a population of members, either vectorized
(`jax.vmap`) or sequentially (`lax.map`), whichever is faster on the backend.

A task that reaches its horizon, or whose loss stops being finite, is replaced by a
fresh task prepared once per truncation (`new_inner_state`) outside the scan, so a
reset inside the scan is a cheap select rather than a re-initialization at every step.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.meta_train.inner import loop
from learned_opt.tasks.base import TaskFamily

MetaParams = Any
POPULATION_MAPS = ("auto", "vmap", "map")
META_LOSS_SPLITS = ("train", "test")


@struct.dataclass
class InnerState:
  """One inner task in the middle of training.

  Attributes:
    cfg: the task config sampled from the family (array pytree).
    params: the inner model's parameters.
    opt_state: the learned optimizer's state for `params`.
    step: int32 []: inner steps taken in this task's life.
    horizon: int32 []: inner steps this task lives before it is reset.
    data_key: PRNG key; the batch of step s is drawn from fold_in(data_key, s), so the
      + and - members of a pair, which share this key, see the same batches.
  """
  cfg: Any
  params: Any
  opt_state: Any
  step: jax.Array
  horizon: jax.Array
  data_key: jax.Array


class UnrollOutput(NamedTuple):
  """Per-step outputs of one member's truncation, each of shape [num_steps]."""
  meta_loss: jax.Array   # normalized meta-loss term of each step (finite, in [0, 4])
  reset: jax.Array       # bool: a fresh task started at this step
  diverged: jax.Array    # bool: the inner training loss was not finite at this step


def new_inner_state(family: TaskFamily, lopt, meta_params: MetaParams, key: jax.Array,
                    horizon: jax.Array) -> InnerState:
  """Samples a task config, initializes its parameters and the optimizer state.

  Args:
    family: the task family to sample from.
    lopt: the learned optimizer (`LearnedOptimizer` contract).
    meta_params: the meta-parameters the optimizer state is initialized with.
    key: PRNG key; the same key gives the same task, parameters and batches.
    horizon: int32 [] number of inner steps the task will live.
  """
  k_cfg, k_init, k_data = jax.random.split(key, 3)
  cfg = family.sample(k_cfg)
  params = family.task(cfg).init(k_init)
  opt_state = lopt.init(meta_params, params, num_steps=horizon)
  return InnerState(cfg=cfg, params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                    horizon=jnp.asarray(horizon, jnp.int32), data_key=k_data)


def _select(pred: jax.Array, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def unroll_member(family: TaskFamily, lopt, meta_params: MetaParams, state: InnerState,
                  fresh: InnerState, *, num_steps: int,
                  meta_loss_split: str = "train") -> tuple[InnerState, UnrollOutput]:
  """Advances one inner task `num_steps` steps with the learned optimizer.

  At the start of each step, a task past its horizon is replaced by `fresh`. The
  meta-loss term of a step is the task-normalized training loss of the parameters
  before the update ("train"), or the normalized loss of the updated parameters on a
  batch of the test split ("test"; one extra forward pass per step).

  Args:
    family: the task family `state.cfg` was sampled from.
    lopt: the learned optimizer.
    meta_params: this member's (possibly perturbed) meta-parameters.
    state: the member's inner state.
    fresh: the state to restart from if the task ends during this truncation.
    num_steps: inner steps to take (static).
    meta_loss_split: "train" or "test", see above.

  Returns:
    The advanced state and the per-step `UnrollOutput`.
  """

  needs_value_fn = getattr(lopt, "needs_value_fn", False)
  update = lambda grads, opt_state, params, **extra: lopt.update(meta_params, grads, opt_state,
                                                                 params, **extra)

  def step(state: InnerState, _):
    reset = state.step >= state.horizon
    state = _select(reset, fresh, state)
    task = family.task(state.cfg)
    k_batch, k_lopt, k_val = jax.random.split(jax.random.fold_in(state.data_key, state.step), 3)
    # The "saferate" feature bounds the loss along a direction: the step's own batch.
    params, opt_state, loss = loop.inner_step(
        task, update, state.params, state.opt_state, batch_key=k_batch, update_key=k_lopt,
        batch=task.batch(k_batch, "train"), with_value_fn=needs_value_fn)
    if meta_loss_split == "train":
      term = task.normalize(loss)
    else:
      term = task.normalize(task.loss(params, k_val, task.batch(k_val, meta_loss_split)))
    diverged = ~jnp.isfinite(loss)
    # A diverged task is ended early: its next step restarts from `fresh`, so blown-up
    # parameters never linger in the pool (their loss terms read as the normalizer's cap).
    next_step = jnp.where(diverged, state.horizon, state.step + 1)
    new_state = state.replace(params=params, opt_state=opt_state, step=next_step)
    return new_state, UnrollOutput(term, reset, diverged)

  return jax.lax.scan(step, state, None, length=num_steps)


def resolve_population_map(mode: str) -> str:
  """Maps "auto" to the faster population layout for the current backend.

  On CPU, members run one after the other (`lax.map`): every member has its own copy
  of the meta-parameters, so vmapping turns the optimizer's and the model's matmuls
  into batched matmuls with per-member weights, which XLA:CPU runs slower than the
  same matmuls one member at a time. benchmarks/meta_train.py (mlp_synthetic,
  PerParamMLP(32, 32), 10-step truncations, 2 shared cores) measured lax.map at 9.9x
  vmap with 8 tasks and 1.4x with 16; lax.map vectorizing pairs of members (batch_size
  2) fell in between. On accelerators `vmap` fills the device; that choice is reasoned,
  not yet measured here.

  With XLA's defaults (2026-12, idle 2 cores) the two layouts tie for `HierarchicalLOpt`
  (968-1020 inner steps/s at 8-16 tasks on mlp_synthetic); with the YNN dot fusion
  (`LOPT_CPU_YNN=1`) `vmap` ran it 1.6x faster there, but a conv task 1.8x slower and a
  vmapped LSTM task deadlocked (benchmarks/README.md), so "auto" stays `lax.map`.
  """
  if mode not in POPULATION_MAPS:
    raise ValueError(f"unknown population_map {mode!r}; expected one of {POPULATION_MAPS}")
  if mode != "auto":
    return mode
  return "map" if jax.default_backend() == "cpu" else "vmap"


def map_population(fn: Callable, *args, mode: str = "auto", batch_size: int | None = None):
  """Applies `fn` to every member along the leading axis of `args`.

  Args:
    fn: function of one member's slices of `args`.
    *args: pytrees whose leaves share a leading population axis.
    mode: "vmap", "map" (`lax.map`, members in sequence) or "auto" (see
      `resolve_population_map`).
    batch_size: with "map", members vectorized together per loop iteration.
  """
  mode = resolve_population_map(mode)
  if mode == "vmap":
    return jax.vmap(fn)(*args)
  return jax.lax.map(lambda a: fn(*a), args, batch_size=batch_size)
