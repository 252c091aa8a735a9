"""Running an optimizer on a task: the one inner step every lopt trainer shares.

`inner_step` is one training step (draw the batch, `value_and_grad`, the optimizer's
update with the extra arguments `loss`, `value_fn` and `key`, apply). `scan_steps` runs
it under `lax.scan`; `train` jits that for one optimizer; `run_grid` vmaps it over a
grid of learning rates and over seeds in one compilation, for tuning and evaluation;
the unroll engine (`unroll.py`) takes the same step with a learned optimizer's
meta-parameters. Same keys, same batches: results agree across all of them.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from learned_opt import compile as lopt_compile
from learned_opt.tasks.base import Params, Task

EVAL_BATCHES = 8
_EVAL_KEY = 2**31 - 1  # seed of the evaluation batches: the same for every optimizer

# Python side effect, counts traces of `run_grid` (tests assert no recompilation).
TRACE_COUNT = [0]

UpdateFn = Callable[..., tuple[Any, Any]]


class TrainResult(NamedTuple):
  losses: jax.Array        # [num_steps] training loss before each update
  params: Params           # final parameters
  final_loss: jax.Array    # loss of the final parameters on the last batch


def inner_step(task: Task, update: UpdateFn, params: Params, opt_state: Any, *,
               batch_key: jax.Array, update_key: jax.Array, batch: Any = None,
               with_value_fn: bool = True) -> tuple[Params, Any, jax.Array]:
  """One training step of `task`; returns (new params, new optimizer state, loss).

  Args:
    task: the inner problem.
    update: `(grads, opt_state, params, *, loss, key[, value_fn]) -> (updates, state)`,
      an optax `update` with extra-args support or a learned optimizer's update with
      its meta-parameters bound.
    params, opt_state: the state before the step.
    batch_key: draws the batch (unless `batch` is given) and keys the loss.
    update_key: the `key` extra argument of the update.
    batch: a fixed batch (full-batch training), else None.
    with_value_fn: pass `value_fn` (params -> loss on this step's batch), what SafeRate
      and line searches read.
  """
  batch = task.batch(batch_key) if batch is None else batch
  value_fn = lambda p: task.loss(p, batch_key, batch)
  loss, grads = jax.value_and_grad(value_fn)(params)
  extra = {"value_fn": value_fn} if with_value_fn else {}
  updates, opt_state = update(grads, opt_state, params, loss=loss, key=update_key, **extra)
  return optax.apply_updates(params, updates), opt_state, loss


def scan_steps(task: Task, optimizer: optax.GradientTransformation, params: Params,
               step_keys: jax.Array, *, full_batch: bool) -> tuple[Params, jax.Array]:
  """`inner_step` once per key under `lax.scan` (traceable, not jitted).

  Each key draws its step's batch (or the task's full batch is used) and is the update's
  `key`. `train`, the learning-rate tuner and the evaluation grid call this, so they see
  identical batches for identical keys.

  Returns:
    (final params, [len(step_keys)] training loss before each update).
  """
  params, _, losses = scan_steps_with_state(task, optimizer, params, step_keys,
                                            full_batch=full_batch)
  return params, losses


def scan_steps_with_state(task: Task, optimizer: optax.GradientTransformation, params: Params,
                          step_keys: jax.Array, *, full_batch: bool):
  """`scan_steps` that also returns the final optimizer state: (params, state, losses)."""
  opt = optax.with_extra_args_support(optimizer)
  fixed_batch = task.full_batch() if full_batch else None

  def step(carry, step_key):
    params, opt_state = carry
    params, opt_state, loss = inner_step(task, opt.update, params, opt_state,
                                         batch_key=step_key, update_key=step_key,
                                         batch=fixed_batch)
    return (params, opt_state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt.init(params)), step_keys)
  return params, opt_state, losses


def train(task: Task, optimizer: optax.GradientTransformation, *, num_steps: int,
          key: jax.Array, full_batch: bool = False) -> TrainResult:
  """Trains `task` for `num_steps` with `optimizer` and returns the loss curve.

  The optimizer's update receives the extra arguments `loss`, `value_fn` (params ->
  loss on the current batch; what SafeRate and line searches use) and `key`; plain
  optax transforms ignore them. Minibatches are drawn inside the scan from the key, so
  the same key gives every optimizer the same batches.

  Args:
    task: the inner problem.
    optimizer: any optax transform (with or without extra args). It is a static
      argument of the compiled loop: reuse one instance to avoid recompiling.
    num_steps: number of updates (static).
    key: PRNG key for the initialization and the batches.
    full_batch: use the task's deterministic full batch at every step.
  """
  return _train(task, optimizer, num_steps, full_batch, key)


@lopt_compile.jit(static_argnums=(1, 2, 3))
def _train(task, optimizer, num_steps, full_batch, key):
  k_init, k_data = jax.random.split(key)
  params, losses = scan_steps(task, optimizer, task.init(k_init),
                              jax.random.split(k_data, num_steps), full_batch=full_batch)
  last_batch = task.full_batch() if full_batch else task.batch(jax.random.fold_in(k_data, num_steps))
  return TrainResult(losses, params, task.loss(params, k_data, last_batch))


def evaluate(task: Task, params: Params, *, split: str = "test", key: jax.Array | None = None,
             num_batches: int = 8) -> dict[str, float]:
  """Mean loss and metrics over `num_batches` batches of `split`."""
  key = jax.random.key(0) if key is None else key

  @jax.jit
  def one(k):
    batch = task.batch(k, split)
    return {"loss": task.loss(params, k, batch), **task.metrics(params, batch)}

  stats = jax.vmap(one)(jax.random.split(key, num_batches))
  return {k: float(jnp.mean(v)) for k, v in stats.items()}


def seed_keys(seeds: int, first_seed: int = 0) -> jax.Array:
  """[seeds] PRNG keys `key(first_seed) ... key(first_seed + seeds - 1)`."""
  if not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds must be a positive int, got {seeds!r}")
  return jax.vmap(jax.random.key)(jnp.arange(first_seed, first_seed + seeds))


@lopt_compile.jit(static_argnames=("make", "num_steps", "full_batch", "final_losses",
                                   "eval_params"))
def run_grid(task, hparams: jax.Array, keys: jax.Array, aux: Any, *, make, num_steps: int,
             full_batch: bool, final_losses: bool = True, eval_params=None):
  """Trains `task` with `make(h, aux, num_steps)` for every h in `hparams` and every key.

  The loop is `train`'s (same key splits, hence the same initialization and batches
  per key, and the same extra arguments); the hyperparameter is traced, and the grid
  and the seeds are vmapped into one compilation (`train` takes the optimizer as a
  static argument, so a grid there would compile once per value).

  Args:
    task: a `Task`.
    hparams: [H] hyperparameter values (learning rates).
    keys: [S] PRNG keys, one per seed.
    aux: pytree of arrays for `make` (a learned optimizer's meta-parameters).
    make: `(h, aux, num_steps) -> optax transform`, hashable (module-level function).
    num_steps: the step budget.
    full_batch: train on the deterministic full batch.
    final_losses: also compute the final train and test losses (else they are None).
    eval_params: `(opt_state, params) -> params` at which the final losses are taken
      (schedule-free optimizers evaluate at another point than they train); None: params.

  Returns:
    (losses [H, S, num_steps] training loss before each update,
     final_train [H, S] final training loss (full batch, or mean of EVAL_BATCHES fixed
     train batches), final_test [H, S] the same on the test split).
  """
  TRACE_COUNT[0] += 1
  eval_keys = jax.random.split(jax.random.key(_EVAL_KEY), EVAL_BATCHES)

  def eval_loss(params, split):
    if full_batch:
      return task.loss(params, eval_keys[0], task.full_batch(split))
    return jnp.mean(jax.vmap(lambda k: task.loss(params, k, task.batch(k, split)))(eval_keys))

  def one(h, key):
    k_init, k_data = jax.random.split(key)
    params, opt_state, losses = scan_steps_with_state(
        task, make(h, aux, num_steps), task.init(k_init), jax.random.split(k_data, num_steps),
        full_batch=full_batch)
    if not final_losses:
      return losses, None, None
    if eval_params is not None:
      params = eval_params(opt_state, params)
    return losses, eval_loss(params, "train"), eval_loss(params, "test")

  return jax.vmap(lambda h: jax.vmap(lambda k: one(h, k))(keys))(hparams)
