"""Taylor-polynomial enclosures of functions along a direction (our AutoBound).

`taylor_bounds(fn, x0, d, t)` returns f(0), f'(0) and an interval [lo, hi] with
f(0) + f'(0) eta + lo eta^2 <= fn(x0 + eta d) <= f(0) + f'(0) eta + hi eta^2 for every
eta in [0, t] (Streeter & Dillon 2022). SafeRate (`learned_opt.baselines.saferate`) is
built on it.
"""
from learned_opt.bounds.enclosure import Enclosure
from learned_opt.bounds.interpreter import TaylorBounds, UnsupportedPrimitiveError, taylor_bounds
from learned_opt.bounds.interval import Interval

__all__ = ["Enclosure", "Interval", "TaylorBounds", "UnsupportedPrimitiveError", "taylor_bounds"]
