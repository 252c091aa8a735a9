"""`NormalizedMLP`: unit-RMS learned directions, their optax transforms, the Newton-Schulz /
AdamW harness, meta-training's schedule, checkpoints, the fused path and evaluation."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz

import learned_opt as lo
from learned_opt import baselines, features, normalized, normalized_optax, tasks
from learned_opt.meta_train import train
from learned_opt.meta_train.eval import candidates, evaluation
from learned_opt.meta_train.run import config as config_lib

XLA = lo.NormalizedMLP(fused="xla")
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


# Compiled once for the module: an optimizer is a pytree with a static config, so equal
# configs and tree shapes share one compilation across tests.
@jax.jit
def _direction(lopt, theta, grads, state, params):
  return lopt.direction(theta, grads, state, params)


@jax.jit
def _update(lopt, theta, grads, state, params, key=None):
  return lopt.update(theta, grads, state, params, key=key)


def _rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32)))))


def _tree(seed=0, dtype=jnp.float32):
  """A flax-named MLP tree (two hidden kernels, a head, biases) and a scalar gain, with
  gradients (numpy draws: eager jax.random would compile once per shape)."""
  shapes = {"Dense_0": {"kernel": (12, 16), "bias": (16,)},
            "Dense_1": {"kernel": (16, 16), "bias": (16,)},
            "Dense_2": {"kernel": (16, 4), "bias": (4,)}, "gain": ()}
  rng = np.random.default_rng(seed)
  draw = lambda s: jnp.asarray(rng.standard_normal(s), dtype)
  is_shape = lambda x: isinstance(x, tuple)
  return (jax.tree.map(draw, shapes, is_leaf=is_shape),
          jax.tree.map(draw, shapes, is_leaf=is_shape))


def _perturbed_theta(lopt, scale=0.3):
  """Meta-parameters away from the init, so the network is more than its seed channel."""
  rng = np.random.default_rng(3)
  theta = jax.jit(lopt.init_meta_params)(jax.random.key(7))
  return jax.tree.map(lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      theta)


@pytest.mark.slow
def test_direction_has_unit_rms_per_tensor_and_update_is_its_negative():
  params, grads = _tree()
  theta = _perturbed_theta(XLA)
  state = XLA.init(theta, params)
  d, new_state = _direction(XLA, theta, grads, state, params)
  u, _ = _update(XLA, theta, grads, state, params)
  for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(u)):
    assert abs(_rms(x) - 1.0) < 1e-5
    np.testing.assert_array_equal(np.asarray(y), -np.asarray(x))
  assert int(new_state.step) == 1
  bf16, g16 = _tree(dtype=jnp.bfloat16)
  d16, _ = _direction(XLA, theta, g16, XLA.init(theta, bf16), bf16)
  assert all(x.dtype == jnp.bfloat16 and abs(_rms(x) - 1.0) < 1e-2 for x in jax.tree.leaves(d16))


@pytest.mark.slow
def test_untrained_update_is_finite_descent_on_a_quadratic():
  params, _ = _tree(1)
  curv = jax.tree.map(lambda p: jnp.linspace(0.1, 10.0, p.size).reshape(p.shape), params)
  loss_fn = lambda p: sum(0.5 * jnp.sum(c * x * x) for c, x in zip(jax.tree.leaves(curv),
                                                                    jax.tree.leaves(p)))
  theta = jax.jit(XLA.init_meta_params)(jax.random.key(0))
  state = XLA.init(theta, params)
  for _ in range(5):
    grads = jax.grad(loss_fn)(params)
    updates, state = _update(XLA, theta, grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    inner = sum(float(jnp.vdot(u, g)) for u, g in zip(jax.tree.leaves(updates),
                                                       jax.tree.leaves(grads)))
    assert inner < 0.0
    params = optax.apply_updates(params, jax.tree.map(lambda u: 1e-2 * u, updates))


@pytest.mark.slow
def test_chain_with_weight_decay_and_schedule_is_the_hand_computation():
  params, grads = _tree(2)
  theta = _perturbed_theta(XLA)
  wd, sched = 0.1, lambda t: 0.05 * 0.5 ** t
  tx = optax.chain(lo.scale_by_normalized_mlp(XLA, theta), optax.add_decayed_weights(wd),
                   optax.scale_by_learning_rate(sched))
  opt_state, state = tx.init(params), XLA.init(theta, params)
  for t in range(2):
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    d, state = _direction(XLA, theta, grads, state, params)
    expected = jax.tree.map(lambda x, p: -sched(t) * (x + wd * p), d, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, updates)
    grads = jax.tree.map(lambda g: 0.5 * g - 0.1, grads)


@pytest.mark.slow
def test_harness_orthogonalizes_hidden_matrices_and_runs_adamw_elsewhere():
  params, grads = _tree(3)
  # The untrained direction (full rank): Newton-Schulz leaves a near-zero singular value
  # of its input near zero, which a random network's output may have.
  theta = jax.jit(XLA.init_meta_params)(jax.random.key(0))
  lr, wd = 0.01, 1e-3
  tx = lo.normalized_mlp(XLA, theta, lr, weight_decay=wd)
  ref = optax.adamw(lr, weight_decay=wd, mask=baselines.decay_mask)
  labels = normalized_optax.partition_labels()(params)
  assert labels["Dense_0"]["kernel"] == labels["Dense_1"]["kernel"] == "learned"
  assert labels["Dense_2"]["kernel"] == labels["Dense_0"]["bias"] == labels["gain"] == "adamw"
  s, s_ref, p, p_ref = tx.init(params), ref.init(params), params, params
  for _ in range(2):
    u, s = jax.jit(tx.update)(grads, s, p)
    u_ref, s_ref = ref.update(grads, s_ref, p_ref)
    for name in ("Dense_0", "Dense_1"):
      w = p[name]["kernel"]
      # u = -lr * (shape_scale * O + wd * w), shape_scale = sqrt(max(1, fan_out / fan_in))
      o = (-u[name]["kernel"] / lr - wd * w) / np.sqrt(max(1.0, w.shape[1] / w.shape[0]))
      sv = np.linalg.svd(np.asarray(o), compute_uv=False)
      assert 0.5 < sv.min() and sv.max() < 1.5, sv  # Newton-Schulz: near-equal values
    adam_leaves = lambda t: [t["Dense_2"]["kernel"], t["Dense_2"]["bias"], t["Dense_0"]["bias"],
                             t["Dense_1"]["bias"], t["gain"]]
    for a, b in zip(adam_leaves(u), adam_leaves(u_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
    grads = jax.tree.map(lambda g: -0.7 * g + 0.05, grads)


def test_second_jitted_call_does_not_recompile():
  params, grads = _tree(4)
  theta = jax.jit(XLA.init_meta_params)(jax.random.key(0))
  tx = lo.normalized_mlp(XLA, theta, baselines.warmup_cosine(0.01, 50))
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = step(params, tx.init(params), grads)
  p, s = step(p, s, jax.tree.map(lambda g: 2.0 * g, grads))
  assert len(traces) == 1
  # An equal optimizer built again shares the compiled network (static config, same hash).
  assert lo.NormalizedMLP(fused="xla") == XLA and hash(lo.NormalizedMLP(fused="xla")) == hash(XLA)


def test_checkpoint_round_trip(tmp_path):
  lopt = lo.NormalizedMLP(hidden_sizes=(6, 4, 5), fused="xla", meta_train_lr=1e-3,
                          meta_train_lr_max=1e-2, init_rule="momentum")
  theta = _perturbed_theta(lopt)
  lo.save(tmp_path / "n.lopt", lopt, theta)
  loaded, loaded_theta, _ = lo.load(tmp_path / "n.lopt")
  assert loaded == lopt and lo.read_header(tmp_path / "n.lopt")["architecture"] == "normalized_mlp"
  jax.tree.map(np.testing.assert_array_equal, loaded_theta, theta)
  # Equal configs and weights: the same optimizer (its update is a function of both).
  assert hash(loaded) == hash(lopt) and loaded.feature_names() == lopt.feature_names()


@pytest.mark.slow
def test_fused_interpret_matches_xla():
  # A matrix whose size (37 * 21) leaves a masked tail block, a vector and a scalar.
  rng = np.random.default_rng(6)
  shapes = {"w": (37, 21), "b": (21,), "s": ()}
  params = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
  grads["w"] = grads["w"].at[0, 0].set(jnp.nan)  # sanitized the same way on both paths

  def two_steps(lopt):
    theta = _perturbed_theta(lopt)
    state = lopt.init(theta, params, num_steps=100)  # a finite horizon compares exactly
    f = jax.jit(lambda s, g: lopt.direction(theta, g, s, params))
    _, state = f(state, grads)
    return f(state, jax.tree.map(lambda g: -0.5 * g + 0.01, grads))

  ref = two_steps(XLA)
  got = two_steps(lo.NormalizedMLP(fused="interpret"))
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert x.shape == y.shape and x.dtype == y.dtype
    scale = float(jnp.max(jnp.abs(y))) + 1e-30
    assert float(jnp.max(jnp.abs(x - y))) <= 1e-5 * scale


@pytest.mark.slow
def test_to_optax_applies_the_learning_rate_and_fails_clearly():
  params, grads = _tree(7)
  theta = _perturbed_theta(XLA)
  with pytest.raises(ValueError, match="takes its step size from the user"):
    lo.to_optax(XLA, theta)
  with pytest.raises(ValueError, match="takes no learning rate, got learning_rate=0.001"):
    lo.to_optax(lo.PerParamMLP(), None, learning_rate=1e-3)
  with pytest.raises(ValueError, match="learning_rate must be a number > 0"):
    lo.to_optax(XLA, theta, learning_rate=0.0)
  with pytest.raises(ValueError, match="sets its own step size"):
    lo.scale_by_learned_direction(lo.PerParamMLP(), None)
  with pytest.raises(TypeError, match="expects a NormalizedMLP"):
    lo.scale_by_normalized_mlp(lo.PerParamMLP(), None)
  sched = baselines.warmup_cosine(0.02, 10)
  tx = lo.to_optax(XLA, theta, learning_rate=sched)
  update = jax.jit(tx.update)
  u, opt_state = update(grads, tx.init(params), params)  # step 0 of a warmup: rate 0
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))
  u, _ = update(grads, opt_state, params)
  _, state = _direction(XLA, theta, grads, XLA.init(theta, params), params)
  d, _ = _direction(XLA, theta, grads, state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -sched(1) * b, rtol=1e-6), u, d)


@pytest.mark.slow
def test_meta_train_update_follows_the_warmup_cosine_schedule():
  for horizon in (7, 40, 101):
    sched = baselines.warmup_cosine(1.0, horizon)
    got = [float(normalized.warmup_cosine_unit(jnp.int32(t), jnp.float32(horizon)))
           for t in range(horizon + 2)]
    np.testing.assert_allclose(got, [float(sched(t)) for t in range(horizon + 2)], atol=1e-6)
  assert float(normalized.warmup_cosine_unit(jnp.int32(5), jnp.float32(jnp.inf))) == 1.0
  params, grads = _tree(8)
  lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=1e-3, meta_train_lr_max=1e-2,
                          meta_train_weight_decay=0.1)
  theta = _perturbed_theta(lopt)
  state = lopt.init(theta, params, num_steps=20)
  for t in range(3):
    updates, new_state = _update(lopt, theta, grads, state, params, jax.random.key(11))
    # The direction ignores the meta_train_* fields: the plain optimizer's is the same.
    d, _ = _direction(XLA, theta, grads, state, params)
    lr = float(new_state.lr) * float(baselines.warmup_cosine(1.0, 20)(t))
    jax.tree.map(lambda u, x, p: np.testing.assert_allclose(u, -lr * (x + 0.1 * p), rtol=1e-5,
                                                           atol=1e-9), updates, d, params)
    assert 1e-3 <= float(new_state.lr) <= 1e-2
    if t:
      assert float(new_state.lr) == float(state.lr)  # drawn once per task
    state = new_state
  other = _update(lopt, theta, grads, lopt.init(theta, params, num_steps=20), params,
                  jax.random.key(12))[1]
  assert float(other.lr) != float(state.lr)  # another task, another peak


def test_bad_settings_fail_clearly():
  with pytest.raises(ValueError, match="hidden_sizes"):
    lo.NormalizedMLP(hidden_sizes=(1, 8))
  with pytest.raises(ValueError, match="init_rule='momentum' needs the 'momentum@0.9'"):
    lo.NormalizedMLP(features=("grad", "adam"), init_rule="momentum")
  with pytest.raises(ValueError, match="saferate"):
    lo.NormalizedMLP(features=("grad", "saferate"))
  with pytest.raises(ValueError, match="meta_train_lr_max"):
    lo.NormalizedMLP(meta_train_lr_max=0.1)
  with pytest.raises(ValueError, match="fused must be one of"):
    lo.NormalizedMLP(fused="gpu")
  with pytest.raises(ValueError, match="needs a learning rate"):
    lo.normalized_mlp(XLA, None, None)
  with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -1"):
    lo.normalized_mlp(XLA, None, 0.1, weight_decay=-1)


@pytest.mark.slow
def test_candidates_tune_a_learning_rate_taking_optimizer(tmp_path):
  lo.save(tmp_path / "n.lopt", XLA, jax.jit(XLA.init_meta_params)(jax.random.key(0)))
  assert candidates.resolve(str(tmp_path / "n.lopt")).grid == candidates.DEFAULT_LR_GRID
  cand = candidates.resolve(str(tmp_path / "n.lopt"), lr_grid=(1e-3, 1e-1))
  assert cand.kind == "learned" and cand.grid == (1e-3, 1e-1)
  # Unsaved meta-parameters (benchmarks/meta_validation.py) run the same way.
  lopt, theta, _ = lo.load(tmp_path / "n.lopt")
  same = candidates.learned_candidate("n", lopt, theta, lr_grid=(1e-3, 1e-1),
                                      weights_sha256=lo.read_header(tmp_path / "n.lopt")["weights_sha256"])
  assert (same.make, same.grid, same.kind, same.fingerprint) == (
      cand.make, cand.grid, cand.kind, cand.fingerprint)
  task = tasks.QuadraticFamily(dim=4).task()
  res = evaluation.evaluate_candidate(task, cand, evaluation.seed_keys(1), num_steps=30,
                                      full_batch=True)
  assert res["kind"] == "learned" and res["lr"] == 1e-1 and res["grid"]["lr"] == [1e-3, 1e-1]
  assert res["final_train_loss"] < 0.5 * res["initial_loss"]
  safe = candidates.resolve("saferate+" + str(tmp_path / "n.lopt"))
  assert safe.grid == () and safe.kind == "learned"
  # NAME@LR: untuned, at that peak rate: the tuned run's losses at that rate.
  fixed = candidates.resolve(str(tmp_path / "n.lopt") + "@0.1")
  assert fixed.name == "n@0.1" and fixed.grid == () and fixed.kind == "learned"
  keys = evaluation.seed_keys(1)
  at_rate = evaluation.run_grid(task, jnp.zeros((1,)), keys, fixed.aux, make=fixed.make,
                                num_steps=30, full_batch=True)[0]
  tuned = evaluation.run_grid(task, jnp.asarray([0.1]), keys, cand.aux, make=cand.make,
                              num_steps=30, full_batch=True)[0]
  np.testing.assert_allclose(at_rate, tuned, rtol=1e-6)
  for bad in ("@0", "@fast", "@-1"):
    with pytest.raises(ValueError, match="expected a positive learning rate after '@'"):
      candidates.resolve(str(tmp_path / "n.lopt") + bad)
  lo.save(tmp_path / "h.lopt", lo.PerParamMLP(hidden_sizes=(2,)),
          lo.PerParamMLP(hidden_sizes=(2,)).init_meta_params(jax.random.key(0)))
  with pytest.raises(ValueError, match="takes no learning rate; drop '@0.1'"):
    candidates.resolve(str(tmp_path / "h.lopt") + "@0.1")


@pytest.mark.slow
def test_loss_falls_on_a_small_mlp_with_the_harness():
  family = tasks.get_family("mlp_synthetic")
  task = family.task({**family.default_cfg(), "width": jnp.int32(32)})
  theta = jax.jit(XLA.init_meta_params)(jax.random.key(0))
  # Muon's scale (hidden matrices' steps of RMS ~ lr / sqrt(width)) wants Muon's rates.
  tx = lo.normalized_mlp(XLA, theta, baselines.warmup_cosine(3e-2, 60))
  result = train(task, tx, num_steps=60, key=jax.random.key(1))
  losses = np.asarray(result.losses)
  assert np.all(np.isfinite(losses)) and losses[-10:].mean() < 0.7 * losses[:5].mean()


def test_shipped_config_builds():
  cfg = config_lib.load_config(str(CONFIGS / "pretrain_normalized.yaml"))
  lopt = config_lib.build_lopt(cfg.lopt)
  assert isinstance(lopt, lo.NormalizedMLP) and lo.takes_learning_rate(lopt)
  assert lopt.hidden_sizes == (8, 8) and lopt.meta_train_lr == 3e-3 and lopt.meta_train_harness
  assert cfg.task.param_scale_range == (0.5, 2.0)
  assert cfg.task.families == ("mlp_mnist8x8", "mlp_synthetic8x8", "mlp_synthetic8x8_hard")
  assert not lopt.harness_learned_head
  # The learned-head variant differs in that field, the peak rates and its name only.
  head = config_lib.load_config(str(CONFIGS / "pretrain_normalized_head.yaml"))
  assert config_lib.build_lopt(head.lopt) == lopt.replace(
      harness_learned_head=True, meta_train_lr=0.015, meta_train_lr_max=0.06)
  assert dataclasses.replace(head, name=cfg.name, lopt=cfg.lopt) == cfg


def test_meta_training_through_the_harness_runs_normalized_mlp_under_the_schedule():
  """With `meta_train_harness`, `update` is `normalized_mlp` (Newton-Schulz on hidden
  matrices, AdamW elsewhere) at lr = peak * warmup-cosine, the task's peak drawn once;
  `to_optax(..., learning_rate=...)` of that optimizer returns the same harness."""
  params, grads = _tree(5)
  lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=1e-3, meta_train_lr_max=1e-2,
                          meta_train_weight_decay=0.1, meta_train_harness=True)
  theta = _perturbed_theta(lopt)
  state = lopt.init(theta, params, num_steps=20)
  assert isinstance(state, normalized.HarnessedState)
  traces = []

  @jax.jit
  def update(state, key):
    traces.append(1)
    return lopt.update(theta, grads, state, params, key=key)

  updates, state = update(state, jax.random.key(11))
  peak = float(state.lr)
  assert 1e-3 <= peak <= 1e-2
  # The reference: optax's warmup-cosine at the drawn peak, through the public recipe.
  tx = lo.normalized_mlp(lopt.at_use(), theta, baselines.warmup_cosine(peak, 20), weight_decay=0.1)
  assert tx is not None and lo.to_optax(lopt, theta, learning_rate=0.1) is not None
  ref_state = tx.init(params)
  for t in range(4):
    ref, ref_state = tx.update(grads, ref_state, params)
    if t:
      updates, state = update(state, jax.random.key(11 + t))
    jax.tree.map(lambda u, r: np.testing.assert_allclose(u, r, rtol=2e-5, atol=1e-9), updates, ref)
    assert float(state.lr) == peak and int(state.step) == t + 1
  assert len(traces) == 1  # the second call reuses the compilation
  # The head and biases took AdamW steps, the hidden kernels orthogonalized ones.
  labels = normalized_optax.partition_labels()(params)
  assert labels["Dense_2"]["kernel"] == "adamw" and labels["Dense_1"]["kernel"] == "learned"
  # At use the shipped transform is the harness at the user's rate.
  use = lo.to_optax(lopt, theta, learning_rate=3e-3)
  same = lo.normalized_mlp(lopt.at_use(), theta, 3e-3, weight_decay=0.1)
  u1, _ = use.update(grads, use.init(params), params)
  u2, _ = same.update(grads, same.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  with pytest.raises(ValueError, match="meta_train_harness=True needs meta_train_lr"):
    lo.NormalizedMLP(meta_train_harness=True)


def test_evaluation_runs_a_harness_trained_optimizer_inside_its_harness(tmp_path):
  params, grads = _tree(6)
  lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=1e-3, meta_train_weight_decay=0.01,
                          meta_train_harness=True)
  theta = _perturbed_theta(lopt)
  lo.save(tmp_path / "h.lopt", lopt, theta)
  cand = candidates.resolve(str(tmp_path / "h.lopt"), lr_grid=(1e-3, 1e-2))
  tx = cand.make(1e-2, cand.aux, 40)
  ref = lo.normalized_mlp(lopt.at_use(), theta, baselines.warmup_cosine(1e-2, 40),
                          weight_decay=0.01)
  s1, s2 = tx.init(params), ref.init(params)
  for _ in range(3):  # past step 0, where the warmup's rate is 0
    (u1, s1), (u2, s2) = tx.update(grads, s1, params), ref.update(grads, s2, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(u1)) > 0
  # saferate+ scales the bare unit direction (no harness, no schedule).
  safe = candidates.resolve("saferate+" + str(tmp_path / "h.lopt"))
  st = safe.make(None, safe.aux, 40)
  value_fn = lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))
  u, _ = st.update(grads, st.init(params), params, value_fn=value_fn)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))


def test_harness_consistent_rms_gives_hidden_matrices_adamw_sized_steps():
  """`harness_consistent_rms=0.2` scales the orthogonalized hidden-matrix steps to RMS
  ~0.2 per unit of rate, in meta-training's `update` and in the shipped transform alike,
  whatever the width; Muon's shape scale (None) gives RMS ~1/sqrt(width), here 1/4."""
  params, grads = _tree(6)
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
  lr = 1e-2
  steps = {}
  for target in (None, 0.2):
    lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=lr, meta_train_harness=True,
                            harness_consistent_rms=target)
    theta = lopt.init_meta_params(jax.random.key(0))
    use = lo.to_optax(lopt, theta, learning_rate=lr)
    u_use, _ = use.update(grads, use.init(params), params)
    # Meta-training at a constant rate (no horizon) steps as the shipped transform does.
    u_meta, _ = lopt.update(theta, grads, lopt.init(theta, params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u_use, u_meta)
    steps[target] = rms(u_use["Dense_1"]["kernel"]) / lr
    # AdamW's part is untouched by the option: its first step is lr * sign(g).
    np.testing.assert_allclose(rms(u_use["Dense_2"]["kernel"]) / lr, 1.0, rtol=1e-3)
  assert 0.15 < steps[0.2] < 0.25, steps
  assert 0.2 < steps[None] < 0.3, steps  # 1/sqrt(16), Newton-Schulz's ~orthogonal factor
  with pytest.raises(ValueError, match="harness_consistent_rms must be a number > 0"):
    lo.NormalizedMLP(harness_consistent_rms=0.0)


def test_harness_learned_head_sends_the_head_through_the_learned_rule():
  """`harness_learned_head=True` (Celo2's released partition): the head kernel takes the
  orthogonalized learned step like the hidden kernels; biases, the scalar and embeddings
  stay with AdamW. The default gives the head to AdamW (first step lr * sign(g))."""
  params, grads = _tree(8)
  params = {**params, "embed": {"embedding": params["Dense_1"]["kernel"]}}
  grads = {**grads, "embed": {"embedding": grads["Dense_1"]["kernel"]}}
  lr = 1e-2
  labels = normalized_optax.learned_head_labels(params)
  assert labels["Dense_2"]["kernel"] == "muon" and labels["Dense_2"]["bias"] == "adam"
  assert labels["embed"]["embedding"] == "adam" and labels["gain"] == "adam"
  heads = {}
  for learned_head in (False, True):
    lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=lr, meta_train_harness=True,
                            harness_consistent_rms=0.2, harness_learned_head=learned_head)
    theta = lopt.init_meta_params(jax.random.key(0))
    use = lo.to_optax(lopt, theta, learning_rate=lr)
    u, _ = use.update(grads, use.init(params), params)
    u_meta, _ = lopt.update(theta, grads, lopt.init(theta, params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u, u_meta)
    heads[learned_head] = np.asarray(u["Dense_2"]["kernel"]) / lr
    for leaf in (u["Dense_2"]["bias"], u["embed"]["embedding"]):  # AdamW's first step
      np.testing.assert_allclose(np.abs(np.asarray(leaf)) / lr, 1.0, rtol=1e-3)
  np.testing.assert_allclose(np.abs(heads[False]), 1.0, rtol=1e-3)
  # Learned: minus the network's direction for the head, orthogonalized by optax's
  # Newton-Schulz, scaled to RMS 0.2.
  head = heads[True]
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  assert 0.15 < rms(head) < 0.25
  direction = normalized_optax.scale_by_normalized_mlp(lopt.at_use(), theta)
  d, _ = direction.update(grads, direction.init(params), params)
  ortho = np.asarray(orthogonalize_via_newton_schulz(
      d["Dense_2"]["kernel"], jnp.asarray(features.NS_COEFFS), features.NS_STEPS))
  np.testing.assert_allclose(head / rms(head), -ortho / rms(ortho), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="harness_learned_head must be True or False, got 1"):
    lo.NormalizedMLP(harness_learned_head=1)


def test_harness_runs_models_without_a_hidden_matrix():
  """A model whose every leaf goes to AdamW (a vector, a linear classifier's head and
  bias) leaves the learned part empty: the harness is then AdamW, not an error."""
  lopt = lo.NormalizedMLP(fused="xla", meta_train_lr=1e-2, meta_train_harness=True)
  theta = lopt.init_meta_params(jax.random.key(0))
  params = {"x": jnp.ones((5,)), "head": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros((3,))}}
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  tx = lo.to_optax(lopt, theta, learning_rate=1e-2)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = optax.adamw(1e-2, weight_decay=0.0).update(grads, optax.adamw(1e-2).init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u, ref)
  u_meta, _ = jax.jit(lambda s: lopt.update(theta, grads, s, params))(lopt.init(theta, params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u_meta, ref)
