"""Adam and Muon baselines: optax's optimizers with the parameter partition users expect.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks";
`optax.contrib.muon`) orthogonalizes the momentum of *hidden weight matrices* with a
Newton-Schulz iteration and leaves everything else to Adam. optax by default sends every
2-D leaf to Muon and every other leaf to Adam, which is wrong both ways for real models:
an embedding table and the output head are 2-D but belong to Adam, while conv kernels and
attention projections are 3-D/4-D but are hidden weights that Muon should see. This
module labels a parameter tree by the rule below and hands the result to
`optax.contrib.muon` unchanged (its `MuonDimensionNumbers` reshape >2-D kernels to
matrices, so no reshaping is written here).

The default rule (`muon_labels`), for flax linen parameter trees, first match wins:
  1. Adam: biases and norm parameters (a leaf named `bias` or `scale`, or any leaf under a
     module whose name contains `Norm`), and every leaf of rank < 2 (scalars, gains).
  2. Adam: embedding tables (any path component containing `embed`, case-insensitive:
     `Embed_0/embedding`, `pos_embedding`).
  3. Adam: the output head. If a module is named `head`, `lm_head`, `output_head`,
     `logits`, `unembed`, `readout` or `classifier` (optionally with a `_<i>` suffix),
     its kernels are the head. Otherwise the head is the
     `kernel` of the last `Dense_<i>` module at the shallowest depth (the top-level
     Dense with the highest index; a bare `kernel` at the root, as in logistic
     regression, is a one-layer model whose only layer is its head). The rule reads
     paths, not dict order: `jax.tree.map` re-sorts dict keys, so creation order is lost.
  4. Muon: every other leaf of rank >= 2 (hidden Dense kernels, the first layer of an MLP
     on pixels, LSTM gate kernels, attention projections, conv kernels).

The rule reads flax's names. A plain-dict model has none to read: there `{"emb": ...,
"w_hidden": ..., "w_out": ...}` sends `emb` and `w_out` to Muon (only a path containing
`embed`, or a `kernel` under a head-named module, is recognized). So `muon` warns when
the first or last leaf of the tree (in `jax.tree` order, where an embedding or a head
often sits) is a 2-D leaf, not a flax `kernel`, that the default rule sends to Muon;
rename such leaves (`embed`, `head/kernel`) or pass `label_fn`.

Dimension numbers of Muon leaves (`muon_dimension_numbers`): 2-D kernels are (in, out);
flax attention `query`/`key`/`value` kernels [in, heads, head_dim] are orthogonalized as
one [in, heads * head_dim] matrix and `out` kernels [heads, head_dim, out] as one
[heads * head_dim, out] matrix; any other >2-D kernel is conv-like, [*window, in, out],
flattened to [prod(window) * in, out] as Jordan does for conv filters.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional

import jax
import optax
from optax.contrib import MuonDimensionNumbers

Params = Any
LabelFn = Callable[[Params], Any]

MUON, ADAM = "muon", "adam"
_DENSE = re.compile(r"^Dense(General)?_(\d+)$")
# Whole module names only: `MultiHeadDotProductAttention_0` must not read as a head.
_HEAD = re.compile(r"^(lm_|output_)?(head|logits|unembed|readout|classifier)(_\d+)?$",
                   re.IGNORECASE)
_ATTN_IN = ("query", "key", "value")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _names(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def _head_paths(names: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
  """Paths of the output-head kernels (rule 3 of the module docstring)."""
  named = {n for n in names if n[-1] == "kernel" and any(_HEAD.search(c) for c in n[:-1])}
  if named:
    return named
  candidates = []
  for n in names:
    if n == ("kernel",):
      candidates.append((1, -1, n))  # a bare linear model: shallower than any Dense_i
    elif len(n) >= 2 and n[-1] == "kernel" and (m := _DENSE.match(n[-2])):
      candidates.append((len(n), int(m.group(2)), n))
  if not candidates:
    return set()
  depth = min(c[0] for c in candidates)
  return {max((c for c in candidates if c[0] == depth), key=lambda c: c[1])[2]}


def _label(names: tuple[str, ...], ndim: int, heads: set) -> str:
  if names[-1] in ("bias", "scale") or any("Norm" in c for c in names[:-1]) or ndim < 2:
    return ADAM
  if any("embed" in c.lower() for c in names):
    return ADAM
  if names in heads:
    return ADAM
  return MUON


def muon_labels(params: Params) -> Params:
  """Labels every leaf of `params` "muon" or "adam" by the module docstring's rule.

  Args:
    params: a parameter pytree (a flax linen `params` dict, or any pytree of arrays or
      `jax.ShapeDtypeStruct`s; only paths and ranks are read).

  Returns:
    A pytree of the same structure whose leaves are "muon" or "adam".
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  heads = _head_paths([_names(p) for p, _ in flat])
  return jax.tree_util.tree_map_with_path(lambda p, x: _label(_names(p), x.ndim, heads), params)


