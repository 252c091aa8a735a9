"""What the fused kernel's inputs look like (no Pallas here: importing this module does
not load the kernel, which `per_param` imports on the first fused update)."""
from __future__ import annotations

from typing import NamedTuple

import jax

# Channel kinds the kernel computes itself from (g, p, m, v); anything else arrives
# precomputed and already normalized as a "side" channel.
IN_KERNEL = ("grad", "clipped_grad", "param", "momentum", "rms", "adam")


class Channel(NamedTuple):
  """One input channel of the network: `kind` in IN_KERNEL or "side", and an index
  (the momentum decay for momentum/adam, the row of the side array for side)."""
  kind: str
  index: int = 0


class LeafScalars(NamedTuple):
  """Per-tensor scalars, packed into one small array: see `leaf_update`."""
  grad_rsqrt_ms: jax.Array  # 1 / sqrt(mean(g^2) + tiny): the clipped_grad normalizer
  step: jax.Array           # multiplier of d * exp(exp_mult * s)
  weight_decay: jax.Array   # coefficient of -p
  out_scale: jax.Array      # final multiplier (muP)
