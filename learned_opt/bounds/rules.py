"""Enclosure rules, one per primitive: how an `Enclosure` goes through it.

A rule takes the primitive's inputs (arrays constant in eta, or `Enclosure`s), its
params and a `Context` (trust region, recursion into sub-jaxprs) and returns the list
of outputs. Groups:
  structural   reshape, slice, gather, select_n, concatenate, ...: applied to every
               coefficient (they are linear with nonnegative coefficients; index and
               predicate operands must not depend on eta);
  arithmetic   add, sub, neg, mul, div, dot_general, conv_general_dilated;
  elementwise  exp, log, tanh, logistic, sqrt, rsqrt, integer_pow, max/min, abs, ...
               through the sharp rules of `elementwise`; reduce_max/min as a tree of
               max/min;
  control      jit, custom_jvp_call, custom_vjp_call, checkpoint (inlined), cond, scan.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from learned_opt.bounds import elementwise as ew
from learned_opt.bounds import enclosure as enc
from learned_opt.bounds import interval as iv
from learned_opt.bounds.enclosure import Enclosure
from learned_opt.bounds.jaxpr_utils import UnsupportedPrimitiveError, bind, forward_dependence

RULES: dict = {}


def _register(*names):
  def deco(fn):
    for n in names:
      RULES[n] = fn
    return fn
  return deco


def _is_enc(x) -> bool:
  return isinstance(x, Enclosure)


def _require_const(x, what: str, ctx, name: str):
  if _is_enc(x):
    raise UnsupportedPrimitiveError(
        f"taylor_bounds: the {what} of '{name}' in {ctx.where} depends on the step size; "
        f"only its data operands may (a piecewise choice that moves with eta has no "
        f"Taylor enclosure)")


def _prim_fn(eqn, params):
  def f(*args):
    outs = bind(eqn.primitive, params, list(args))
    return outs if eqn.primitive.multiple_results else outs[0]
  return f


# ------------------------------------------------------------------ structural

def _componentwise(f, vals, data_pos: Sequence[int], multiple: bool, t):
  """Applies f to the c0s, c1s, los and his of the data operands (constants lifted)."""
  data = {i: (vals[i] if _is_enc(vals[i]) else enc.lift(vals[i])) for i in data_pos}
  def args_with(getter):
    return [getter(data[i]) if i in data else vals[i] for i in range(len(vals))]
  c0 = f(*args_with(lambda e: e.c0))
  c1 = f(*args_with(lambda e: e.c1))
  rng = None
  if any(data[i].rng is not None for i in data):
    ranges = {i: (enc.value_range(data[i], t) if _is_enc(vals[i]) else iv.point(vals[i]))
              for i in data}
    rng = (f(*[ranges[i].lo if i in data else vals[i] for i in range(len(vals))]),
           f(*[ranges[i].hi if i in data else vals[i] for i in range(len(vals))]))
  if all(data[i].rem is None for i in data):
    rems = None
  else:
    lo = f(*args_with(lambda e: enc.remainder(e).lo))
    hi = f(*args_with(lambda e: enc.remainder(e).hi))
    rems = (lo, hi)
  if not multiple:
    return [Enclosure(c0, c1, None if rems is None else iv.Interval(*rems),
                      None if rng is None else iv.Interval(*rng))]
  return [Enclosure(a, b, None if rems is None else iv.Interval(rems[0][k], rems[1][k]),
                    None if rng is None else iv.Interval(rng[0][k], rng[1][k]))
          for k, (a, b) in enumerate(zip(c0, c1))]


def _structural(data_pos=None, index_what="index operand"):
  """A rule for a primitive linear with nonnegative coefficients in `data_pos`."""
  def rule(vals, params, ctx, *, live, eqn):
    positions = range(len(vals)) if data_pos is None else data_pos(len(vals))
    for i in range(len(vals)):
      if i not in positions:
        _require_const(vals[i], index_what, ctx, eqn.primitive.name)
    return _componentwise(_prim_fn(eqn, params), vals, list(positions),
                          eqn.primitive.multiple_results, ctx.t)
  return rule


_first = lambda n: [0]
for _name in ("reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
              "reduce_sum", "copy", "copy_p", "rev", "cumsum", "reduce_precision",
              "sharding_constraint", "split", "real", "stack", "tile"):
  RULES[_name] = _structural()
RULES["dynamic_slice"] = _structural(_first, "start index")
RULES["gather"] = _structural(_first, "indices")
RULES["concatenate"] = _structural()
RULES["pad"] = _structural()
RULES["select_n"] = _structural(lambda n: list(range(1, n)), "predicate")
RULES["dynamic_update_slice"] = _structural(lambda n: [0, 1], "start index")


@_register("convert_element_type")
def _convert(vals, params, ctx, *, live, eqn):
  if not jnp.issubdtype(params["new_dtype"], jnp.floating):
    raise UnsupportedPrimitiveError(
        f"taylor_bounds: convert_element_type to {params['new_dtype']} in {ctx.where} is "
        f"applied to a value that depends on the step size (expected a float dtype)")
  return _componentwise(_prim_fn(eqn, params), vals, [0], False, ctx.t)


# ------------------------------------------------------------------ arithmetic

def _as_enc(x):
  return x if _is_enc(x) else enc.lift(x)


@_register("add", "add_any")
def _add(vals, params, ctx, *, live, eqn):
  a, b = vals
  if not _is_enc(a):
    a, b = b, a
  if not _is_enc(b):
    return [enc.add_const(a, b)]
  return [enc.add(a, b, ctx.t)]


@_register("sub")
def _sub(vals, params, ctx, *, live, eqn):
  a, b = vals
  if not _is_enc(b):
    return [enc.add_const(a, -b)]
  if not _is_enc(a):
    return [enc.add_const(enc.neg(b), a)]
  return [enc.sub(a, b, ctx.t)]


@_register("neg")
def _neg(vals, params, ctx, *, live, eqn):
  return [enc.neg(vals[0])]


@_register("mul")
def _mul(vals, params, ctx, *, live, eqn):
  a, b = vals
  if _is_enc(a) and _is_enc(b):
    return [enc.mul(a, b, ctx.t)]
  return [enc.scale(a, b) if _is_enc(a) else enc.scale(b, a)]


@_register("div")
def _div(vals, params, ctx, *, live, eqn):
  a, b = vals
  if not _is_enc(b):
    return [enc.divide(a, b)]
  inv = enc.compose(ew.RECIPROCAL, b, ctx.t)
  return [enc.mul(a, inv, ctx.t) if _is_enc(a) else enc.scale(inv, a)]


@_register("dot_general", "conv_general_dilated")
def _bilinear(vals, params, ctx, *, live, eqn):
  a, b = vals
  op = _prim_fn(eqn, params)
  if _is_enc(a) and _is_enc(b):
    return [enc.bilinear(op, a, b, ctx.t, ranges=ctx.ranges)]
  return [enc.bilinear_const(op, a, b, ctx.t, ranges=ctx.ranges)]


# ------------------------------------------------------------------ elementwise

def _unary(rule):
  def apply(vals, params, ctx, *, live, eqn):
    return [enc.compose(rule, vals[0], ctx.t)]
  return apply


for _name, _rule in (("exp", ew.EXP), ("expm1", ew.EXPM1), ("log", ew.LOG), ("log1p", ew.LOG1P),
                     ("tanh", ew.TANH), ("logistic", ew.LOGISTIC), ("sqrt", ew.SQRT),
                     ("rsqrt", ew.RSQRT), ("abs", ew.ABS), ("square", ew.SQUARE)):
  RULES[_name] = _unary(_rule)


def _power(x: Enclosure, n: int, t) -> Enclosure:
  if n == 1:
    return x
  if n == 2:
    return enc.compose(ew.SQUARE, x, t)
  if n == 3:
    return enc.compose(ew.CUBE, x, t)
  half = _power(x, n // 2, t)
  sq = enc.compose(ew.SQUARE, half, t)
  return enc.mul(sq, x, t) if n % 2 else sq


@_register("integer_pow")
def _integer_pow(vals, params, ctx, *, live, eqn):
  x, y = vals[0], int(params["y"])
  if y == 0:
    return [jnp.ones_like(x.c0)]
  p = _power(x, abs(y), ctx.t)
  return [p if y > 0 else enc.compose(ew.RECIPROCAL, p, ctx.t)]


def _relu_of_difference(a, b, t):
  """relu(a - b) for enclosures or constants (at least one an enclosure)."""
  if not _is_enc(b):
    d = enc.add_const(a, -b)
  elif not _is_enc(a):
    d = enc.add_const(enc.neg(b), a)
  else:
    d = enc.sub(a, b, t)
  return enc.compose(ew.RELU, d, t)


def _plus(x: Enclosure, c, t):
  return enc.add(x, c, t) if _is_enc(c) else enc.add_const(x, c)


@_register("max")
def _max(vals, params, ctx, *, live, eqn):
  a, b = vals  # max(a, b) = b + relu(a - b); relu is the (sharp) kink rule
  return [_plus(_relu_of_difference(a, b, ctx.t), b, ctx.t)]


@_register("min")
def _min(vals, params, ctx, *, live, eqn):
  a, b = vals  # min(a, b) = a - relu(a - b)
  r = enc.neg(_relu_of_difference(a, b, ctx.t))
  return [_plus(r, a, ctx.t)]


def _fold(x: Enclosure, axis: int, pair, t) -> Enclosure:
  """Reduces `axis` by a binary rule in a tree of depth log2(n): halves are paired, an
  odd last slice waits a level (one rule call per level, not n)."""
  cut = lambda lo, hi: (lambda v: lax.slice_in_dim(v, lo, hi, axis=axis))
  n = x.shape[axis]
  while n > 1:
    h = n // 2
    m = pair(enc.positive_map(x, cut(0, h)), enc.positive_map(x, cut(h, 2 * h)), t)
    if n % 2:
      m, rest = enc.full(m), enc.full(enc.positive_map(x, cut(2 * h, n)))
      cat = lambda a, b: jnp.concatenate([a, b], axis)
      m = Enclosure(cat(m.c0, rest.c0), cat(m.c1, rest.c1),
                    iv.Interval(cat(m.rem.lo, rest.rem.lo), cat(m.rem.hi, rest.rem.hi)))
    x, n = m, h + n % 2
  return enc.positive_map(x, lambda v: jnp.squeeze(v, axis))


@_register("reduce_max", "reduce_min")
def _reduce_extremum(vals, params, ctx, *, live, eqn):
  # A max over eta-dependent values is reached at a target (a TD target's max over
  # actions) now that stop_gradient is the identity; stabilizers never get here.
  # Sound through the kink rule of `max`, but loose wherever the argmax may switch.
  rule = _max if eqn.primitive.name == "reduce_max" else _min
  pair = lambda a, b, t: rule([a, b], {}, ctx, live=live, eqn=eqn)[0]
  x = vals[0]
  for axis in sorted(params["axes"], reverse=True):
    x = _fold(x, axis, pair, ctx.t)
  return [x]


# ------------------------------------------------------------------ control flow

def _sub_jaxpr(params):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in params:
      j = params[key]
      return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())
  raise KeyError(f"no sub-jaxpr in params {sorted(params)}")


def _fn_name(jaxpr, default: str) -> str:
  info = getattr(jaxpr, "debug_info", None)
  name = getattr(info, "func_name", None) if info is not None else None
  return name or default


@_register("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
           "custom_jvp_call", "custom_vjp_call", "custom_lin")
def _inline(vals, params, ctx, *, live, eqn):
  jaxpr, consts = _sub_jaxpr(params)
  name = params.get("name") or _fn_name(jaxpr, eqn.primitive.name)
  if eqn.primitive.name == "custom_jvp_call" and name == "logaddexp":
    # jnp.logaddexp guards NaN with a select on its own value; use its closed form
    # logaddexp(a, b) = b + softplus(a - b) with the sharp softplus rule instead.
    a, b = vals
    d = enc.sub(_as_enc(a), _as_enc(b), ctx.t)
    return [_plus(enc.compose(ew.SOFTPLUS, d, ctx.t), b, ctx.t)]
  return ctx.eval_jaxpr(jaxpr, consts, vals, live, name)


def _branch_fn(ctx, closed, out_dep, name):
  def run(*ops):
    outs = ctx.eval_jaxpr(closed.jaxpr, closed.consts, list(ops), None, name)
    return [enc.full(_as_enc(o)) if d else o for o, d in zip(outs, out_dep)]
  return run


@_register("cond")
def _cond(vals, params, ctx, *, live, eqn):
  index, ops = vals[0], vals[1:]
  _require_const(index, "branch index", ctx, "cond")
  branches = params["branches"]
  if not isinstance(index, jax.core.Tracer):  # known now: run the selected branch only
    k = int(jnp.clip(index, 0, len(branches) - 1))
    return ctx.eval_jaxpr(branches[k].jaxpr, branches[k].consts, ops, live, f"branch {k}")
  in_dep = [_is_enc(o) for o in ops]
  out_dep = [any(ds) for ds in zip(*[forward_dependence(b.jaxpr, in_dep) for b in branches])]
  fns = [_branch_fn(ctx, b, out_dep, f"branch {k}") for k, b in enumerate(branches)]
  return list(lax.switch(index, fns, *ops))


@_register("scan")
def _scan(vals, params, ctx, *, live, eqn):
  body = params["jaxpr"]
  nc, nk = params["num_consts"], params["num_carry"]
  consts, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]
  carry_dep = [_is_enc(c) for c in init]
  for _ in range(nk + 1):  # fixed point: a carry depends on eta once any iterate does
    in_dep = [_is_enc(c) for c in consts] + carry_dep + [_is_enc(x) for x in xs]
    out = forward_dependence(body.jaxpr, in_dep)[:nk]
    new = [a or b for a, b in zip(carry_dep, out)]
    if new == carry_dep:
      break
    carry_dep = new
  init = [enc.full(_as_enc(c)) if d else c for c, d in zip(init, carry_dep)]

  def step(carry, x):
    outs = ctx.eval_jaxpr(body.jaxpr, body.consts, list(consts) + list(carry) + list(x),
                          None, "scan body", ranges=True)
    new_carry = [enc.full(_as_enc(o)) if d else o for o, d in zip(outs[:nk], carry_dep)]
    return new_carry, outs[nk:]

  carry, ys = lax.scan(step, init, list(xs), length=params["length"],
                       reverse=params["reverse"], unroll=params.get("unroll", 1))
  return list(carry) + list(ys)
