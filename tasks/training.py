"""Train one task with any optax optimizer: one jitted `lax.scan` over the steps."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from learned_opt import compile as lopt_compile
from learned_opt.tasks.base import Params, Task


class TrainResult(NamedTuple):
  losses: jax.Array        # [num_steps] training loss before each update
  params: Params           # final parameters
  final_loss: jax.Array    # loss of the final parameters on the last batch


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


def scan_steps(task: Task, optimizer: optax.GradientTransformation, params: Params,
               step_keys: jax.Array, *, full_batch: bool) -> tuple[Params, jax.Array]:
  """The inner training loop every lopt trainer shares (traceable, not jitted).

  One `lax.scan` step per key: draw the batch from the key (or use the task's full
  batch), take `value_and_grad` of the loss, and apply the optimizer's update with the
  extra arguments `loss`, `value_fn` and `key`. `train`, the learning-rate tuner and
  the evaluation grid call this, so they see identical batches for identical keys.

  Returns:
    (final params, [len(step_keys)] training loss before each update).
  """
  opt = optax.with_extra_args_support(optimizer)
  fixed_batch = task.full_batch() if full_batch else None

  def step(carry, step_key):
    params, opt_state = carry
    batch = fixed_batch if full_batch else task.batch(step_key)
    value_fn = lambda p: task.loss(p, step_key, batch)
    loss, grads = jax.value_and_grad(value_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params, loss=loss, value_fn=value_fn,
                                    key=step_key)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), step_keys)
  return params, losses


@lopt_compile.jit(static_argnums=(1, 2, 3))
def _train(task, optimizer, num_steps, full_batch, key):
  k_init, k_data = jax.random.split(key)
  params, losses = scan_steps(task, optimizer, task.init(k_init),
                              jax.random.split(k_data, num_steps), full_batch=full_batch)
  last_batch = task.full_batch() if full_batch else task.batch(jax.random.fold_in(k_data, num_steps))
  return TrainResult(losses, params, task.loss(params, k_data, last_batch))


def evaluate(task: Task, params: Params, *, split: str = "test", key: jax.Array | None = None,
             num_batches: int = 8) -> dict[str, float]:
  """Mean loss and metrics over `num_batches` batches of `split` (or its full batch)."""
  key = jax.random.key(0) if key is None else key

  @jax.jit
  def one(k):
    batch = task.batch(k, split)
    return {"loss": task.loss(params, k, batch), **task.metrics(params, batch)}

  stats = jax.vmap(one)(jax.random.split(key, num_batches))
  return {k: float(jnp.mean(v)) for k, v in stats.items()}
