"""Adam/Muon baselines: the Muon partition, equality with optax.contrib.muon, errors."""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as MDN

from learned_opt import tasks
from learned_opt.baselines.adam_muon import adamw, decay_mask, muon, muon_dimension_numbers, muon_labels


class SmallMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(3)(x)


def _mlp_problem():
  model = SmallMLP()
  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  params = model.init(jax.random.key(2), x)["params"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  return params, loss


def _run(opt, params, loss, steps=5):
  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


def _flat_labels(params, labels):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return dict(zip(paths, jax.tree.leaves(labels)))


@pytest.mark.slow
def test_muon_equals_optax_contrib_muon_with_the_same_partition():
  params, loss = _mlp_problem()
  # Written out by hand: hidden kernels -> Muon; head, biases, LayerNorm -> Adam.
  dims = {"Dense_0": {"kernel": MDN(0, 1), "bias": None}, "Dense_1": {"kernel": MDN(0, 1), "bias": None},
          "Dense_2": {"kernel": None, "bias": None}, "LayerNorm_0": {"scale": None, "bias": None}}
  kwargs = dict(adam_learning_rate=3e-3, weight_decay=1e-3)
  direct = _run(optax.contrib.muon(2e-2, muon_weight_dimension_numbers=dims, **kwargs), params, loss)
  for ours in (muon(2e-2, **kwargs), muon(2e-2, params=params, **kwargs)):
    got = _run(ours, params, loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, direct)


def _family_params(name):
  task = tasks.get_family(name).task()
  return jax.eval_shape(task.init, jax.random.key(0))  # labels read paths and ranks only


@pytest.mark.parametrize("name, expected_muon", [
    ("quadratic", set()),
    ("logreg_synthetic", set()),  # one layer: its only kernel is the output head
    ("mlp_synthetic", {"['Dense_0']['kernel']", "['Dense_1']['kernel']", "['Dense_2']['kernel']"}),
    ("conv_synthetic", {f"['Conv_{i}']['kernel']" for i in range(3)}),
    ("lstm_synthetic", {f"['OptimizedLSTMCell_0']['{g}']['kernel']"
                        for g in ("hi", "hf", "hg", "ho", "ii", "if", "ig", "io")}),
    ("transformer_synthetic", {f"['TransformerBlock_{b}']{m}['kernel']" for b in range(2) for m in (
        "['Dense_0']", "['Dense_1']", *(f"['MultiHeadDotProductAttention_0']['{p}']"
                                        for p in ("query", "key", "value", "out")))}),
])
def test_default_labels_on_lopt_task_families(name, expected_muon):
  params = _family_params(name)
  labels = _flat_labels(params, muon_labels(params))
  assert {p for p, label in labels.items() if label == "muon"} == expected_muon
  assert set(labels.values()) <= {"muon", "adam"}


def test_each_kind_of_tensor_goes_where_it_should():
  labels = _flat_labels(_family_params("transformer_synthetic"), muon_labels(_family_params("transformer_synthetic")))
  assert labels["['Embed_0']['embedding']"] == "adam"        # embedding table
  assert labels["['pos_embedding']"] == "adam"               # learned positions
  assert labels["['Dense_0']['kernel']"] == "adam"           # output head (top-level, last Dense)
  assert labels["['LayerNorm_0']['scale']"] == "adam"        # norm
  assert labels["['TransformerBlock_0']['MultiHeadDotProductAttention_0']['query']['bias']"] == "adam"  # 2-D bias
  assert labels["['TransformerBlock_1']['Dense_0']['kernel']"] == "muon"  # hidden Dense
  # Explicit head names win over the positional rule; scalars go to Adam.
  tree = {"Dense_0": {"kernel": jnp.zeros((4, 4))}, "Dense_1": {"kernel": jnp.zeros((4, 4))},
          "lm_head": {"kernel": jnp.zeros((4, 9))}, "temperature": jnp.zeros(())}
  assert _flat_labels(tree, muon_labels(tree)) == {
      "['Dense_0']['kernel']": "muon", "['Dense_1']['kernel']": "muon",
      "['lm_head']['kernel']": "adam", "['temperature']": "adam"}
  # Dense_10 comes after Dense_9 (natural order, not string order).
  tree = {f"Dense_{i}": {"kernel": jnp.zeros((2, 2))} for i in range(11)}
  labels = _flat_labels(tree, muon_labels(tree))
  assert labels["['Dense_10']['kernel']"] == "adam" and labels["['Dense_9']['kernel']"] == "muon"


def test_dimension_numbers_of_conv_and_attention_kernels():
  dims = muon_dimension_numbers(_family_params("transformer_synthetic"))["TransformerBlock_0"]
  attn = dims["MultiHeadDotProductAttention_0"]
  assert attn["query"]["kernel"] == MDN(0, (1, 2)) and attn["out"]["kernel"] == MDN((0, 1), 2)
  assert attn["query"]["bias"] is None
  conv = muon_dimension_numbers(_family_params("conv_synthetic"))["Conv_1"]["kernel"]
  assert conv == MDN((0, 1, 2), 3)


def _singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.slow
def test_conv_and_attention_updates_are_orthogonalized_as_matrices():
  # One Muon step from zero momentum on a random gradient: the update of a hidden kernel,
  # seen as the [fan_in, fan_out] matrix its dimension numbers define, has singular values
  # near 1 (Newton-Schulz lands them in about [0.7, 1.2], all but the few smallest of a
  # random square matrix) times lr and the shape scale sqrt(max(1, fan_out / fan_in)).
  # (A raw Gaussian gradient's singular values spread from near 0 to about 2 sqrt(n).) Shapes as in lopt's conv net and transformer.
  shapes = {"Conv_1": {"kernel": (3, 3, 8, 16)}, "Dense_0": {"kernel": (16, 10)},
            "MultiHeadDotProductAttention_0": {"query": {"kernel": (64, 4, 16)},
                                               "out": {"kernel": (4, 16, 64)}}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = treedef.unflatten([jax.random.normal(k, x) for k, x in zip(keys, leaves)])
  lr = 0.1
  opt = muon(lr)
  updates, _ = jax.jit(opt.update)(grads, opt.init(grads), grads)
  attn = updates["MultiHeadDotProductAttention_0"]
  for m in (updates["Conv_1"]["kernel"].reshape(72, 16), attn["query"]["kernel"].reshape(64, 64),
            attn["out"]["kernel"].reshape(64, 64)):
    scale = np.sqrt(max(1.0, m.shape[1] / m.shape[0]))
    s = _singular_values(-m / (lr * scale))
    assert np.percentile(s, 5) > 0.6 and s.max() < 1.3, s
  # The head is Adam's: its first step is elementwise, a constant times -lr * sign(grad).
  head, g = np.asarray(updates["Dense_0"]["kernel"]), np.asarray(grads["Dense_0"]["kernel"])
  np.testing.assert_array_equal(np.sign(head), -np.sign(g))
  np.testing.assert_allclose(np.abs(head), np.abs(head).mean(), rtol=1e-4)


def test_label_fn_overrides_the_default_rule():
  params, loss = _mlp_problem()
  everything_adam = lambda p: jax.tree.map(lambda _: "adam", p)
  got = _run(muon(1e-2, label_fn=everything_adam), params, loss)
  # optax's Adam part is Nesterov AdamW without decay.
  ref = _run(optax.adamw(1e-2, weight_decay=0.0, nesterov=True), params, loss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ref)
  # An explicit MuonDimensionNumbers label is passed through.
  custom = lambda p: {**muon_labels(p), "Dense_2": {"kernel": MDN(1, 0), "bias": "adam"}}
  dims = muon_dimension_numbers(params, custom(params))
  assert dims["Dense_2"]["kernel"] == MDN(1, 0) and dims["Dense_0"]["kernel"] == MDN(0, 1)


def test_bad_labels_are_clear_errors():
  params, _ = _mlp_problem()
  bias_to_muon = {**muon_labels(params), "Dense_0": {"kernel": "muon", "bias": "muon"}}
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['bias'\] of shape \(16,\) is labelled 'muon'"):
    muon_dimension_numbers(params, bias_to_muon)
  typo = {**muon_labels(params), "Dense_0": {"kernel": "sgd", "bias": "adam"}}
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\] has label 'sgd'; expected 'muon', 'adam'"):
    muon(0.1, params=params, label_fn=lambda p: typo)
  with pytest.raises(ValueError, match="label tree does not match the parameter tree"):
    muon_dimension_numbers(params, {"Dense_0": "adam"})
  with pytest.raises(ValueError, match="label_fn must be a callable"):
    muon(0.1, label_fn="adam")


def test_jitted_step_compiles_once():
  params, loss = _mlp_problem()
  opt = muon(1e-2)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  assert step._cache_size() == 1


def test_adamw_decays_kernels_only():
  params = _family_params("transformer_synthetic")
  mask = _flat_labels(params, decay_mask(params))
  assert mask["['TransformerBlock_0']['Dense_0']['kernel']"] and mask["['Embed_0']['embedding']"]
  assert not mask["['TransformerBlock_0']['Dense_0']['bias']"]
  assert not mask["['LayerNorm_0']['scale']"]
  assert not mask["['TransformerBlock_0']['MultiHeadDotProductAttention_0']['query']['bias']"]
  # With zero gradients, AdamW's update is -lr * wd * param on decayed leaves, 0 elsewhere.
  tree = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}
  opt = adamw(0.1, weight_decay=0.5)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, tree), opt.init(tree), tree)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["Dense_0"]["bias"], 0.0)


