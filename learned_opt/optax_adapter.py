"""`to_optax`: run a learned optimizer as an `optax.GradientTransformationExtraArgs`."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from learned_opt.base import LearnedOptimizer


class LOptOptaxState(NamedTuple):
  """State of `to_optax`: the learned optimizer's state and a step count for PRNG keys."""
  inner: Any
  count: jax.Array  # int32 []


def to_optax(lopt: LearnedOptimizer, meta_params, *, num_steps: Optional[int] = None,
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps a learned optimizer and its meta-parameters as an optax transform.

  The returned transform's `update(updates, state, params, *, loss=None, key=None,
  value_fn=None, **extra)` takes the gradients as `updates` and returns additive updates,
  so it composes inside `optax.chain`, which forwards `loss`/`value_fn`/`key` to it: e.g.
  after `optax.clip_by_global_norm`. Its outputs are already signed steps (no
  `optax.scale(-lr)` follows), so decoupled weight decay after it is
  `optax.add_decayed_weights(-lr * wd)`; L2 regularization goes before it.
  Params may be any pytree (linen dicts, `nnx.State`) of float32 or bfloat16 leaves; the
  optimizer state is float32 and updates come back in each parameter's dtype.

  Args:
    lopt: the learned optimizer architecture.
    meta_params: its meta-parameters (e.g. from `learned_opt.load`).
    num_steps: the training horizon. Needed only by optimizers with a training-fraction
      feature (they raise if it is missing); past the horizon the training fraction
      stays at 1, i.e. the optimizer keeps behaving as at the end of training.
    seed: seed of the PRNG keys used when `update` gets no `key` (the key of step t is
      `fold_in(PRNGKey(seed), t)`, so runs are reproducible).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  if not isinstance(lopt, LearnedOptimizer):
    raise TypeError(f"to_optax expects a LearnedOptimizer, got {type(lopt).__name__}")

  def init_fn(params):
    return LOptOptaxState(lopt.init(meta_params, params, num_steps=num_steps),
                          jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, loss=None, key=None, value_fn=None, **extra):
    del extra  # other transforms' extra args (optax.chain passes everything to everyone)
    if params is None:
      raise ValueError("learned optimizers read parameter values: call "
                       "update(grads, state, params) with params, got params=None")
    if key is None:
      key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count)
    if loss is not None:
      loss = jnp.asarray(loss, jnp.float32)
    new_updates, inner = lopt.update(meta_params, updates, state.inner, params, loss=loss,
                                     key=key, value_fn=value_fn)
    return new_updates, LOptOptaxState(inner, state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
