"""Second-degree Taylor enclosures of functions of the step size eta, and their arithmetic.

An `Enclosure` of an array-valued function v(eta) over the trust region [0, t] is

    v(eta) in c0 + c1 * eta + [lo, hi] * eta^2      for every eta in [0, t], elementwise,

with c0 = v(0) and c1 = v'(0) exact and the remainder coefficient an interval
(Streeter & Dillon 2022, Sec. 3). Inputs x0 + eta * d are exact (remainder None, read as
[0, 0]). Every operation maps enclosures of its inputs to an enclosure of its output, so
pushing the input enclosure through a function bounds its Taylor remainder.

Two derived intervals do most of the work: Y = c1 + [0, t] * [lo, hi], which holds
(v(eta) - c0) / eta, and the range of v over the region, c0 + [0, t] * Y.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from learned_opt.bounds import interval as iv
from learned_opt.bounds.interval import Interval


class Enclosure(NamedTuple):
  """c0 + c1 eta + rem eta^2 over [0, t]; `rem` None means exactly [0, 0].

  `rng`, when known, is a second enclosure of the values over the region from plain
  interval arithmetic (e.g. exp(x) > 0); it is intersected with c0 + [0, t] Y, which
  alone can dip below 0 for a positive quantity and send log or rsqrt off their domain.
  It is carried through cheap operations only (elementwise, structural, sums; through
  matmuls and convolutions only inside recurrences, see `bilinear`).
  """
  c0: jax.Array
  c1: jax.Array
  rem: Optional[Interval] = None
  rng: Optional[Interval] = None

  @property
  def shape(self):
    return self.c0.shape

  @property
  def dtype(self):
    return self.c0.dtype


def lift(x: jax.Array) -> Enclosure:
  """A constant as an enclosure (zero slope, zero remainder)."""
  x = jnp.asarray(x)
  return Enclosure(x, jnp.zeros_like(x), None)


def full(e: Enclosure) -> Enclosure:
  """The same enclosure with an explicit remainder and no range (one pytree structure
  for loop carries and branches)."""
  return Enclosure(e.c0, e.c1, remainder(e), None)


def remainder(e: Enclosure) -> Interval:
  return e.rem if e.rem is not None else iv.zeros_like(e.c0)


def slope_interval(e: Enclosure, t: jax.Array) -> Interval:
  """Y = c1 + [0, t] * rem, which holds (v(eta) - v(0)) / eta on (0, t]."""
  if e.rem is None:
    return iv.point(e.c1)
  return iv.add_point(iv.times_unit(e.rem, t), e.c1)


def value_range(e: Enclosure, t: jax.Array) -> Interval:
  """The range of v(eta) over [0, t]."""
  derived = iv.add_point(iv.times_unit(slope_interval(e, t), t), e.c0)
  return derived if e.rng is None else iv.intersect(derived, e.rng)


def _rng_of(x) -> Optional[Interval]:
  """The known range of an enclosure, or the point range of a constant."""
  return x.rng if isinstance(x, Enclosure) else iv.point(jnp.asarray(x))


def _add_rem(a: Optional[Interval], b: Optional[Interval]) -> Optional[Interval]:
  if a is None:
    return b
  if b is None:
    return a
  return iv.add(a, b)


def add(a: Enclosure, b: Enclosure, t: jax.Array) -> Enclosure:
  out = Enclosure(a.c0 + b.c0, a.c1 + b.c1, _add_rem(a.rem, b.rem))
  if a.rng is None and b.rng is None:
    return out
  return out._replace(rng=iv.add(value_range(a, t), value_range(b, t)))


def add_const(a: Enclosure, p: jax.Array) -> Enclosure:
  return Enclosure(a.c0 + p, a.c1, a.rem, None if a.rng is None else iv.add_point(a.rng, p))


def neg(a: Enclosure) -> Enclosure:
  return Enclosure(-a.c0, -a.c1, None if a.rem is None else iv.neg(a.rem),
                   None if a.rng is None else iv.neg(a.rng))


def sub(a: Enclosure, b: Enclosure, t: jax.Array) -> Enclosure:
  return add(a, neg(b), t)


def scale(a: Enclosure, p: jax.Array) -> Enclosure:
  """a * p for a constant p (broadcasting)."""
  return Enclosure(a.c0 * p, a.c1 * p, None if a.rem is None else iv.scale(a.rem, p),
                   None if a.rng is None else iv.scale(a.rng, p))


def divide(a: Enclosure, p: jax.Array) -> Enclosure:
  """a / p for a constant p: divides (rather than multiplies by 1/p) so c0 rounds like f."""
  def div(i):
    if i is None:
      return None
    x, y = i.lo / p, i.hi / p
    return Interval(jnp.minimum(x, y), jnp.maximum(x, y))
  return Enclosure(a.c0 / p, a.c1 / p, div(a.rem), div(a.rng))


def positive_map(a: Enclosure, f: Callable[[jax.Array], jax.Array]) -> Enclosure:
  """A linear map with nonnegative coefficients (reshape, slice, gather, sum, ...)."""
  pm = lambda i: None if i is None else Interval(f(i.lo), f(i.hi))
  return Enclosure(f(a.c0), f(a.c1), pm(a.rem), pm(a.rng))


def _product(op_pp, op_pi, op_ip, op_ii, a: Enclosure, b: Enclosure, t) -> Enclosure:
  """(a0 + a1 e + A e^2)(b0 + b1 e + B e^2) = a0 b0 + (a0 b1 + a1 b0) e
  + (a0 B + A b0 + Ya Yb) e^2, with Ya, Yb the slope intervals: an enclosure for any
  product that is bilinear (elementwise multiplication, matmul, convolution)."""
  c0 = op_pp(a.c0, b.c0)
  c1 = op_pp(a.c0, b.c1) + op_pp(a.c1, b.c0)
  rem = None
  if b.rem is not None:
    rem = _add_rem(rem, op_pi(a.c0, b.rem))
  if a.rem is not None:
    rem = _add_rem(rem, op_ip(a.rem, b.c0))
  ya, yb = slope_interval(a, t), slope_interval(b, t)
  if a.rem is None and b.rem is None:
    yy = iv.point(op_pp(a.c1, b.c1))
  elif a.rem is None:
    yy = op_pi(a.c1, yb)
  elif b.rem is None:
    yy = op_ip(ya, b.c1)
  else:
    yy = op_ii(ya, yb)
  return Enclosure(c0, c1, _add_rem(rem, yy))


def mul(a: Enclosure, b: Enclosure, t: jax.Array) -> Enclosure:
  """Elementwise product of two enclosures (exact interval products)."""
  out = _product(jnp.multiply, lambda p, i: iv.scale(i, p), lambda i, p: iv.scale(i, p),
                 iv.mul, a, b, t)
  if a.rng is None and b.rng is None:
    return out
  return out._replace(rng=iv.mul(value_range(a, t), value_range(b, t)))


def bilinear(op: iv.Bilinear, a: Enclosure, b: Enclosure, t: jax.Array, *,
             ranges: bool = False) -> Enclosure:
  """op(a, b) for a bilinear op of two enclosures (dot_general, conv), midpoint-radius.

  With `ranges`, an input's known range (it comes out of a nonlinearity) also gives the
  output's (three more calls of op). The interpreter asks for it inside recurrences
  (`scan`), where the Taylor form's own range compounds step after step. Elsewhere it
  costs a third of a dense layer and left the MLP (relu, tanh), logistic regression and
  transformer bounds unchanged; it did matter for one LSTM config (see
  benchmarks/README_saferate.md, families).
  """
  out = _product(op, lambda p, i: iv.bilinear_pi(op, p, i), lambda i, p: iv.bilinear_ip(op, i, p),
                 lambda i, j: iv.bilinear_ii(op, i, j), a, b, t)
  if not ranges or (a.rng is None and b.rng is None):
    return out
  return out._replace(rng=iv.bilinear_ii(op, value_range(a, t), value_range(b, t)))


def bilinear_const(op: iv.Bilinear, a, b, t: jax.Array, *, ranges: bool = False) -> Enclosure:
  """op(a, b) where exactly one of a, b is a constant array: a linear map of the other
  (`ranges` as in `bilinear`)."""
  if isinstance(a, Enclosure):
    rem = None if a.rem is None else iv.bilinear_ip(op, a.rem, b)
    rng = None if a.rng is None or not ranges else iv.bilinear_ip(op, value_range(a, t), b)
    return Enclosure(op(a.c0, b), op(a.c1, b), rem, rng)
  rem = None if b.rem is None else iv.bilinear_pi(op, a, b.rem)
  rng = None if b.rng is None or not ranges else iv.bilinear_pi(op, a, value_range(b, t))
  return Enclosure(op(a, b.c0), op(a, b.c1), rem, rng)


def _fence(t: jax.Array, dtype) -> Callable[[jax.Array], jax.Array]:
  """x -> x / 1, with a 1 that XLA cannot fold (it comes from the traced trust region).

  XLA:CPU fuses a chain of cheap elementwise ops into every loop that reads its result
  and has no multi-output loop fusion, so a remainder rule's few hundred adds and
  multiplies were evaluated once per consumer (the interval's two ends, then the
  midpoint and radius that each following matmul reads: up to 8 times). A float divide
  counts as expensive, which XLA does not duplicate: the chain is computed once and
  written out (the bound pass 9% faster on the transformer LM, 14% on the MLP). x / 1 is
  exact; float32 bounds move in the 6th digit only because XLA's loops, split
  differently, round differently. `optimization_barrier` cannot do this: XLA:CPU removes
  it before fusion. With a constant t the 1 folds away and nothing changes.
  """
  s = jnp.clip(jnp.asarray(t, dtype), 1.0, 2.0)
  one = s / s
  return lambda x: x / one


def compose(rule, a: Enclosure, t: jax.Array) -> Enclosure:
  """f(a) for an elementwise rule (see `elementwise`):
  f(a0 + eta Y) = f(a0) + f'(a0) (a1 eta + A eta^2) + r(range) (eta Y)^2."""
  f0, f1 = rule.value_and_slope(a.c0)
  y = slope_interval(a, t)
  rng = value_range(a, t)
  fence = _fence(t, f0.dtype)
  r = rule.remainder(a.c0, rng.lo, rng.hi, f0, f1, fence=fence)
  rem = iv.mul_nonneg(r, iv.square(y))
  if a.rem is not None:
    rem = iv.add(rem, iv.scale(a.rem, f1))
  return Enclosure(f0, f1 * a.c1, Interval(fence(rem.lo), fence(rem.hi)), rule.image(rng))
