"""Sharp second-order remainder enclosures of the elementwise functions losses use.

For a scalar function f, a point x0 and an interval [lo, hi] holding x0, a rule returns
an interval holding the remainder coefficient

    r(x) = (f(x) - f(x0) - f'(x0) (x - x0)) / (x - x0)^2     for every x in [lo, hi]

(with r(x0) = f''(x0) / 2). Since r(x) = integral_0^1 (1 - s) f''(x0 + s (x - x0)) ds,
r is monotone wherever f'' is (Streeter & Dillon 2022, "Automatically bounding the
Taylor remainder series", Thm. 3), so when f'' is monotone on [lo, hi] the exact range
is [r(lo), r(hi)] (sorted): the *sharp* enclosure. exp, log, log1p, expm1, sqrt, rsqrt,
1/x, x^2, x^3 have a monotone f'' on their domain. tanh, logistic and softplus have a
monotone f'' on pieces split at known points; inside one piece the enclosure is sharp,
across a split it falls back to f''([lo, hi]) / 2 (the Lagrange form; f''([lo, hi]) is
exact from the end points and the split points inside). Kinks (relu, abs, max with a
constant) have their own closed form.

r is evaluated in closed form away from x0 and by its Taylor series near x0, where the
closed form cancels catastrophically; the switch point balances the two errors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from learned_opt.bounds import interval
from learned_opt.bounds.interval import Interval

Fn = Callable[[jax.Array], jax.Array]


def _series_radius(dtype) -> float:
  # Where the series' truncation error (~h^3 f^(5) / 120) meets the closed form's
  # cancellation error (~eps / h^2), for f^(5) of order 10.
  return float((8.0 * jnp.finfo(dtype).eps) ** 0.2)


@dataclasses.dataclass(frozen=True)
class SmoothRule:
  """A C^4 function with f'' monotone between consecutive `splits`.

  Attributes:
    name: the primitive's name (error messages).
    f: the function; d1..d4 its derivatives (all elementwise).
    splits: points where f'' changes direction of monotonicity (sorted).
    scale: the length scale at x0 that decides "near" for the series (|x0| for
      power-like functions, 1 for saturating ones).
    domain_min: the function is defined only for x > domain_min (a range reaching it
      gets an unbounded enclosure).
    remainder_fn: an exact closed form of r(x0, x), if one avoids cancellation.
  """
  name: str
  f: Fn
  d1: Fn
  d2: Fn
  d3: Fn
  d4: Fn
  splits: tuple[float, ...] = ()
  scale: Fn | None = None
  domain_min: float | None = None
  remainder_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  increasing: bool = True
  argmin: float | None = None

  def image(self, x: Interval) -> Interval:
    """{f(x) : x in [lo, hi]}: f is monotone (the domain's edge gives f's limit), or,
    with `argmin`, decreasing before it and increasing after (gelu, silu)."""
    lo, hi = x.lo, x.hi
    if self.domain_min is not None:
      lo, hi = jnp.maximum(lo, self.domain_min), jnp.maximum(hi, self.domain_min)
    a, b = self.f(lo), self.f(hi)
    if self.argmin is not None:
      inside = (lo < self.argmin) & (self.argmin < hi)
      low = jnp.where(inside, self.f(jnp.full_like(lo, self.argmin)), jnp.minimum(a, b))
      return Interval(low, jnp.maximum(a, b))
    return Interval(a, b) if self.increasing else Interval(b, a)

  def value_and_slope(self, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.f(x0), self.d1(x0)

  def _r(self, x0, x, f0, f1, d2, d3, d4):
    h = x - x0
    scale = jnp.ones_like(x0) if self.scale is None else self.scale(x0)
    near = jnp.abs(h) <= _series_radius(x0.dtype) * scale
    series = d2 / 2 + h * (d3 / 6 + h * d4 / 24)
    if self.remainder_fn is not None:
      far = self.remainder_fn(x0, jnp.where(near, x0 + scale, x))
    else:
      # f(x) at the range's ends is also what `image` computes: XLA evaluates it once.
      # Near x0 this divides ~0 by ~0, and the series is selected instead.
      far = (self.f(x) - f0 - f1 * h) / (h * h)
    return jnp.where(near, series, far)

  def remainder(self, x0, lo, hi, f0, f1, fence: Fn | None = None) -> Interval:
    """`fence` (see `enclosure.compose`) marks the two end values worth materializing."""
    d2, d3, d4 = self.d2(x0), self.d3(x0), self.d4(x0)
    r_lo = self._r(x0, lo, f0, f1, d2, d3, d4)
    r_hi = self._r(x0, hi, f0, f1, d2, d3, d4)
    if fence is not None:
      r_lo, r_hi = fence(r_lo), fence(r_hi)
    out_lo, out_hi = jnp.minimum(r_lo, r_hi), jnp.maximum(r_lo, r_hi)
    if self.splits:
      crossed = jnp.zeros(x0.shape, bool)
      g_lo, g_hi = jnp.minimum(self.d2(lo), self.d2(hi)), jnp.maximum(self.d2(lo), self.d2(hi))
      for s in self.splits:
        inside = (lo < s) & (s < hi)
        crossed = crossed | inside
        g_s = self.d2(jnp.full_like(x0, s))
        g_lo = jnp.where(inside, jnp.minimum(g_lo, g_s), g_lo)
        g_hi = jnp.where(inside, jnp.maximum(g_hi, g_s), g_hi)
      out_lo = jnp.where(crossed, 0.5 * g_lo, out_lo)
      out_hi = jnp.where(crossed, 0.5 * g_hi, out_hi)
    if self.domain_min is not None:
      bad = lo <= self.domain_min
      out_lo = jnp.where(bad, -jnp.inf, out_lo)
      out_hi = jnp.where(bad, jnp.inf, out_hi)
    return Interval(out_lo, out_hi)


@dataclasses.dataclass(frozen=True)
class KinkRule:
  """f(x) = left * x for x < 0, right * x for x > 0; `at_zero` is the slope used at 0.

  relu is (0, 1, 0), abs is (-1, 1, 0). On the side of 0 that holds x0, r is 0; across
  the kink r(x) = (right - left) |x| / (x - x0)^2, whose extreme over the far side is at
  x = -x0 (clipped into [lo, hi]). At x0 = 0 exactly, r is unbounded on a side whose
  slope differs from `at_zero`.
  """
  name: str
  left: float
  right: float
  at_zero: float = 0.0

  def _f(self, x):
    return jnp.where(x >= 0, self.right * x, self.left * x)

  def image(self, x: Interval) -> Interval:
    a, b = self._f(x.lo), self._f(x.hi)
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    inside = (x.lo < 0) & (x.hi > 0)
    return Interval(jnp.where(inside, jnp.minimum(lo, 0.0), lo), jnp.where(inside, jnp.maximum(hi, 0.0), hi))

  def value_and_slope(self, x0):
    f0 = self._f(x0)
    f1 = jnp.where(x0 > 0, self.right, jnp.where(x0 < 0, self.left, self.at_zero))
    return f0, f1.astype(x0.dtype)

  def remainder(self, x0, lo, hi, f0, f1, fence=None) -> Interval:
    del f0, f1, fence  # closed forms: cheap to recompute
    jump = self.right - self.left
    crosses = ((x0 > 0) & (lo < 0)) | ((x0 < 0) & (hi > 0))
    p = jnp.clip(-x0, lo, hi)
    den = jnp.where(crosses, (p - x0) ** 2, jnp.ones_like(x0))
    peak = jnp.where(crosses, abs(jump) * jnp.abs(p) / den, 0.0)
    # x0 == 0: unbounded toward a side whose slope is not the one used at 0.
    inf = jnp.full_like(x0, jnp.inf)
    at0 = x0 == 0
    peak = jnp.where(at0 & (hi > 0) & (self.right != self.at_zero), inf, peak)
    peak = jnp.where(at0 & (lo < 0) & (self.left != self.at_zero), inf, peak)
    zero = jnp.zeros_like(x0)
    return Interval(zero, peak) if jump >= 0 else Interval(-peak, zero)


@dataclasses.dataclass(frozen=True)
class PolyRule:
  """x^2 (r = 1) and x^3 (r = 3 x0 + h): exact ranges."""
  name: str
  power: int

  def value_and_slope(self, x0):
    return x0 ** self.power, self.power * x0 ** (self.power - 1)

  def image(self, x: Interval) -> Interval:
    if self.power == 2:
      return interval.square(x)
    return Interval(x.lo ** 3, x.hi ** 3)

  def remainder(self, x0, lo, hi, f0, f1, fence=None) -> Interval:
    del f0, f1, fence  # closed forms: cheap to recompute
    if self.power == 2:
      one = jnp.ones_like(x0)
      return Interval(one, one)
    assert self.power == 3, self.power
    return Interval(2 * x0 + lo, 2 * x0 + hi)


@dataclasses.dataclass(frozen=True)
class ReciprocalRule:
  """1/x: r(x) = 1 / (x0^2 x) exactly, decreasing on each side of 0."""
  name: str = "reciprocal"

  def value_and_slope(self, x0):
    return 1.0 / x0, -1.0 / (x0 * x0)

  def image(self, x: Interval) -> Interval:
    ok = (x.lo > 0) | (x.hi < 0)
    return Interval(jnp.where(ok, 1.0 / x.hi, -jnp.inf), jnp.where(ok, 1.0 / x.lo, jnp.inf))

  def remainder(self, x0, lo, hi, f0, f1, fence=None) -> Interval:
    del f0, f1, fence  # closed forms: cheap to recompute
    ok = (lo > 0) | (hi < 0)
    inv = 1.0 / (x0 * x0)
    r_lo = jnp.where(ok, inv / hi, -jnp.inf)
    r_hi = jnp.where(ok, inv / lo, jnp.inf)
    return Interval(r_lo, r_hi)


def _sig(x):
  return jax.nn.sigmoid(x)


def _q(x):
  s = _sig(x)
  return s * (1 - s)


def _tanh_d1(x):
  t = jnp.tanh(x)
  return 1 - t * t


def _tanh_d2(x):
  t = jnp.tanh(x)
  return -2 * t * (1 - t * t)


def _tanh_d3(x):
  t = jnp.tanh(x)
  return (6 * t * t - 2) * (1 - t * t)


def _tanh_d4(x):
  t = jnp.tanh(x)
  return 8 * t * (1 - t * t) * (2 - 3 * t * t)


def _log_r(x0, x):
  u = (x - x0) / x0
  return (jnp.log1p(u) - u) / ((x - x0) ** 2)


# f'' of tanh turns at +-atanh(1/sqrt(3)); of the logistic at +-log(2 + sqrt(3)).
_TANH_SPLIT = math.atanh(1 / math.sqrt(3))
_LOGISTIC_SPLIT = math.log(2 + math.sqrt(3))

EXP = SmoothRule("exp", jnp.exp, jnp.exp, jnp.exp, jnp.exp, jnp.exp)
EXPM1 = SmoothRule("expm1", jnp.expm1, jnp.exp, jnp.exp, jnp.exp, jnp.exp)
LOG = SmoothRule("log", jnp.log, lambda x: 1 / x, lambda x: -1 / x**2, lambda x: 2 / x**3,
                 lambda x: -6 / x**4, scale=jnp.abs, domain_min=0.0, remainder_fn=_log_r)
TANH = SmoothRule("tanh", jnp.tanh, _tanh_d1, _tanh_d2, _tanh_d3, _tanh_d4,
                  splits=(-_TANH_SPLIT, _TANH_SPLIT))
LOGISTIC = SmoothRule("logistic", _sig, _q, lambda x: _q(x) * (1 - 2 * _sig(x)),
                      lambda x: _q(x) * (1 - 6 * _q(x)),
                      lambda x: _q(x) * (1 - 2 * _sig(x)) * (1 - 12 * _q(x)),
                      splits=(-_LOGISTIC_SPLIT, _LOGISTIC_SPLIT))
SOFTPLUS = SmoothRule("softplus", jax.nn.softplus, _sig, _q, lambda x: _q(x) * (1 - 2 * _sig(x)),
                      lambda x: _q(x) * (1 - 6 * _q(x)), splits=(0.0,))
SQRT = SmoothRule("sqrt", jnp.sqrt, lambda x: 0.5 * x**-0.5, lambda x: -0.25 * x**-1.5,
                  lambda x: 0.375 * x**-2.5, lambda x: -0.9375 * x**-3.5, scale=jnp.abs,
                  domain_min=0.0)
RSQRT = SmoothRule("rsqrt", jax.lax.rsqrt, lambda x: -0.5 * x**-1.5, lambda x: 0.75 * x**-2.5,
                   lambda x: -1.875 * x**-3.5, lambda x: 6.5625 * x**-4.5, scale=jnp.abs,
                   domain_min=0.0, increasing=False)
RELU = KinkRule("relu", 0.0, 1.0)
ABS = KinkRule("abs", -1.0, 1.0)
SQUARE = PolyRule("square", 2)
CUBE = PolyRule("cube", 3)
RECIPROCAL = ReciprocalRule()


# jax.nn.gelu(approximate=True) = x/2 (1 + tanh(c (x + a x^3))). Its f'' is even, largest
# at 0 and smallest at +-GELU_SPLIT (the roots of the third derivative), monotone in
# between and beyond; f falls to its minimum at GELU_ARGMIN, then rises. Roots by Newton's
# method in float64 (residuals ~1e-16): an error e in a root moves f'' or f there by
# O(e^2), far below rounding. silu(x) = x logistic(x) has the same shape.
GELU_A, GELU_C = 0.044715, math.sqrt(2 / math.pi)
GELU_SPLIT, GELU_ARGMIN = 2.0134807246242574, -0.7524614220710163
SILU_SPLIT, SILU_ARGMIN = 3.435840993535111, -1.278464542761074


def gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(GELU_C * (x + GELU_A * x * x * x)))


def silu(x):
  return x * jax.nn.sigmoid(x)


# The derivatives of gelu and silu are written out (x s(x) with s = (1 + tanh(u)) / 2 or
# the logistic: f^(k) = k s^(k-1) + x s^(k)), not taken by nested autodiff: four nested
# jvps of the tanh chain gave XLA a few hundred operations per element, and the gelu
# rule on a transformer's hidden layer cost 2.5x the tanh rule. tests/test_bounds.py
# checks these against autodiff in float64.
def _gelu_tanh_derivatives(x, order: int):
  """(s^(order - 1), s^(order)) for s = (1 + tanh(u)) / 2, u = c (x + a x^3)."""
  t = jnp.tanh(GELU_C * (x + GELU_A * x * x * x))
  sech2 = 1 - t * t
  u1 = GELU_C * (1 + 3 * GELU_A * x * x)
  u2 = 6 * GELU_C * GELU_A * x
  u3 = 6 * GELU_C * GELU_A
  # tanh(u)' = sech2 u1; the higher ones are sech2 times a polynomial in t, u1, u2, u3.
  p2 = u2 - 2 * t * u1 * u1
  p3 = u3 - 6 * t * u1 * u2 + (6 * t * t - 2) * u1 * u1 * u1
  p4 = (-6 * sech2 * u1 * u1 * u2 - 6 * t * (u2 * u2 + u1 * u3) + 12 * t * sech2 * u1 ** 4
        + 3 * (6 * t * t - 2) * u1 * u1 * u2 - 2 * t * u1 * p3)
  series = (0.5 * (1 + t), 0.5 * sech2 * u1, 0.5 * sech2 * p2, 0.5 * sech2 * p3, 0.5 * sech2 * p4)
  return series[order - 1], series[order]


def _logistic_derivatives(x, order: int):
  """(s^(order - 1), s^(order)) for the logistic s."""
  s = jax.nn.sigmoid(x)
  q = s * (1 - s)
  series = (s, q, q * (1 - 2 * s), q * (1 - 6 * q), q * (1 - 2 * s) * (1 - 12 * q))
  return series[order - 1], series[order]


def _x_times(derivatives: Callable, order: int) -> Fn:
  """The order-th derivative of x s(x): order s^(order-1) + x s^(order)."""
  def d(x):
    lower, same = derivatives(x, order)
    return order * lower + x * same
  return d


GELU = SmoothRule("gelu", gelu_tanh, *(_x_times(_gelu_tanh_derivatives, k) for k in (1, 2, 3, 4)),
                  splits=(-GELU_SPLIT, 0.0, GELU_SPLIT), argmin=GELU_ARGMIN)
SILU = SmoothRule("silu", silu, *(_x_times(_logistic_derivatives, k) for k in (1, 2, 3, 4)),
                  splits=(-SILU_SPLIT, 0.0, SILU_SPLIT), argmin=SILU_ARGMIN)


def log1p_rule() -> SmoothRule:
  shift = lambda fn: (lambda x: fn(1 + x))
  return SmoothRule("log1p", jnp.log1p, shift(LOG.d1), shift(LOG.d2), shift(LOG.d3), shift(LOG.d4),
                    scale=lambda x: jnp.abs(1 + x), domain_min=-1.0,
                    remainder_fn=lambda x0, x: _log_r(1 + x0, 1 + x))


LOG1P = log1p_rule()
