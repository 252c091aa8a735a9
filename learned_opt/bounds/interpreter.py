"""A jaxpr interpreter that pushes Taylor enclosures through a function.

`taylor_bounds(fn, x0, d, t)` traces `fn` to a jaxpr once, then walks its equations at
trace time: values that do not depend on the step size eta are evaluated exactly (the
primitive is bound as is), values that do become `Enclosure`s and go through the rule
of their primitive (`rules`). The walk happens while the caller's function is traced,
so under `jax.jit` it costs nothing at run time beyond the enclosure arithmetic itself.

Why by hand: no maintained library does this (autobound 0.1.4 does not import with
current JAX, `jax.experimental.jet` gives Taylor coefficients without remainder bounds).

Activations spelled out in several primitives (gelu, silu) get one sharp rule (`fusion`).
Nested calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, `checkpoint`) are inlined;
`cond`/`switch` on an index that does not depend on eta runs the selected branch (or a
`lax.switch` of interpreted branches when the index is only known at run time); `scan`
runs as a `lax.scan` whose carry holds enclosures.

`stop_gradient(v)` is the identity here: the bound is about the value f(eta), and the
value of stop_gradient(v) at eta is v(eta) (reading it as the constant v(0), as this
module once did, made the bound of a loss normalized by stop_gradient(norm(w)), or of
a TD target, unsound, and its slope the semi-gradient rather than f'(0)). The one
exception is a shift-invariant stabilizer (the max in softmax, log_softmax, logsumexp):
`stabilizers.find` proves the needed outputs do not depend on its value, and only then
is it read as v(0), which is exact and keeps those bounds as tight as before.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax._src import source_info_util  # error messages only: where in the user's code

from learned_opt.bounds import enclosure as enc
from learned_opt.bounds import fusion
from learned_opt.bounds import rules
from learned_opt.bounds import stabilizers
from learned_opt.bounds.jaxpr_utils import UnsupportedPrimitiveError, bind, forward_dependence
from learned_opt.bounds.enclosure import Enclosure
from learned_opt.bounds.interval import Interval


class TaylorBounds(NamedTuple):
  """f(x0 + eta d) in value + slope * eta + [remainder.lo, remainder.hi] * eta^2, eta in [0, t].

  Attributes:
    value: f(x0), the shape of f's output.
    slope: the directional derivative d/deta f(x0 + eta d) at eta = 0.
    remainder: interval coefficient of eta^2, valid for every eta in the trust region.
  """
  value: jax.Array
  slope: jax.Array
  remainder: Interval

  @property
  def coefficients(self) -> tuple[jax.Array, jax.Array, Interval]:
    return self.value, self.slope, self.remainder

  def upper(self, eta: jax.Array) -> jax.Array:
    """The upper bound on f(x0 + eta d) (eta inside the trust region)."""
    return self.value + self.slope * eta + self.remainder.hi * eta * eta

  def lower(self, eta: jax.Array) -> jax.Array:
    return self.value + self.slope * eta + self.remainder.lo * eta * eta


class Context(NamedTuple):
  """What rules need besides their inputs: the trust region, a way to recurse, and
  whether matmuls carry value ranges (inside recurrences; `enclosure.bilinear`)."""
  t: jax.Array
  where: str
  eval_jaxpr: Callable[..., list]
  ranges: bool = False


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _needed(jaxpr, out_needed: Sequence[bool], constant: set) -> set:
  """Variables whose enclosure (not just their value at eta = 0) the outputs need;
  `constant` holds the indices of equations read at eta = 0 (stabilizers)."""
  need = {v for v, n in zip(jaxpr.outvars, out_needed) if n and isinstance(v, jcore.Var)}
  for i in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[i]
    if i in constant:
      continue
    if any(isinstance(o, jcore.Var) and o in need for o in eqn.outvars):
      need.update(v for v in eqn.invars if isinstance(v, jcore.Var))
  return need


def _point(x):
  return x.c0 if isinstance(x, Enclosure) else x


def _where(eqn, stack: str) -> str:
  try:
    src = source_info_util.summarize(eqn.source_info)
  except Exception:  # source info is best effort; the function stack is enough
    src = "?"
  return f"{stack} at {src}"


def eval_jaxpr(jaxpr, consts, args, t, *, out_needed=None, stack="fn", ranges=False) -> list:
  """Interprets `jaxpr` on a mix of plain arrays and `Enclosure`s.

  Args:
    jaxpr: an open `Jaxpr`.
    consts: values of its constvars.
    args: values of its invars: arrays (constant in eta) or `Enclosure`s.
    t: the trust region (scalar, eta in [0, t]).
    out_needed: which outputs must be enclosures (default: all); values that feed only
      unneeded outputs or stabilizers (`stabilizers.find`) are evaluated at eta = 0.
    stack: the names of the enclosing functions, for error messages.
    ranges: whether matmuls and convolutions carry value ranges (set inside `scan`).
  Returns:
    The outputs, each an array or an `Enclosure`.
  """
  out_needed = [True] * len(jaxpr.outvars) if out_needed is None else list(out_needed)
  constant = stabilizers.find(jaxpr, out_needed)
  need = _needed(jaxpr, out_needed, constant)
  env: dict[Any, Any] = {}
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  fusions, skip = fusion.find_fusions(jaxpr), set()
  for i, eqn in enumerate(jaxpr.eqns):
    if i in skip:
      continue
    fused = fusions.get(i)
    if fused is not None and fused.outvar in need and isinstance(env[fused.invar], Enclosure):
      env[fused.outvar] = enc.compose(fused.rule, env[fused.invar], t)
      skip.update(fused.covered)
      continue
    invals = [_read(env, v) for v in eqn.invars]
    name = eqn.primitive.name
    live = [isinstance(o, jcore.Var) and not isinstance(o, jcore.DropVar) and o in need
            for o in eqn.outvars]
    if not any(isinstance(x, Enclosure) for x in invals):
      outs = bind(eqn.primitive, eqn.params, invals)
    elif not any(live) or i in constant:
      outs = bind(eqn.primitive, eqn.params, [_point(x) for x in invals])
    elif name == "stop_gradient":
      outs = invals  # its value is v(eta): the identity (module docstring)
    else:
      rule = rules.RULES.get(name)
      where = _where(eqn, stack)
      if rule is None:
        raise UnsupportedPrimitiveError(
            f"taylor_bounds: primitive '{name}' in {where} is applied to a value that "
            f"depends on the step size, and it has no enclosure rule. Supported: "
            f"{', '.join(sorted(rules.RULES))}.")
      sub = lambda j, c, a, n=None, s=None, ranges=ranges: eval_jaxpr(
          j, c, a, t, out_needed=n, stack=f"{stack} > {s or 'call'}", ranges=ranges)
      ctx = Context(t=t, where=where, eval_jaxpr=sub, ranges=ranges)
      outs = rule(invals, dict(eqn.params), ctx, live=live, eqn=eqn)
    for o, x in zip(eqn.outvars, outs):
      if isinstance(o, jcore.DropVar):
        continue
      if isinstance(x, Enclosure) and x.c0.shape != tuple(o.aval.shape):
        x = _broadcast(x, tuple(o.aval.shape))
      env[o] = x
  return [_read(env, v) for v in jaxpr.outvars]


def _broadcast(x: Enclosure, shape) -> Enclosure:
  b = lambda a: jnp.broadcast_to(a, shape)
  return enc.positive_map(x, b)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def taylor_bounds(fn: Callable[[Any], jax.Array], x0: Any, direction: Any,
                  trust_region: jax.Array | float) -> TaylorBounds:
  """Encloses f(eta) = fn(x0 + eta * direction) on [0, trust_region] by a quadratic.

  Returns value f(0), slope f'(0) and an interval [lo, hi] such that, for every eta in
  [0, trust_region], f(0) + f'(0) eta + lo eta^2 <= f(eta) <= f(0) + f'(0) eta + hi eta^2
  (elementwise if fn returns an array). This is the second-degree Taylor enclosure of
  Streeter & Dillon (2022), "Automatically bounding the Taylor remainder series", computed
  by interpreting fn's jaxpr with sharp enclosures of elementwise functions.

  Args:
    fn: a JAX-traceable function of one pytree (e.g. params -> scalar loss).
    x0: the point, a pytree of arrays. Integer leaves are held fixed.
    direction: a pytree with x0's structure and shapes (e.g. an optimizer update).
    trust_region: a scalar t >= 0; the bounds hold for eta in [0, t]. May be traced.

  Returns:
    A `TaylorBounds` whose arrays have fn's output shape.

  Raises:
    ValueError: direction does not match x0 or trust_region is not a scalar.
    UnsupportedPrimitiveError: fn applies a primitive with no enclosure rule to a value
      that depends on eta (the message names the primitive and where it is).

  Float64 (`jax.config.update("jax_enable_x64", True)`) is recommended, as in the paper:
  the bounds ignore rounding, which in float32 can reach ~1e-6 relative.
  """
  leaves, treedef = jax.tree_util.tree_flatten(x0)
  d_leaves, d_treedef = jax.tree_util.tree_flatten(direction)
  if d_treedef != treedef:
    raise ValueError(f"taylor_bounds: direction has tree structure {d_treedef}, expected "
                     f"x0's structure {treedef}")
  for i, (x, d) in enumerate(zip(leaves, d_leaves)):
    if jnp.shape(x) != jnp.shape(d):
      raise ValueError(f"taylor_bounds: direction leaf {i} has shape {jnp.shape(d)}, expected "
                       f"x0's shape {jnp.shape(x)}")
  if jnp.ndim(trust_region) != 0:
    raise ValueError(f"taylor_bounds: trust_region must be a scalar, got shape "
                     f"{jnp.shape(trust_region)}")
  float_leaves = [x for x in leaves if _is_float(x)]
  dtype = jnp.result_type(*float_leaves) if float_leaves else jnp.result_type(float)
  t = jnp.asarray(trust_region, dtype)
  closed = jax.make_jaxpr(lambda *ls: fn(jax.tree_util.tree_unflatten(treedef, ls)))(*leaves)
  if len(closed.jaxpr.outvars) != 1:
    raise ValueError(f"taylor_bounds: fn must return one array, got "
                     f"{len(closed.jaxpr.outvars)} outputs")
  args = [Enclosure(jnp.asarray(x), jnp.asarray(d, jnp.result_type(x))) if _is_float(x) else x
          for x, d in zip(leaves, d_leaves)]
  name = getattr(fn, "__name__", "fn")
  (out,) = eval_jaxpr(closed.jaxpr, closed.consts, args, t, stack=name)
  out = out if isinstance(out, Enclosure) else enc.lift(out)
  rem = enc.remainder(out)
  # NaN in a remainder means the interval arithmetic lost track (inf - inf); the honest
  # enclosure is then everything.
  lost = jnp.isnan(rem.lo) | jnp.isnan(rem.hi)
  rem = Interval(jnp.where(lost, -jnp.inf, rem.lo), jnp.where(lost, jnp.inf, rem.hi))
  return TaylorBounds(out.c0, out.c1, rem)
