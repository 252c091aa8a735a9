"""Elementwise interval arithmetic on arrays: the remainder coefficients of enclosures.

An `Interval` is a pair of arrays `lo <= hi` of one shape; each element is a closed
interval. Only the operations the Taylor-enclosure arithmetic needs are here: sums,
products, squares, scaling by a point, the product with [0, t] (a power of the step
size over the trust region) and bilinear maps (matmul, convolution) through the
midpoint-radius form, which costs two or four calls of the map instead of the eight
an endpoint form would need (Rump, "Fast and parallel interval arithmetic", 1999).

Rounding is not directed (JAX has no rounding-mode control); as in Streeter & Dillon
(2022), bounds are exact in real arithmetic and float64 keeps the rounding error far
below the enclosure widths that matter.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Interval(NamedTuple):
  """Closed intervals [lo, hi], elementwise; `lo` and `hi` are arrays of one shape."""
  lo: jax.Array
  hi: jax.Array

  @property
  def mid(self) -> jax.Array:
    return 0.5 * (self.lo + self.hi)

  @property
  def rad(self) -> jax.Array:
    return 0.5 * (self.hi - self.lo)


def point(x: jax.Array) -> Interval:
  return Interval(x, x)


def zeros_like(x: jax.Array) -> Interval:
  z = jnp.zeros_like(x)
  return Interval(z, z)


def add(a: Interval, b: Interval) -> Interval:
  return Interval(a.lo + b.lo, a.hi + b.hi)


def add_point(a: Interval, p: jax.Array) -> Interval:
  return Interval(a.lo + p, a.hi + p)


def neg(a: Interval) -> Interval:
  return Interval(-a.hi, -a.lo)


def scale(a: Interval, p: jax.Array) -> Interval:
  """a * p for a point p (broadcasting). p == 0 gives [0, 0] even if a is unbounded: a
  masked-out unit must not turn an unbounded remainder into NaN."""
  x, y = a.lo * p, a.hi * p
  zero = p == 0
  return Interval(jnp.where(zero, 0.0, jnp.minimum(x, y)), jnp.where(zero, 0.0, jnp.maximum(x, y)))


def mul(a: Interval, b: Interval) -> Interval:
  """The exact interval product, elementwise (broadcasting)."""
  p1, p2, p3, p4 = a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi
  return Interval(jnp.minimum(jnp.minimum(p1, p2), jnp.minimum(p3, p4)),
                  jnp.maximum(jnp.maximum(p1, p2), jnp.maximum(p3, p4)))


def mul_nonneg(a: Interval, b: Interval) -> Interval:
  """a * b for b >= 0 elementwise; b == [0, 0] gives [0, 0] even if a is unbounded (a
  remainder that blows up where the direction is exactly 0 multiplies nothing)."""
  p1, p2, p3, p4 = a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi
  zero = b.hi == 0
  return Interval(jnp.where(zero, 0.0, jnp.minimum(jnp.minimum(p1, p2), jnp.minimum(p3, p4))),
                  jnp.where(zero, 0.0, jnp.maximum(jnp.maximum(p1, p2), jnp.maximum(p3, p4))))


def square(a: Interval) -> Interval:
  """{x^2 : x in a}, sharp (not a * a, which would go below 0 when a contains 0)."""
  l2, h2 = a.lo * a.lo, a.hi * a.hi
  lo = jnp.where(a.lo >= 0, l2, jnp.where(a.hi <= 0, h2, jnp.zeros_like(l2)))
  return Interval(lo, jnp.maximum(l2, h2))


def times_unit(a: Interval, t: jax.Array) -> Interval:
  """a * [0, t] for a scalar t >= 0: the hull of {0} and t * a."""
  return Interval(jnp.minimum(a.lo * t, 0.0), jnp.maximum(a.hi * t, 0.0))


def hull(a: Interval, b: Interval) -> Interval:
  return Interval(jnp.minimum(a.lo, b.lo), jnp.maximum(a.hi, b.hi))


def intersect(a: Interval, b: Interval) -> Interval:
  """a and b both hold the same quantity; their intersection holds it too."""
  return Interval(jnp.maximum(a.lo, b.lo), jnp.minimum(a.hi, b.hi))


def from_midrad(mid: jax.Array, rad: jax.Array) -> Interval:
  return Interval(mid - rad, mid + rad)


Bilinear = Callable[[jax.Array, jax.Array], jax.Array]


def bilinear_pi(op: Bilinear, p: jax.Array, b: Interval) -> Interval:
  """op(p, b) for a point p and an interval b (op linear in each argument)."""
  return from_midrad(op(p, b.mid), op(jnp.abs(p), b.rad))


def bilinear_ip(op: Bilinear, a: Interval, p: jax.Array) -> Interval:
  """op(a, p) for an interval a and a point p."""
  return from_midrad(op(a.mid, p), op(a.rad, jnp.abs(p)))


def bilinear_ii(op: Bilinear, a: Interval, b: Interval) -> Interval:
  """op(a, b) for two intervals: |mid a| rad b + rad a |mid b| + rad a rad b around op(mid a, mid b)."""
  am, ar, bm, br = a.mid, a.rad, b.mid, b.rad
  rad = op(jnp.abs(am), br) + op(ar, jnp.abs(bm) + br)
  return from_midrad(op(am, bm), rad)
