"""Per-tensor sums that XLA compiles into fast loops on every backend."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# Rows at least this long reduce in vectorized loops; shorter trailing dims are regrouped.
_MIN_ROW = 64
_ROW_LENGTHS = (1024, 512, 256, 128, 64)


def _rows(shape) -> int:
  """Length of the rows a tensor of `shape` is summed by first; 0: sum it in one go."""
  size = math.prod(shape)
  for length in _ROW_LENGTHS:
    if size % length == 0 and size >= 16 * length:
      return length
  if len(shape) >= 2 and shape[-1] >= _MIN_ROW:
    return shape[-1]
  return 0


def sums(arrays: Sequence[jax.Array]) -> list[jax.Array]:
  """The sums of same-shaped float32 arrays, as scalars, in ONE pass over them.

  A multi-operand `lax.reduce` reads its inputs once (separate `jnp.sum`s make XLA
  materialize every fused input), but XLA:CPU emits a multi-operand reduction to a
  scalar as one scalar loop on one core. Summing rows first (a reduction over the
  contiguous minor dimension, split across threads and vectorized) and then the row
  sums keeps the single pass at a fraction of the cost: on a 1M-parameter MLP it took the
  hierarchical optimizer's step from 1.67-1.75x to 1.48-1.53x Adam's (2-core CPU).
  """
  arrays = tuple(arrays)
  if not arrays:
    return []
  shape = arrays[0].shape
  if not shape:
    return list(arrays)
  zeros = tuple(jnp.zeros((), arrays[0].dtype) for _ in arrays)
  add = lambda a, b: tuple(x + y for x, y in zip(a, b))
  length = _rows(shape)
  if length:
    row_sums = jax.lax.reduce(tuple(x.reshape(-1, length) for x in arrays), zeros, add, (1,))
    return list(jax.lax.reduce(row_sums, zeros, add, (0,)))
  return list(jax.lax.reduce(arrays, zeros, add, tuple(range(len(shape)))))
