"""Small jaxpr helpers shared by the interpreter and its rules (kept apart so that
neither imports the other)."""
from __future__ import annotations

from typing import Sequence

import jax.extend.core as jcore


class UnsupportedPrimitiveError(NotImplementedError):
  """A primitive that has no enclosure rule is applied to a value that depends on eta."""


def forward_dependence(jaxpr, in_dep: Sequence[bool]) -> list[bool]:
  """Which outputs depend on eta, given which inputs do (conservative through calls;
  `stop_gradient` passes the dependence on: its value is its input's)."""
  dep = {v for v, d in zip(jaxpr.invars, in_dep) if d}
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jcore.Var) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return [isinstance(v, jcore.Var) and v in dep for v in jaxpr.outvars]


def bind(prim, params, args):
  """Evaluates one primitive on plain arrays, as `jax.core.eval_jaxpr` does."""
  out = prim.bind(*args, **prim.get_bind_params(params))
  return list(out) if prim.multiple_results else [out]
