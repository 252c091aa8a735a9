"""`NormalizedMLP` as optax transforms: its direction, and the one-call recipe.

`scale_by_normalized_mlp` is the learned direction as an optax `scale_by_*` transform
(unit RMS per tensor, signed like the gradient), to be followed by
`optax.add_decayed_weights(wd)` and `optax.scale_by_learning_rate(lr_or_schedule)`.

`normalized_mlp(lopt, meta_params, learning_rate)` is that chain with the harness of
Celo2 (Moudgil, Knyazev & Belilovsky, ICLR 2026): the parameters are split by the rule
of `learned_opt.baselines.muon` (`muon_labels`: hidden weight tensors versus biases,
norms, embeddings, the output head and every leaf of rank < 2). Hidden weight tensors
get the learned direction orthogonalized by Newton-Schulz and scaled as optax's Muon
scales its updates (`sqrt(max(1, fan_out / fan_in))`, or `consistent_rms`), reshaped by
`muon_dimension_numbers`; everything else gets `optax.adamw` at the same learning rate
or schedule. Both parts use the same decoupled weight decay and mask.
`learned_head_labels` is the partition of Celo2's released code instead: the output
head takes the learned rule too.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from learned_opt.base import LearnedOptimizer, check_positive
from learned_opt.baselines.adam_muon import MUON, decay_mask, muon_dimension_numbers
from learned_opt.baselines.scheduled import ADAMW_WEIGHT_DECAY
from learned_opt.features import NS_COEFFS, NS_STEPS
from learned_opt.optax_adapter import scale_by_learned_direction

# `NormalizedMLP` (learned_opt.normalized) is not imported here: its meta-training runs
# this module's harness, so it imports this module; the factories check `lopt.name`.

try:  # optax exposes these only from its contrib/_muon module (no public alias in 0.2.x).
  from optax.contrib._muon import orthogonalize_via_newton_schulz, scale_by_shape
except ImportError:  # pragma: no cover - depends on the optax version
  orthogonalize_via_newton_schulz = scale_by_shape = None

Params = Any
LEARNED, ADAMW = "learned", "adamw"
_is_dims = lambda x: isinstance(x, MuonDimensionNumbers)


def scale_by_normalized_mlp(lopt: LearnedOptimizer, meta_params, *, num_steps: Optional[int] = None,
                            seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The learned direction `d` of `NormalizedMLP`: per tensor RMS 1, signed like the
  gradient, so `optax.scale_by_learning_rate(lr)` after it applies `-lr * d` (the
  sign convention of `learned_opt.normalized`).

  Args:
    lopt: the architecture.
    meta_params: its meta-parameters.
    num_steps: the training horizon (needed only with the "train_frac" feature).
    seed: seed of the PRNG keys used when `update` gets no `key`.

  Returns:
    An `optax.GradientTransformationExtraArgs` (forwards `loss` and `key`).
  """
  if getattr(lopt, "name", None) != "normalized_mlp":
    raise TypeError(f"scale_by_normalized_mlp expects a NormalizedMLP, got {type(lopt).__name__}")
  return scale_by_learned_direction(lopt, meta_params, num_steps=num_steps, seed=seed)


def _branch_dims(tree: Params) -> Params:
  """Dimension numbers of the learned branch's leaves (the others are masked out, so
  every leaf left is a hidden weight): reshaped by path and rank alone, since the head
  rule of `muon_labels` would misread a tree with the head masked out."""
  return muon_dimension_numbers(tree, jax.tree.map(lambda _: MUON, tree))


def _orthogonalize(ns_steps: int, eps: float) -> optax.GradientTransformation:
  """Newton-Schulz orthogonalization of every leaf (optax's Muon iteration, in float32)."""
  coeffs = jnp.asarray(NS_COEFFS, jnp.float32)

  def update_fn(updates, state, params=None):
    del params
    ortho = lambda x, dims: orthogonalize_via_newton_schulz(
        x.astype(jnp.float32), coeffs, ns_steps, eps=eps, dimension_numbers=dims).astype(x.dtype)
    return jax.tree.map(ortho, updates, _branch_dims(updates), is_leaf=_is_dims), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def partition_labels(label_fn: Optional[Callable[[Params], Params]] = None
                     ) -> Callable[[Params], Params]:
  """`params -> labels` of the harness: "learned" where `muon` would use Muon, "adamw"
  elsewhere (`label_fn` as in `learned_opt.baselines.muon`; default `muon_labels`)."""
  def labels(tree):
    dims = muon_dimension_numbers(tree, None if label_fn is None else label_fn(tree))
    return jax.tree.map(lambda d: ADAMW if d is None else LEARNED, dims,
                        is_leaf=lambda x: x is None or _is_dims(x))
  return labels