def _warn_positional_suspects(params: Params, labels: Params) -> None:
  """Warns if the first or last leaf is a 2-D non-`kernel` leaf labelled "muon": by
  position it may be an embedding or an output head that the name rule cannot see
  (a plain-dict model). flax trees do not trigger it: their layer weights are `kernel`s,
  whose roles the rule reads from module names, and their embeddings are `embedding`s."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  label_leaves = jax.tree_util.tree_leaves(labels)
  ends = {0: "first", len(flat) - 1: "last"}
  suspects = [f"{jax.tree_util.keystr(flat[i][0])} (the {where} leaf, shape "
              f"{tuple(flat[i][1].shape)})"
              for i, where in sorted(ends.items())
              if flat and flat[i][1].ndim == 2 and label_leaves[i] == MUON
              and _names(flat[i][0])[-1] != "kernel"]
  if suspects:
    warnings.warn(
        f"muon: {' and '.join(suspects)} {'go' if len(suspects) > 1 else 'goes'} to Muon "
        f"by lopt's partition rule, but by position it may be an embedding or the output "
        f"head, which belong to Adam. The "
        f"rule reads names: Adam takes paths containing 'embed' and kernels under a module "
        f"named head/lm_head/logits/readout/classifier/unembed (or the last top-level "
        f"Dense_<i>). Rename the leaf (e.g. 'embed', 'head': {{'kernel': ...}}) or pass "
        f"label_fn=...; if it is a hidden weight, ignore this.",
        UserWarning, stacklevel=4)  # the caller of muon(...) or of its init


def _dimension_numbers(names: tuple[str, ...], ndim: int) -> MuonDimensionNumbers:
  if ndim == 2:
    return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  parent = names[-2] if len(names) >= 2 else ""
  if ndim == 3 and parent in _ATTN_IN:
    return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  if ndim == 3 and parent == "out":
    return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
  return MuonDimensionNumbers(reduction_axis=tuple(range(ndim - 1)), output_axis=ndim - 1)


def muon_dimension_numbers(params: Params, labels: Optional[Params] = None) -> Params:
  """The `muon_weight_dimension_numbers` tree that `optax.contrib.muon` takes.

  Args:
    params: the parameter pytree.
    labels: a pytree like `params` whose leaves are "muon", "adam" or a
      `MuonDimensionNumbers` (an explicit reshape for that leaf); default
      `muon_labels(params)`.

  Returns:
    A pytree like `params` with `None` at Adam leaves and a `MuonDimensionNumbers` at Muon
    leaves (chosen from the leaf's path and rank, see the module docstring, unless given).

  Raises:
    ValueError: a label is not "muon"/"adam"/`MuonDimensionNumbers`, the label tree does
      not match `params`, or a rank < 2 leaf is labelled "muon".
  """
  labels = muon_labels(params) if labels is None else labels
  is_label = lambda x: isinstance(x, (str, MuonDimensionNumbers))
  flat_labels = jax.tree_util.tree_flatten(labels, is_leaf=is_label)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if flat_labels[1] != treedef:
    raise ValueError(f"the label tree does not match the parameter tree: expected structure "
                     f"{treedef}, got {flat_labels[1]}")
  out = []
  for (path, x), label in zip(flat, flat_labels[0]):
    where = jax.tree_util.keystr(path)
    if isinstance(label, MuonDimensionNumbers):
      out.append(label)
    elif label == ADAM:
      out.append(None)
    elif label == MUON:
      if x.ndim < 2:
        raise ValueError(f"parameter {where} of shape {tuple(x.shape)} is labelled 'muon', "
                         f"but Muon needs a tensor of rank >= 2")
      out.append(_dimension_numbers(_names(path), x.ndim))
    else:
      raise ValueError(f"parameter {where} has label {label!r}; expected 'muon', 'adam' or "
                       f"a MuonDimensionNumbers")
  return jax.tree_util.tree_unflatten(treedef, out)


def muon(learning_rate: optax.ScalarOrSchedule, *, params: Optional[Params] = None,
         label_fn: Optional[LabelFn] = None,
         adam_learning_rate: Optional[optax.ScalarOrSchedule] = None, beta: float = 0.95,
         ns_steps: int = 5, nesterov: bool = True, weight_decay: float = 0.0,
         adam_b1: float = 0.9, adam_b2: float = 0.999, adam_weight_decay: float = 0.0,
         eps: float = 1e-8, consistent_rms: Optional[float] = None) -> optax.GradientTransformation:
  """Muon on hidden weight tensors, Adam on the rest, in one optax transform.

  Jordan et al. 2024 (https://kellerjordan.github.io/posts/muon/), as implemented by
  `optax.contrib.muon`; this function only chooses its partition. The default rule
  (`muon_labels`, module docstring), first match wins: biases, norm parameters and
  leaves of rank < 2 -> Adam; any path component containing `embed` -> Adam; the output
  head (`kernel`s under a module named head, lm_head, output_head, logits, unembed,
  readout or classifier, else the `kernel` of the last top-level `Dense_<i>`) -> Adam;
  every other leaf of rank >= 2 -> Muon. It reads flax names: in a plain dict such as
  `{"emb", "w_hidden", "w_out"}` all three go to Muon, and a warning names the first or
  last leaf if it is 2-D, not a `kernel`, and sent to Muon (an embedding or head by
  position). Pass `label_fn` to decide yourself (no warning then).

  Args:
    learning_rate: Muon's learning rate (a scalar, a traced array, or a schedule).
    params: the parameter pytree (or its `jax.eval_shape`). Given, the partition is
      fixed now and the result is exactly `optax.contrib.muon(...)`; omitted, the
      partition is computed from the tree passed to `init`/`update` (at trace time).
    label_fn: `params -> pytree of labels` ("muon", "adam" or a `MuonDimensionNumbers`
      per leaf) overriding `muon_labels`; "muon" leaves get dimension numbers by the
      module docstring's rule. Without `params` it is called at trace time with the tree
      given to `init`/`update` (parameters or gradients: same paths and shapes).
    adam_learning_rate: learning rate of the Adam part (default: `learning_rate`).
    beta: Muon's momentum decay.
    ns_steps: Newton-Schulz iterations.
    nesterov: Nesterov momentum (both parts).
    weight_decay: decoupled weight decay of the Muon part (multiplied by the lr).
    adam_b1, adam_b2: Adam's moment decays.
    adam_weight_decay: AdamW weight decay of the Adam part (biases included).
    eps: Newton-Schulz and Adam epsilon.
    consistent_rms: None for Jordan's sqrt(max(1, fan_out / fan_in)) update scale, or a
      target RMS (0.2 matches AdamW, Liu et al. 2025).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: a bad label (see `muon_dimension_numbers`).
  """
  if label_fn is not None and not callable(label_fn):
    raise ValueError(f"label_fn must be a callable params -> labels, got {label_fn!r}")

  def build(tree, check=False):
    labels = None if label_fn is None else label_fn(tree)
    if check and label_fn is None:
      _warn_positional_suspects(tree, muon_labels(tree))
    return optax.contrib.muon(
        learning_rate, ns_steps=ns_steps, beta=beta, eps=eps, weight_decay=weight_decay,
        nesterov=nesterov, adam_b1=adam_b1, adam_b2=adam_b2,
        adam_weight_decay=adam_weight_decay, adam_learning_rate=adam_learning_rate,
        muon_weight_dimension_numbers=muon_dimension_numbers(tree, labels),
        consistent_rms=consistent_rms)

  if params is not None:
    return build(params, check=True)  # the warning, once per call of this factory

  # The partition is a function of the tree's paths and ranks only, which `updates`
  # shares with `params`; rebuilding optax's transform per call is trace-time Python.
  # The warning comes once per init, not from every update's trace.
  def init_fn(params):
    return build(params, check=True).init(params)

  def update_fn(updates, state, params=None):
    return build(updates).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params: Params) -> Params:
  """True for leaves weight decay should shrink: tensors of rank >= 2 that are not
  biases or norm parameters (embeddings included, as in GPT-2 style AdamW)."""
  def keep(path, x):
    names = _names(path)
    return not (x.ndim < 2 or names[-1] in ("bias", "scale")
                or any("Norm" in c for c in names[:-1]))
  return jax.tree_util.tree_map_with_path(keep, params)


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4,
          mask: Optional[Callable[[Params], Params]] = decay_mask) -> optax.GradientTransformation:
  """`optax.adamw` whose decay skips biases, norm parameters and scalars by default.

  Loshchilov & Hutter 2019, "Decoupled weight decay regularization". For plain Adam use
  `optax.adam` directly.

  Args:
    learning_rate: step size (scalar, traced array or schedule).
    b1, b2: decays of the first and second moments.
    eps: denominator epsilon.
    weight_decay: decoupled decay, multiplied by the learning rate (optax convention).
    mask: `params -> bool pytree` of the decayed leaves (default `decay_mask`); None
      decays every leaf.
  """
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
