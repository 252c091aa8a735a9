"""`to_optax`: run a learned optimizer as an `optax.GradientTransformationExtraArgs`.

Two kinds of learned optimizer meet optax here. Most set their own step size: their
update is the whole step. Those whose class sets `takes_learning_rate = True` (e.g.
`learned_opt.NormalizedMLP`) output a direction of fixed size and take the step size
from the user: `scale_by_learned_direction` is that direction as an optax `scale_by_*`
transform, and `to_optax(..., learning_rate=...)` follows it with the learning rate.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from learned_opt.base import LearnedOptimizer


class LOptOptaxState(NamedTuple):
  """State of `to_optax`: the learned optimizer's state and a step count for PRNG keys."""
  inner: Any
  count: jax.Array  # int32 []


def takes_learning_rate(lopt_or_cls) -> bool:
  """Whether a learned optimizer (or its class) takes its step size from the user."""
  cls = lopt_or_cls if isinstance(lopt_or_cls, type) else type(lopt_or_cls)
  return cls.takes_learning_rate is True if issubclass(cls, LearnedOptimizer) else False


def _transform(lopt: LearnedOptimizer, meta_params, step: Callable, *, num_steps, seed
               ) -> optax.GradientTransformationExtraArgs:
  """init/update around `step = lopt.update` or `lopt.direction` (same arguments)."""

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
    new_updates, inner = step(meta_params, updates, state.inner, params, loss=loss,
                              key=key, value_fn=value_fn)
    return new_updates, LOptOptaxState(inner, state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_lopt(lopt) -> None:
  if not isinstance(lopt, LearnedOptimizer):
    raise TypeError(f"expected a LearnedOptimizer, got {type(lopt).__name__}")


def scale_by_learned_direction(lopt: LearnedOptimizer, meta_params, *,
                               num_steps: Optional[int] = None,
                               seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The direction of a learned optimizer that takes a learning rate, as optax's
  `scale_by_*` transforms output it: signed like the gradient, so
  `optax.scale_by_learning_rate(lr)` (which multiplies by `-lr`) follows it, with
  `optax.add_decayed_weights(wd)` in between for decoupled weight decay.

  Args:
    lopt: a learned optimizer whose class sets `takes_learning_rate = True` (it
      implements `direction(meta_params, grads, state, params, *, loss, key, value_fn)`).
    meta_params: its meta-parameters.
    num_steps, seed: as in `to_optax`.

  Raises:
    ValueError: `lopt` sets its own step size (use `to_optax` without a learning rate).
  """
  _check_lopt(lopt)
  if not takes_learning_rate(lopt):
    raise ValueError(f"{type(lopt).__name__} sets its own step size (it does not take a "
                     "learning rate), so it has no direction to scale; use "
                     "learned_opt.to_optax(lopt, meta_params) without learning_rate")
  lopt = lopt.at_use()  # e.g. a NormalizedMLP's direction, outside its meta-training harness
  return _transform(lopt, meta_params, lopt.direction, num_steps=num_steps, seed=seed)


def to_optax(lopt: LearnedOptimizer, meta_params, *, num_steps: Optional[int] = None,
             seed: int = 0, learning_rate: Optional[optax.ScalarOrSchedule] = None
             ) -> optax.GradientTransformationExtraArgs:
  """Wraps a learned optimizer and its meta-parameters as an optax transform.

  The returned transform's `update(updates, state, params, *, loss=None, key=None,
  value_fn=None, **extra)` takes the gradients as `updates` and returns additive updates,
  so it composes inside `optax.chain`, which forwards `loss`/`value_fn`/`key` to it: e.g.
  after `optax.clip_by_global_norm`. Its outputs are already signed steps (no
  `optax.scale(-lr)` follows), so decoupled weight decay after it is
  `optax.add_decayed_weights(-lr * wd)`; L2 regularization goes before it.
  Params may be any pytree (linen dicts, `nnx.State`) of float32 or bfloat16 leaves; the
  optimizer state is float32 and updates come back in each parameter's dtype.

  A learned optimizer whose class sets `takes_learning_rate = True` needs
  `learning_rate`: the result is then `optax.chain(scale_by_learned_direction(...),
  optax.scale_by_learning_rate(learning_rate))`, the step `-lr_t * direction`. For
  decoupled weight decay put `optax.add_decayed_weights(wd)` between the two, or use the
  architecture's own factory (`learned_opt.normalized_mlp`, which also has the
  Newton-Schulz / AdamW harness).

  Args:
    lopt: the learned optimizer architecture.
    meta_params: its meta-parameters (e.g. from `learned_opt.load`).
    num_steps: the training horizon. Needed only by optimizers with a training-fraction
      feature (they raise if it is missing); past the horizon the training fraction
      stays at 1, i.e. the optimizer keeps behaving as at the end of training.
    seed: seed of the PRNG keys used when `update` gets no `key` (the key of step t is
      `fold_in(PRNGKey(seed), t)`, so runs are reproducible).
    learning_rate: a scalar, a traced array or an optax schedule (step -> rate); given
      exactly when the optimizer takes a learning rate.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: a learning rate is missing for an optimizer that takes one, given to
      one that sets its own step size, or a Python number <= 0.
  """
  _check_lopt(lopt)
  name = type(lopt).__name__
  if not takes_learning_rate(lopt):
    if learning_rate is not None:
      raise ValueError(f"{name} sets its own step size and takes no learning rate, got "
                       f"learning_rate={learning_rate!r}; call to_optax without it")
    return _transform(lopt, meta_params, lopt.update, num_steps=num_steps, seed=seed)
  if learning_rate is None:
    raise ValueError(f"{name} outputs a unit-RMS direction and takes its step size from "
                     "the user: pass to_optax(..., learning_rate=...) (a float, e.g. 1e-3, "
                     "or an optax schedule such as learned_opt.baselines.warmup_cosine(1e-2, "
                     "num_steps))")
  if isinstance(learning_rate, bool) or (isinstance(learning_rate, (int, float))
                                         and not learning_rate > 0):
    raise ValueError(f"learning_rate must be a number > 0 or a schedule, got {learning_rate!r}")
  own = lopt.with_learning_rate(meta_params, learning_rate, num_steps=num_steps, seed=seed)
  if own is not None:  # the optimizer runs inside a harness it was meta-trained in
    return own
  return optax.chain(scale_by_learned_direction(lopt, meta_params, num_steps=num_steps,
                                                seed=seed),
                     optax.scale_by_learning_rate(learning_rate))