# ------------------------------------------------------------------ plain-dict models

def _muon_warnings(run):
  """The UserWarnings muon gives while `run()` runs."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    run()
  return [str(w.message) for w in caught
          if issubclass(w.category, UserWarning) and str(w.message).startswith("muon:")]


def _plain_model():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"emb": jax.random.normal(k[0], (10, 4)), "w_hidden": jax.random.normal(k[1], (4, 4)),
            "w_out": jax.random.normal(k[2], (4, 10))}
  tokens = jax.random.randint(k[3], (16,), 0, 10)

  def loss(p):
    h = jnp.tanh(p["emb"][tokens] @ p["w_hidden"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w_out"], tokens).mean()
  return params, loss


@pytest.mark.slow
def test_plain_dict_embedding_and_head_go_to_muon_with_a_warning():
  """The rule reads flax names; a plain dict's `emb` and `w_out` (first and last leaves)
  go to Muon. Before: silently. Now: one warning naming both, per factory call with
  params, per init without."""
  params, loss = _plain_model()
  assert _flat_labels(params, muon_labels(params)) == {
      "['emb']": "muon", "['w_hidden']": "muon", "['w_out']": "muon"}
  (msg,) = _muon_warnings(lambda: muon(0.1, params=params))
  assert "['emb'] (the first leaf, shape (10, 4))" in msg
  assert "['w_out'] (the last leaf, shape (4, 10))" in msg and "label_fn" in msg
  opt = muon(0.1)
  assert _muon_warnings(lambda: opt) == []
  assert len(_muon_warnings(lambda: opt.init(params))) == 1
  assert _muon_warnings(lambda: _run(opt, params, loss, steps=2)) != []  # _run inits
  with pytest.warns(UserWarning, match="muon:"):
    state = opt.init(params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  assert _muon_warnings(lambda: step(jax.grad(loss)(params), state, params)) == []
  # The user's own labels: no warning, and they are used.
  mine = lambda p: {"emb": "adam", "w_hidden": "muon", "w_out": "adam"}
  assert _muon_warnings(lambda: muon(0.1, params=params, label_fn=mine)) == []
  assert muon_dimension_numbers(params, mine(params))["emb"] is None
  # Renamed as the rule expects: nothing to warn about, and the partition is right.
  renamed = {"embed": params["emb"], "hidden": {"kernel": params["w_hidden"]},
             "head": {"kernel": params["w_out"]}}
  assert _muon_warnings(lambda: muon(0.1, params=renamed)) == []
  assert _flat_labels(renamed, muon_labels(renamed)) == {
      "['embed']": "adam", "['head']['kernel']": "adam", "['hidden']['kernel']": "muon"}


@pytest.mark.parametrize("name", ["quadratic", "logreg_synthetic", "mlp_synthetic",
                                  "conv_synthetic", "lstm_synthetic", "transformer_synthetic"])
def test_flax_trees_where_the_rule_is_right_do_not_warn(name):
  """flax MLP, conv net, LSTM (whose last leaf is a 2-D gate kernel, rightly Muon) and
  transformer: the positional check looks at non-`kernel` leaves only."""
  params = _family_params(name)
  assert _muon_warnings(lambda: muon(0.1, params=params)) == []
  assert _muon_warnings(lambda: muon(0.1).init(params)) == []


def test_small_flax_mlp_does_not_warn():
  params, loss = _mlp_problem()
  assert _muon_warnings(lambda: _run(muon(0.1), params, loss, steps=2)) == []
