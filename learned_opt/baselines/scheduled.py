"""Scheduled baselines, as practitioners run them: AdamW and Muon under linear warmup and
cosine decay, and schedule-free AdamW.

The schedule is the one the learned-optimizer literature compares against (VeLO, Celo,
Celo2): the learning rate rises linearly from 0 over the first `warmup_fraction` of the
step budget to its peak, then follows a cosine down to 0 at the budget's end
(`optax.warmup_cosine_decay_schedule`). The peak is the one hyperparameter `lopt eval`
tunes. Weight decay is fixed, not tuned: `ADAMW_WEIGHT_DECAY` (decoupled, multiplied by
the learning rate, on matrices only for AdamW; optax's schedule-free AdamW has no mask).
"""
from __future__ import annotations

from typing import Any

import optax

from learned_opt.baselines.adam_muon import adamw, muon

WARMUP_FRACTION = 0.05
ADAMW_WEIGHT_DECAY = 1e-4


def warmup_steps(num_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> int:
  """Steps of linear warmup: `warmup_fraction` of the budget, at least 1."""
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int (the step budget), got {num_steps!r}")
  if not 0.0 <= warmup_fraction < 1.0:
    raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
  return max(1, round(warmup_fraction * num_steps))


def warmup_cosine(learning_rate: Any, num_steps: int, *,
                  warmup_fraction: float = WARMUP_FRACTION) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to 0 at `num_steps`.

  Args:
    learning_rate: the peak rate (a float or a traced scalar: `lopt eval` vmaps a grid).
    num_steps: the step budget; the rate is 0 at step `num_steps`.
    warmup_fraction: share of the budget spent warming up (at least one step).
  """
  # The schedule is linear in its peak (it starts and ends at 0), so the peak multiplies
  # optax's unit schedule: optax's own function branches on the peak in Python, which a
  # traced (vmapped) peak cannot do.
  unit = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0, warmup_steps=warmup_steps(num_steps, warmup_fraction),
      decay_steps=num_steps, end_value=0.0)
  return lambda count: learning_rate * unit(count)


def adamw_cosine(learning_rate: Any, num_steps: int, *, weight_decay: float = ADAMW_WEIGHT_DECAY,
                 warmup_fraction: float = WARMUP_FRACTION, **adamw_kwargs) -> optax.GradientTransformation:
  """`learned_opt.baselines.adamw` (Loshchilov & Hutter 2019) under `warmup_cosine`."""
  return adamw(warmup_cosine(learning_rate, num_steps, warmup_fraction=warmup_fraction),
               weight_decay=weight_decay, **adamw_kwargs)


def muon_cosine(learning_rate: Any, num_steps: int, *, warmup_fraction: float = WARMUP_FRACTION,
                **muon_kwargs) -> optax.GradientTransformation:
  """`learned_opt.baselines.muon` (Muon on hidden matrices, Adam elsewhere, one rate)
  under `warmup_cosine`."""
  return muon(warmup_cosine(learning_rate, num_steps, warmup_fraction=warmup_fraction),
              **muon_kwargs)


def schedule_free_adamw(learning_rate: Any, num_steps: int, *,
                        weight_decay: float = ADAMW_WEIGHT_DECAY,
                        warmup_fraction: float = WARMUP_FRACTION) -> optax.GradientTransformationExtraArgs:
  """`optax.contrib.schedule_free_adamw` (Defazio et al. 2024) with the same warmup.

  Its gradients are taken at an interpolation of its iterates; evaluate the model at
  `optax.contrib.schedule_free_eval_params(state, params)` (`lopt eval` does).
  """
  return optax.contrib.schedule_free_adamw(
      learning_rate, warmup_steps=warmup_steps(num_steps, warmup_fraction),
      weight_decay=weight_decay)