def learned_head_labels(params: Params) -> Params:
  """Celo2's released partition (`label_fn` for `normalized_mlp`): every tensor of rank
  >= 2 takes the learned rule, the output head included, except embeddings (a path
  component containing `embed`); biases, norms and other rank < 2 leaves take AdamW.
  (`muon_labels`, the default, also gives the head to AdamW.)"""
  def label(path, x):
    embed = any("embed" in str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path)
    return MUON if x.ndim >= 2 and not embed else "adam"
  return jax.tree_util.tree_map_with_path(label, params)


def normalized_mlp(lopt: LearnedOptimizer, meta_params, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = ADAMW_WEIGHT_DECAY,
                   weight_decay_mask: Optional[Callable[[Params], Params]] = decay_mask,
                   harness: bool = True, num_steps: Optional[int] = None, seed: int = 0,
                   label_fn: Optional[Callable[[Params], Params]] = None,
                   ns_steps: int = NS_STEPS, consistent_rms: Optional[float] = None,
                   adam_b1: float = 0.9, adam_b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """The normalized learned optimizer in one call (Celo2's recipe, module docstring).

  Without the harness: `optax.chain(scale_by_normalized_mlp(...),
  optax.add_decayed_weights(weight_decay, weight_decay_mask),
  optax.scale_by_learning_rate(learning_rate))` on every leaf. With it (default):
  an `optax.partition` whose "learned" part (hidden weight tensors, `muon_labels`) is
  that chain with Newton-Schulz orthogonalization and Muon's shape scale after the
  direction, and whose "adamw" part (all other leaves) is `optax.adamw(learning_rate,
  adam_b1, adam_b2, eps, weight_decay=weight_decay, mask=weight_decay_mask)`. The
  partition reads flax names (see `learned_opt.baselines.muon`); pass `label_fn` for
  other trees.

  Args:
    lopt: the architecture.
    meta_params: its meta-parameters.
    learning_rate: a scalar, a traced array or an optax schedule (shared by both parts).
    weight_decay: decoupled weight decay, multiplied by the learning rate (optax's
      convention).
    weight_decay_mask: `params -> bool tree` of the decayed leaves (default: matrices
      that are not norm parameters, `learned_opt.baselines.decay_mask`); None: all.
    harness: split the parameters as above; False runs the learned rule on every leaf.
    num_steps: the horizon (needed only with the "train_frac" feature).
    seed: seed of the PRNG keys used when `update` gets no `key`.
    label_fn: `params -> labels` ("muon" for the learned part, "adam" for AdamW, or a
      `MuonDimensionNumbers`, as for `learned_opt.baselines.muon`); default
      `muon_labels`. The learned part reshapes >2-D tensors by `muon_dimension_numbers`'s
      path rule.
    ns_steps: Newton-Schulz iterations (optax's Muon coefficients).
    consistent_rms: None for Muon's `sqrt(max(1, fan_out / fan_in))` scale, or a target
      RMS of the learned part's updates (0.2 matches AdamW, Liu et al. 2025).
    adam_b1, adam_b2: AdamW's moment decays.
    eps: AdamW's epsilon and the Newton-Schulz normalization's.

  Returns:
    An `optax.GradientTransformationExtraArgs` (forwards `loss` and `key`).

  Raises:
    TypeError: `lopt` is not a `NormalizedMLP`.
    ValueError: a missing learning rate or a bad setting, named with its value; a bad
      label (at `init`).
  """
  if learning_rate is None:
    raise ValueError("normalized_mlp needs a learning rate (a float or an optax schedule), "
                     "got learning_rate=None")
  check_positive("weight_decay", weight_decay, allow_zero=True)
  if not isinstance(harness, bool):
    raise ValueError(f"harness must be True or False, got {harness!r}")
  if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
    raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}")
  if label_fn is not None and not callable(label_fn):
    raise ValueError(f"label_fn must be a callable params -> labels, got {label_fn!r}")
  learned = [scale_by_normalized_mlp(lopt, meta_params, num_steps=num_steps, seed=seed)]
  tail = [optax.add_decayed_weights(weight_decay, weight_decay_mask),
          optax.scale_by_learning_rate(learning_rate)]
  if not harness:
    return optax.chain(*learned, *tail)
  if orthogonalize_via_newton_schulz is None:  # pragma: no cover - optax version
    raise RuntimeError("this optax has no optax.contrib._muon.orthogonalize_via_newton_schulz; "
                       "use normalized_mlp(..., harness=False) or optax >= 0.2.5")
  learned += [_orthogonalize(ns_steps, eps),
              scale_by_shape(weight_dimension_numbers=_branch_dims, consistent_rms=consistent_rms)]
  adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=eps,
                      weight_decay=weight_decay, mask=weight_decay_mask)
  return optax.partition({LEARNED: optax.chain(*learned, *tail), ADAMW: adamw},
                         partition_labels(label_fn))
