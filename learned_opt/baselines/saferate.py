"""SafeRate: a step size from a rigorous quadratic upper bound of the loss along a direction.

Streeter & Dillon (2022), "Automatically bounding the Taylor remainder series: tighter
bounds and new applications", Sec. 5. Given a direction d (from any optimizer) and a
trust region [0, eta_max], `learned_opt.bounds.taylor_bounds` gives

    f(eta) = L(params + eta d) <= f(0) + f'(0) eta + B eta^2     for all eta in [0, eta_max].

The step minimizes that bound: eta = clip(-f'(0) / (2B), 0, eta_max) if B > 0, else the
better end point. So on a deterministic (full-batch) loss the loss never increases (up
to rounding; use float64, as the paper does). Then eta_max halves if eta < eta_max / 2
and doubles otherwise. A non-finite value, slope or bound takes no step and halves
eta_max (the paper's notebook lets the NaN through; we don't).

Params narrower than float32 (bfloat16, float16): the enclosure arithmetic in bfloat16
(8 significant bits) is no bound at all, and rounding the new params to bfloat16 moves
them by up to 2^-9 of their size, often more than the step itself. So the bound is
computed on float32 copies of params and direction, and `saferate`'s transform keeps a
step only if value_fn at the float32 copy of the rounded new params
(`optax.apply_updates(params, updates)`, as the caller will form them) is no higher than
at the old ones; otherwise it takes none (`SafeRateInfo.rejected`). What is guaranteed:
with updates applied by `optax.apply_updates`, value_fn evaluated on float32 copies of
the params never increases (up to float32 rounding of value_fn itself, ~1e-7
relative); a loss computed in bfloat16 arithmetic carries its own ~1e-2 rounding, which
nothing here controls. The price is one more loss evaluation per step.

Cost: one pass of the loss in enclosure arithmetic per step, on top of the direction's
own cost (the gradient). `value_fn` comes through optax's extra arguments, as for
`optax.scale_by_backtracking_linesearch`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.baselines.adam_muon import muon
from learned_opt.bounds import taylor_bounds


class SafeRateInfo(NamedTuple):
  """What one SafeRate step saw (scalars).

  Attributes:
    step_size: the eta taken (0 when the bound was not finite).
    max_step_size: the trust region eta_max the bound was computed on.
    value: f(0), the loss at the current parameters.
    slope: f'(0), the loss's derivative along the direction: the enclosure's own slope,
      with stop_gradient read as the identity (the value's derivative), not grads . d
      (a gradient taken through stop_gradient is a semi-gradient).
    curvature_bound: B, the upper end of the remainder interval.
    curvature_lower: the lower end of the remainder interval.
    predicted_value: the upper bound f(0) + f'(0) eta + B eta^2 at the eta taken.
    finite: whether value, slope and bound were all finite.
    rejected: params narrower than float32 only: the certified step was dropped because
      rounding the new params to their dtype would have raised the loss (module
      docstring).
  """
  step_size: jax.Array
  max_step_size: jax.Array
  value: jax.Array
  slope: jax.Array
  curvature_bound: jax.Array
  curvature_lower: jax.Array
  predicted_value: jax.Array
  finite: jax.Array
  rejected: jax.Array


class SafeRateState(NamedTuple):
  """State of `saferate`: the direction's state, eta_max for the next step, last info."""
  direction_state: optax.OptState
  max_step_size: jax.Array
  info: SafeRateInfo


def _is_narrow(x) -> bool:
  """A float leaf with fewer bits than float32 (bfloat16, float16, float8s)."""
  dtype = jnp.result_type(x)
  return bool(jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32)


def _widen(tree):
  """float32 copies of the narrow float leaves; other leaves unchanged."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32) if _is_narrow(x) else x,
                                tree)


def _float_dtype(tree) -> Any:
  """The dtype of the bound and of SafeRate's scalars: the params' widest float, at least
  float32 (a bfloat16 trust region or bound is too coarse to mean anything)."""
  floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  dtype = jnp.result_type(*floats) if floats else jnp.result_type(float)
  return jnp.promote_types(dtype, jnp.float32)


def step_from_bound(value, slope, curvature_bound, max_step_size):
  """The SafeRate rule: argmin of value + slope eta + B eta^2 over [0, max_step_size].

  Returns (eta, finite). B > 0: the clipped vertex; B <= 0: the bound is concave, so the
  better end point. Non-finite inputs give eta = 0.
  """
  t = max_step_size
  finite = jnp.isfinite(value) & jnp.isfinite(slope) & jnp.isfinite(curvature_bound)
  b_safe = jnp.where(curvature_bound > 0, curvature_bound, 1.0)
  vertex = jnp.clip(-slope / (2.0 * b_safe), 0.0, t)
  end = jnp.where(slope * t + curvature_bound * t * t < 0, t, 0.0)
  eta = jnp.where(curvature_bound > 0, vertex, end)
  return jnp.where(finite, eta, 0.0).astype(jnp.result_type(t)), finite


def saferate_step(value_fn: Callable[[Any], jax.Array], params: Any, direction: Any,
                  max_lr: jax.Array | float) -> tuple[jax.Array, SafeRateInfo]:
  """The SafeRate step size along `direction` (a feature for learned optimizers too).

  Args:
    value_fn: params -> scalar loss, deterministic (e.g. the loss on a fixed batch).
    params: the current parameters (pytree).
    direction: an update direction with params' structure (e.g. -Adam's m / sqrt(v)).
    max_lr: the trust region eta_max > 0 (scalar, may be traced).

  Returns:
    (eta, info): eta in [0, max_lr] minimizing the bound, and a `SafeRateInfo`; scalars
    in the params' float dtype, at least float32.

  Params or direction leaves narrower than float32 are bounded as float32 copies
  (value_fn then sees float32 params); eta certifies params + eta * direction in exact
  arithmetic, not after rounding to the params' dtype (`saferate` checks that).
  """
  dtype = _float_dtype(params)
  t = jnp.asarray(max_lr, dtype)
  b = taylor_bounds(value_fn, _widen(params), _widen(direction), t)
  if jnp.ndim(b.value) != 0:
    raise ValueError(f"saferate_step: value_fn must return a scalar loss, got shape "
                     f"{jnp.shape(b.value)}")
  eta, finite = step_from_bound(b.value, b.slope, b.remainder.hi, t)
  predicted = b.value + b.slope * eta + b.remainder.hi * eta * eta
  info = SafeRateInfo(eta, t, b.value, b.slope, b.remainder.hi, b.remainder.lo,
                      jnp.where(finite, predicted, b.value), finite, jnp.asarray(False))
  return eta, info


def _empty_info(dtype) -> SafeRateInfo:
  z = jnp.zeros((), dtype)
  return SafeRateInfo(z, z, z, z, z, z, z, jnp.asarray(True), jnp.asarray(False))


def _stored(x: jax.Array, dtype) -> jax.Array:
  """x (float32 or wider) as `dtype` holds it, in x's dtype. Not a round trip through
  x.astype(dtype): inside jit XLA drops such a convert pair (excess precision), and the
  check below would then see params more precise than the caller's (0.0002 relative in
  the loss of a bfloat16 MLP). `reduce_precision` is kept."""
  if not _is_narrow(jnp.zeros((), dtype)):
    return x.astype(dtype).astype(x.dtype)
  fi = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _applied(params, updates):
  """float32 copies of `optax.apply_updates(params, updates)`: p + u in their promoted
  dtype, then p's dtype (u as its dtype holds it), rounded as JAX specifies even inside
  jit; the result is exact in float32 (a narrow leaf's value)."""
  def one(p, u):
    p_dtype, u_dtype = jnp.result_type(p), jnp.result_type(u)
    if not (_is_narrow(p) or _is_narrow(u)):
      return jnp.asarray(p + u).astype(p_dtype)
    sum_dtype = jnp.promote_types(p_dtype, u_dtype)
    wide = jnp.promote_types(sum_dtype, jnp.float32)  # holds every operand exactly
    total = _stored(jnp.asarray(u, wide), u_dtype) + jnp.asarray(p, wide)
    total = _stored(_stored(total, sum_dtype), p_dtype)
    return total.astype(jnp.float32) if _is_narrow(p) else total.astype(p_dtype)
  return jax.tree_util.tree_map(one, params, updates)


def _check_rounding(value_fn, params, out, eta, info: SafeRateInfo):
  """For narrow params: keeps the step only if value_fn (float32) at the params the
  caller will get, rounded to their dtype, is no higher than at the old params."""
  after = value_fn(_widen(_applied(params, out)))
  rejected = (eta > 0) & ~(after <= info.value)
  out = jax.tree_util.tree_map(lambda u: jnp.where(rejected, jnp.zeros_like(u), u), out)
  eta = jnp.where(rejected, jnp.zeros_like(eta), eta)
  return out, eta, info._replace(step_size=eta, rejected=rejected,
                                 predicted_value=jnp.where(rejected, info.value,
                                                           info.predicted_value))


def _warn_once_if_not_finite(value: jax.Array, warned: list) -> None:
  """Warns (once per transform: `warned` is its flag) that the loss is not finite.

  A warning, not an error: inside jit (where optax transforms run) a traced value cannot
  raise without checkify, and raising only eagerly would make jitted and eager code
  differ. SafeRate's response is already safe (no step; a NaN minibatch loss may pass),
  but on a deterministic loss that is NaN at the start it never moves, and only
  `info.finite` said so. The callback runs only when the value is not finite (a `cond`),
  so a healthy run pays no host round trip.
  """
  def report(v):
    bad = np.asarray(v)[~np.isfinite(np.asarray(v))]
    if warned[0] or bad.size == 0:  # under vmap the cond may run for every element
      return
    warned[0] = True
    warnings.warn(
        f"saferate: the loss value_fn returns at the current params is {bad.ravel()[0]} (not "
        f"finite). SafeRate takes no step there (eta = 0) and halves its trust region, so "
        f"on a deterministic loss it never moves; check the initial params and value_fn. "
        f"(Warned once per saferate transform; SafeRateInfo.finite is False on such steps.)",
        RuntimeWarning, stacklevel=2)

  jax.lax.cond(jnp.isfinite(value), lambda v: None,
               lambda v: jax.debug.callback(report, v), value)


def saferate(direction_tx: optax.GradientTransformation, *, init_max_lr: float = 1.0,
             growth: float = 2.0, shrink: float = 0.5, min_max_lr: Optional[float] = None,
             max_max_lr: Optional[float] = None) -> optax.GradientTransformationExtraArgs:
  """SafeRate around any optimizer: its updates give the direction, SafeRate the length.

  The returned transform's `update(updates, state, params, *, value_fn, **extra)` needs
  `params` and `value_fn` (params -> scalar loss; SafeRate's guarantee is for the loss
  `value_fn` computes, so pass the full-batch loss for a monotone descent); `**extra` is
  forwarded to `direction_tx`. The output is eta * direction (additive, optax style).

  Args:
    direction_tx: an optax transform whose updates are descent directions at unit step
      size (e.g. `optax.chain(optax.scale_by_adam(), optax.scale(-1.0))`); eta is in the
      unit of its output.
    init_max_lr: the first trust region eta_max (the paper starts at 1).
    growth: eta_max is multiplied by this when eta >= eta_max / 2.
    shrink: eta_max is multiplied by this when eta < eta_max / 2 or the bound is not
      finite.
    min_max_lr: optional floor of eta_max; max_max_lr: optional ceiling.

  Float64 is recommended (`jax.config.update("jax_enable_x64", True)` and float64
  params): the bound ignores rounding, so float32 can see increases of ~1e-7 relative.

  A non-finite loss at the params gives a `RuntimeWarning` (once per transform, also
  under jit) besides `info.finite = False`: SafeRate cannot move from such a point.
  """
  if not init_max_lr > 0:
    raise ValueError(f"saferate: init_max_lr must be > 0, got {init_max_lr!r}")
  if not growth >= 1:
    raise ValueError(f"saferate: growth must be >= 1, got {growth!r}")
  if not 0 < shrink < 1:
    raise ValueError(f"saferate: shrink must be in (0, 1), got {shrink!r}")
  inner = optax.with_extra_args_support(direction_tx)
  warned = [False]  # the non-finite-loss warning, once per transform

  def init_fn(params):
    dtype = _float_dtype(params)
    return SafeRateState(inner.init(params), jnp.asarray(init_max_lr, dtype), _empty_info(dtype))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    if params is None:
      raise ValueError("saferate: update needs params (the bound is taken at them)")
    if value_fn is None:
      raise ValueError("saferate: update needs value_fn=... (params -> scalar loss) as an "
                       "extra argument, as optax.scale_by_backtracking_linesearch does")
    direction, dstate = inner.update(updates, state.direction_state, params,
                                     value_fn=value_fn, **extra)
    t = state.max_step_size
    eta, info = saferate_step(value_fn, params, direction, t)
    _warn_once_if_not_finite(info.value, warned)
    grow = info.finite & (eta >= 0.5 * t)
    new_t = jnp.where(grow, t * growth, t * shrink)
    if min_max_lr is not None:
      new_t = jnp.maximum(new_t, min_max_lr)
    if max_max_lr is not None:
      new_t = jnp.minimum(new_t, max_max_lr)
    # eta = 0 must give a zero update even where the direction is inf (Adam in float16:
    # v underflows), where eta * d would be NaN.
    out = jax.tree_util.tree_map(
        lambda d: jnp.where(eta > 0, eta * d, jnp.zeros((), eta.dtype)).astype(d.dtype),
        direction)
    if any(_is_narrow(x) for x in jax.tree_util.tree_leaves(params)):
      # The trust region still follows the bound's eta: a rejection is rounding's, and
      # a smaller region would only make the steps smaller against the rounding.
      out, eta, info = _check_rounding(value_fn, params, out, eta, info)
    return out, SafeRateState(dstate, new_t.astype(t.dtype), info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_direction(*, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   eps_root: float = 0.0) -> optax.GradientTransformation:
  """-m_hat / (sqrt(v_hat) + eps): Adam's update at learning rate 1 (Kingma & Ba 2015)."""
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
                     optax.scale(-1.0))


def saferate_adam(*, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  init_max_lr: float = 1.0, **saferate_kwargs) -> optax.GradientTransformationExtraArgs:
  """SafeRate[Adam]: Adam's direction, SafeRate's step size (Streeter & Dillon 2022).

  Args:
    b1, b2, eps: Adam's moment decays and epsilon.
    init_max_lr: the first trust region (in units of Adam's update at lr 1).
    **saferate_kwargs: growth, shrink, min_max_lr, max_max_lr of `saferate`.
  """
  return saferate(adam_direction(b1=b1, b2=b2, eps=eps), init_max_lr=init_max_lr,
                  **saferate_kwargs)


def saferate_muon(*, init_max_lr: float = 1.0, muon_kwargs: Optional[dict] = None,
                  **saferate_kwargs) -> optax.GradientTransformationExtraArgs:
  """SafeRate[Muon]: the direction of lopt's Muon (`learned_opt.baselines.muon`) at lr 1.

  That is `optax.contrib.muon` with lopt's partition: Newton-Schulz-orthogonalized
  momentum on hidden weight matrices (conv kernels reshaped to 2-D), Adam on embeddings,
  output heads, biases, norms and scalars. `muon_kwargs` (e.g. beta, ns_steps, params,
  label_fn) go to it unchanged; the learning rate is SafeRate's eta.
  """
  kwargs = dict(muon_kwargs or {})
  for key in ("learning_rate", "adam_learning_rate"):
    if key in kwargs:
      raise ValueError(f"saferate_muon: the learning rate is SafeRate's eta; do not pass "
                       f"{key}={kwargs[key]!r} in muon_kwargs")
  return saferate(muon(1.0, **kwargs), init_max_lr=init_max_lr, **saferate_kwargs)
