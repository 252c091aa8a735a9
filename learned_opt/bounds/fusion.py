"""Whole-function rules for activations that jaxprs spell out in several primitives.

`jax.nn.gelu` (tanh form) reaches the interpreter as eight primitives and `jax.nn.silu`
as two. Composing their enclosures primitive by primitive is sound but slow (each step
carries four to six arrays of the activation's size) and loose (x * tanh(...) multiplies
two enclosures of the same x as if they were independent). `find_fusions` spots the
chains in a jaxpr; the interpreter then applies one sharp elementwise rule
(`elementwise.GELU`, `elementwise.SILU`) to the chain's input.

A chain matches only if every intermediate value feeds the next step and nothing else
(and is not an output), and the constants are jax's, rounded to the literal's dtype; anything else
is left to the primitive rules, which are always sound.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax.extend.core as jcore
import numpy as np

from learned_opt.bounds import elementwise as ew


class Step(NamedTuple):
  """One primitive of a chain: `other` is None (unary), "x" (the chain's input) or a
  number (a literal operand with that value); `params` must match the eqn's params."""
  prim: str
  other: Any = None
  params: Optional[dict] = None


class Fusion(NamedTuple):
  """A matched chain: eqns `covered` (indices) compute `outvar` = rule(`invar`)."""
  rule: Any
  invar: Any
  outvar: Any
  covered: tuple[int, ...]


PATTERNS: dict[str, tuple[Any, Sequence[Step]]] = {
    "gelu": (ew.GELU, (Step("integer_pow", params={"y": 3}), Step("mul", ew.GELU_A),
                       Step("add", "x"), Step("mul", ew.GELU_C), Step("tanh"),
                       Step("add", 1.0), Step("mul", 0.5), Step("mul", "x"))),
    "silu": (ew.SILU, (Step("logistic"), Step("mul", "x"))),
}


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Functions traced inside go through the primitive rules only (for comparisons)."""
  saved = dict(PATTERNS)
  PATTERNS.clear()
  try:
    yield
  finally:
    PATTERNS.update(saved)


def _is_var(v) -> bool:
  return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _literal_is(v, value: float) -> bool:
  """The literal equals `value` rounded to the literal's dtype (exactly)."""
  if not isinstance(v, jcore.Literal) or np.ndim(v.val) != 0:
    return False
  val = np.asarray(v.val)
  return bool(np.issubdtype(val.dtype, np.floating) and val == np.asarray(value, val.dtype))


def _step_matches(eqn, step: Step, prev, x) -> bool:
  if eqn.primitive.name != step.prim or len(eqn.outvars) != 1:
    return False
  if step.params is not None and any(eqn.params.get(k) != v for k, v in step.params.items()):
    return False
  ins = list(eqn.invars)
  if step.other is None:
    return ins == [prev] or (len(ins) == 1 and ins[0] is prev)
  if len(ins) != 2 or not any(i is prev for i in ins):
    return False
  other = ins[1] if ins[0] is prev else ins[0]
  if step.other == "x":
    return other is x
  return _literal_is(other, step.other)


def find_fusions(jaxpr) -> dict[int, Fusion]:
  """Chains of `PATTERNS` in `jaxpr`, keyed by the index of their first eqn."""
  consumers: dict[Any, list[int]] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if _is_var(v):
        consumers.setdefault(v, []).append(i)
  outs = {v for v in jaxpr.outvars if _is_var(v)}
  found: dict[int, Fusion] = {}
  taken: set[int] = set()
  for i, eqn in enumerate(jaxpr.eqns):
    if i in taken or len(eqn.invars) < 1 or not _is_var(eqn.invars[0]):
      continue
    for rule, steps in PATTERNS.values():
      fusion = _match(jaxpr, i, rule, steps, consumers, outs)
      if fusion is not None:
        found[i] = fusion
        taken.update(fusion.covered)
        break
  return found


def _match(jaxpr, start, rule, steps, consumers, outs) -> Optional[Fusion]:
  first = jaxpr.eqns[start]
  x = first.invars[0]
  if not _step_matches(first, steps[0], x, x):
    return None
  covered, prev = [start], first.outvars[0]
  for step in steps[1:]:
    users = consumers.get(prev, [])
    if prev in outs or len(users) != 1 or users[0] <= covered[-1]:
      return None
    eqn = jaxpr.eqns[users[0]]
    if not _step_matches(eqn, step, prev, x):
      return None
    covered.append(users[0])
    prev = eqn.outvars[0]
  return Fusion(rule, x, prev, tuple(covered))
