"""Adam with a per-tensor learning rate adapted online by the hypergradient (`adam_hd`).

Hypergradient descent (Baydin et al. 2018, "Online Learning Rate Adaptation with
Hypergradient Descent") moves the learning rate along the derivative of the loss with
respect to it, which after one step is `-g_t . u_{t-1}`: while the new gradient still
points along the previous step, a larger step would have helped. Their multiplicative
variant normalizes that product to a cosine, which makes the rule scale-free. Here the
log learning rate of each tensor moves by `rate * cos(g_t, m_{t-1})`, with `m_{t-1}` the
previous step's first moment (Adam's update direction up to a per-coordinate scale; it
is in Adam's state already, so the rule costs no memory beyond one scalar per tensor),
and stays within `[-max_log_lr, max_log_lr]` of the initial learning rate (an
unbounded rate grows without limit on a convex full-batch problem and then overshoots).

On lopt's held-out tasks this rule, untuned, is within 1.11x of per-task-tuned Adam
everywhere and beats it on most (`checkpoints/README.md`), which is why the
hierarchical learned optimizer can use it as its nominal (`nominal="adam_hd"`).

optax has no hypergradient transform; the rule is a few lines over Adam's own state.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from learned_opt import _sums
from learned_opt.base import check_positive

DEFAULT_RATE = 0.05
DEFAULT_MAX_LOG_LR = 6.0
_TINY = 1e-30


def cosines(grads: Sequence[jax.Array], previous_momenta: Sequence[jax.Array]) -> jax.Array:
  """Per tensor, the cosine between the gradient and the previous first moment: [n].

  0 where either is zero (the first step, or a tensor without gradient).
  """
  out = []
  for g, m in zip(grads, previous_momenta):
    g, m = jnp.asarray(g, jnp.float32), jnp.asarray(m, jnp.float32)
    out.append(cosine_from_sums(*_sums.sums((g * g, m * m, g * m))))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.float32)


def cosine_from_sums(gg: jax.Array, mm: jax.Array, gm: jax.Array) -> jax.Array:
  """The cosine from sum(g^2), sum(m^2) and sum(g m); 0 where either norm is 0."""
  return gm / (jnp.sqrt(gg * mm) + _TINY)


def next_log_lr(log_lr: jax.Array, cos: jax.Array, *, rate: float, max_log_lr: float) -> jax.Array:
  """The hypergradient step of the per-tensor log learning rate; non-finite cosines
  (a NaN gradient) leave it where it was."""
  cos = jnp.where(jnp.isfinite(cos), cos, 0.0)
  return jnp.clip(log_lr + rate * cos, -max_log_lr, max_log_lr)


class ScaleByAdamHDState(NamedTuple):
  """State of `scale_by_adam_hd`."""
  adam: optax.ScaleByAdamState
  log_lr: jax.Array   # float32 [n_leaves]: log of each tensor's learning-rate factor


def scale_by_adam_hd(*, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     rate: float = DEFAULT_RATE,
                     max_log_lr: float = DEFAULT_MAX_LOG_LR) -> optax.GradientTransformation:
  """Adam's direction times each tensor's hypergradient-adapted factor `exp(log_lr)`.

  Args:
    b1, b2, eps: Adam's (`optax.scale_by_adam`).
    rate: change of the log learning rate per step at cosine 1.
    max_log_lr: the factor stays within `[e^-max_log_lr, e^max_log_lr]`.
  """
  check_positive("rate", rate, allow_zero=True)
  check_positive("max_log_lr", max_log_lr, allow_zero=True)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    n = len(jax.tree.leaves(params))
    return ScaleByAdamHDState(adam.init(params), jnp.zeros((n,), jnp.float32))

  def update_fn(updates, state, params=None):
    cos = cosines(jax.tree.leaves(updates), jax.tree.leaves(state.adam.mu))
    log_lr = next_log_lr(state.log_lr, cos, rate=rate, max_log_lr=max_log_lr)
    direction, adam_state = adam.update(updates, state.adam, params)
    leaves, treedef = jax.tree.flatten(direction)
    scaled = [d * jnp.exp(l).astype(d.dtype) for d, l in zip(leaves, log_lr)]
    return jax.tree.unflatten(treedef, scaled), ScaleByAdamHDState(adam_state, log_lr)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_hd(learning_rate: float = 3e-3, *, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, rate: float = DEFAULT_RATE,
            max_log_lr: float = DEFAULT_MAX_LOG_LR) -> optax.GradientTransformation:
  """Adam whose per-tensor learning rate adapts by hypergradient descent.

  Args:
    learning_rate: the initial learning rate of every tensor; with the defaults it may
      grow or shrink by up to e^6 (~400x), so it need not be tuned.
    b1, b2, eps: Adam's.
    rate, max_log_lr: see `scale_by_adam_hd`.

  Returns:
    An optax transform; its state holds each tensor's log learning-rate factor
    (`state[0].log_lr`).
  """
  check_positive("learning_rate", learning_rate)
  return optax.chain(scale_by_adam_hd(b1=b1, b2=b2, eps=eps, rate=rate, max_log_lr=max_log_lr),
                     optax.scale(-learning_rate))
