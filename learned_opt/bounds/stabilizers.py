"""Which `stop_gradient`s in a jaxpr are shift-invariant stabilizers.

The bound is about the value f(eta) = fn(x0 + eta d). `stop_gradient(v)` has the value
v, so as a function of eta it is v(eta): the interpreter encloses it as the identity.
One use is the exception: a stabilizer c = stop_gradient(max(x)) in softmax, log_softmax
and logsumexp (jax.nn, optax's cross-entropies), whose outputs do not depend on c at all:

    logsumexp(x) = log(sum(exp(x - c))) + c     for every c.

There the interpreter may read c as the constant c(0) (exact, and as tight as plain
arithmetic gets) instead of enclosing max(x), which has no Taylor rule. `find` proves
that invariance, per stop_gradient, by following how a shift c -> c + delta (delta any
array of c's shape) moves every value computed from c:

    INV        (None)             not moved;
    ("add", k, axes)              v + k * delta, delta laid along `axes` of v;
    ("mul", k, axes)              v * exp(k * delta), likewise.

`axes` lists, in order, the axes of v that carry c's non-unit axes (the shift is constant
along the others). Every transfer rule below is an identity for all delta (e.g.
exp(v + k delta) = exp(v) exp(k delta); a sum over axes the shift is constant along keeps
the factor); anything else (a primitive not listed, a shift along a reduced axis, two
shifts laid differently) is TOP, and the stop_gradient is then enclosed as the
identity. A stop_gradient is a stabilizer only if every needed output of its jaxpr is
INV, so reading it as c(0) changes no value that the bound encloses.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

TOP = "top"  # moved in a way the rules do not follow
Tag = Any  # None (INV), TOP, or (kind, k, axes)

_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_lin")
_SAME = ("copy", "copy_p", "reduce_precision", "sharding_constraint")


def _shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


def _tag(tags: dict, v) -> Tag:
  return tags.get(v) if isinstance(v, jcore.Var) else None


def _scaled(t: Tag, s: float) -> Tag:
  if t is None or t == TOP:
    return t
  kind, k, axes = t
  return None if k * s == 0 else (kind, k * s, axes)


def _combine(ta: Tag, tb: Tag, kind: str, sign: float) -> Tag:
  """ta (+) sign * tb for two shifts of one `kind` ("add": sums, "mul": products)."""
  if ta is None:
    return _scaled(tb, sign) if tb is None or tb == TOP or tb[0] == kind else TOP
  if tb is None:
    return ta if ta == TOP or ta[0] == kind else TOP
  if TOP in (ta, tb) or ta[0] != kind or tb[0] != kind or ta[2] != tb[2]:
    return TOP
  k = ta[1] + sign * tb[1]
  return None if k == 0 else (kind, k, ta[2])


def _relaid(t: Tag, in_shape: tuple, out_shape: tuple) -> Tag:
  """The tag through a reshape that keeps the sequence of non-unit sizes (adding or
  dropping unit axes only); anything else mixes the shifted axes: TOP."""
  nz_in = [i for i, n in enumerate(in_shape) if n != 1]
  nz_out = [i for i, n in enumerate(out_shape) if n != 1]
  if [in_shape[i] for i in nz_in] != [out_shape[i] for i in nz_out]:
    return TOP
  where = {a: nz_out[nz_in.index(a)] for a in t[2]}
  return (t[0], t[1], tuple(where[a] for a in t[2]))


def _literal(v) -> Optional[float]:
  if isinstance(v, jcore.Literal) and np.ndim(v.val) == 0:
    return float(v.val)
  return None


def _rule(eqn, ins: list, sub) -> list:
  """Output tags of one equation whose inputs carry tags `ins` (at least one not INV)."""
  name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
  top = [TOP] * n_out
  if TOP in ins:
    return top
  if name in _CALLS:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      if key in params:
        j = params[key]
        return sub(getattr(j, "jaxpr", j), ins)
    return top
  x = ins[0]
  out_shape = _shape(eqn.outvars[0])
  if len(ins) == 2 and name in ("add", "add_any", "sub", "mul", "div", "max", "min"):
    a, b = ins
    for t, v in ((a, eqn.invars[0]), (b, eqn.invars[1])):
      # A tagged operand broadcast against a higher rank is not followed (only size-1
      # axes of equal rank, or a scalar shift with no axes).
      if t is not None and len(_shape(v)) != len(out_shape) and t[2]:
        return top
    if name in ("add", "add_any"):
      return [_combine(a, b, "add", 1.0)]
    if name == "sub":
      return [_combine(a, b, "add", -1.0)]
    if name in ("max", "min"):  # max(v + s, w + s) = max(v, w) + s; likewise for factors
      return [a if a == b else TOP]
    lit_a, lit_b = _literal(eqn.invars[0]), _literal(eqn.invars[1])
    if name == "mul":
      if a is not None and a[0] == "add" and b is None and lit_b is not None:
        return [_scaled(a, lit_b)]
      if b is not None and b[0] == "add" and a is None and lit_a is not None:
        return [_scaled(b, lit_a)]
      return [_combine(a, b, "mul", 1.0)]
    if a is not None and a[0] == "add" and b is None and lit_b not in (None, 0.0):
      return [_scaled(a, 1.0 / lit_b)]
    return [_combine(a, b, "mul", -1.0)]
  if name == "select_n":  # an eta-free choice between values shifted alike
    return [ins[1]] if ins[0] is None and all(t == ins[1] for t in ins[1:]) else top
  if len(ins) != 1:
    return top
  kind, k, axes = x
  if name == "neg":
    return [_scaled(x, -1.0) if kind == "add" else x]
  if name in _SAME or (name == "convert_element_type"  # jnp: numpy's misses bfloat16
                       and jnp.issubdtype(params["new_dtype"], jnp.floating)):
    return [x]
  if name == "broadcast_in_dim":
    dims = params["broadcast_dimensions"]
    return [(kind, k, tuple(dims[a] for a in axes))]
  if name in ("reshape", "squeeze", "expand_dims"):
    if name == "reshape" and params.get("dimensions") is not None:
      return top
    return [_relaid(x, _shape(eqn.invars[0]), out_shape)]
  if name in ("reduce_sum", "reduce_max", "reduce_min"):
    red = tuple(params["axes"])
    if set(red) & set(axes) or (name == "reduce_sum" and kind == "add"):
      return top
    return [(kind, k, tuple(a - sum(1 for r in red if r < a) for a in axes))]
  unary = {("exp", "add"): ("mul", 1.0), ("log", "mul"): ("add", 1.0),
           ("abs", "mul"): ("mul", 1.0), ("sqrt", "mul"): ("mul", 0.5),
           ("rsqrt", "mul"): ("mul", -0.5), ("square", "mul"): ("mul", 2.0)}
  if (name, kind) in unary:
    new_kind, s = unary[(name, kind)]
    return [(new_kind, k * s, axes)]
  if name == "integer_pow" and kind == "mul":
    return [_scaled(x, float(params["y"]))]
  if name == "sign" and kind == "mul":  # sign(v exp(s)) = sign(v)
    return [None]
  return top


def _propagate(eqns, tags: dict) -> dict:
  """Tags of the variables that `eqns` compute, given those of some of their inputs."""
  def sub(inner, in_tags):
    inner_tags = _propagate(inner.eqns, {v: t for v, t in zip(inner.invars, in_tags)
                                         if t is not None})
    return [_tag(inner_tags, v) for v in inner.outvars]

  for eqn in eqns:
    ins = [_tag(tags, v) for v in eqn.invars]
    if all(t is None for t in ins):
      continue
    # A second stop_gradient of a shifted value is not followed (its own reading as a
    # constant or the identity is decided separately).
    outs = [TOP] * len(eqn.outvars) if eqn.primitive.name == "stop_gradient" else _rule(eqn, ins, sub)
    for o, t in zip(eqn.outvars, outs):
      if t is not None and not isinstance(o, jcore.DropVar):
        tags[o] = t
  return tags


def find(jaxpr, out_needed: Sequence[bool]) -> set[int]:
  """Indices of the `stop_gradient` equations of `jaxpr` that the needed outputs are
  invariant to (see the module docstring); the interpreter reads those as constants.

  Args:
    jaxpr: an open `Jaxpr`.
    out_needed: which outputs the caller needs as functions of eta.
  """
  found = set()
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name != "stop_gradient" or not isinstance(eqn.outvars[0], jcore.Var):
      continue
    c = eqn.outvars[0]
    axes = tuple(a for a, n in enumerate(_shape(c)) if n != 1)
    tags = _propagate(jaxpr.eqns[i + 1:], {c: ("add", 1.0, axes)})
    if all(_tag(tags, v) is None for v, n in zip(jaxpr.outvars, out_needed) if n):
      found.add(i)
  return found
