"""Task augmentation (`ParamScaleFamily`, `task.param_scale_range`) and fine-tuning a
learned optimizer from a checkpoint (`lopt.init_from`)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.runner import run_meta_training
from learned_opt.tasks import QuadraticFamily
from learned_opt.tasks.augment import ParamScaleFamily

QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.num_steps=3",
         "outer.learning_rate=0.05", "run.checkpoint_every=2"]


@pytest.mark.slow
def test_param_scale_family_is_the_base_task_reparameterized():
  base = QuadraticFamily(dim=8, noise_range=(0.0, 0.0))
  fam = ParamScaleFamily(base, (0.1, 10.0))
  cfg = fam.sample(jax.random.key(0))
  s = float(cfg["scales"][0])
  assert cfg["scales"].shape == (1,) and 0.1 <= s <= 10.0 and fam.name == "quadratic_8d_pscale"
  phi = fam.init_params(cfg, jax.random.key(1))
  theta = base.init_params(cfg["base"], jax.random.key(1))
  np.testing.assert_allclose(phi["x"] * s, theta["x"], rtol=1e-6)
  batch = fam.batch(cfg, jax.random.key(2))
  loss_phi = fam.loss(cfg, phi, None, batch)
  np.testing.assert_allclose(loss_phi, base.loss(cfg["base"], theta, None, batch), rtol=1e-6)
  # Chain rule: d/dphi L(s phi) = s * L'(theta).
  g_phi = jax.grad(fam.loss, argnums=1)(cfg, phi, None, batch)["x"]
  g_theta = jax.grad(base.loss, argnums=1)(cfg["base"], theta, None, batch)["x"]
  np.testing.assert_allclose(g_phi, s * g_theta, rtol=1e-5)
  # So the Adam step size that moves theta alike is s times smaller in phi's units:
  # Adam at lr on phi = Adam at lr * s on theta (Adam is invariant to the gradient scale).
  def run(loss, p, lr):
    tx = optax.adam(lr)
    state = tx.init(p)
    for _ in range(5):
      u, state = tx.update(jax.grad(loss)(p), state)
      p = optax.apply_updates(p, u)
    return p
  p_phi = run(lambda p: fam.loss(cfg, p, None, batch), phi, 0.01)
  p_theta = run(lambda p: base.loss(cfg["base"], p, None, batch), theta, 0.01 * s)
  np.testing.assert_allclose(p_phi["x"] * s, p_theta["x"], rtol=1e-4, atol=1e-6)
  # Configs stack and vmap like any family's.
  cfgs = jax.vmap(fam.sample)(jax.random.split(jax.random.key(3), 4))
  losses = jax.vmap(lambda c, k: fam.loss(c, fam.init_params(c, k), None, fam.full_batch(c)))(
      cfgs, jax.random.split(jax.random.key(4), 4))
  assert losses.shape == (4,) and bool(jnp.all(jnp.isfinite(losses)))
  assert len(set(np.asarray(cfgs["scales"][:, 0]).round(6))) == 4
  with pytest.raises(ValueError, match=r"scale_range must be \(low, high\) with 0 < low <= high, got \(0.0, 1.0\)"):
    ParamScaleFamily(base, (0.0, 1.0))


def test_param_scale_range_in_config_wraps_every_family():
  cfg = config_lib.load_config(None, QUICK + ["task.param_scale_range=[0.5, 2]"])
  lopt = config_lib.build_lopt(cfg.lopt)
  (est,) = config_lib.build_estimators(cfg, lopt)
  assert isinstance(est.family, ParamScaleFamily) and est.family.scale_range == (0.5, 2.0)
  with pytest.raises(ValueError, match=r"task.param_scale_range must be \[low, high\], got \[1.0\]"):
    config_lib.build_family("quadratic", config_lib.load_config(None, ["task.param_scale_range=[1]"]).task)


def test_init_from_starts_meta_training_from_a_checkpoint(tmp_path):
  cfg = config_lib.load_config(None, QUICK)
  lopt = config_lib.build_lopt(cfg.lopt)
  theta = jax.tree.map(lambda x: x + 0.7, lopt.init_meta_params(jax.random.key(5)))
  path = str(tmp_path / "start.lopt")
  learned_opt.save(path, lopt, theta, {"note": "test"})
  tuned = config_lib.load_config(None, QUICK + [f"lopt.init_from={path}"])
  start = run_meta_training(tuned, str(tmp_path / "run0"), progress=False, stop_after=0)
  for a, b in zip(jax.tree.leaves(start.learner.meta_params), jax.tree.leaves(theta)):
    np.testing.assert_array_equal(a, b)
  fresh = run_meta_training(config_lib.load_config(None, QUICK), str(tmp_path / "fresh"),
                            progress=False, stop_after=0)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh.learner.meta_params),
                                                      jax.tree.leaves(theta)))
  # A shipped name works too, and a mismatched architecture or unknown source is named.
  shipped = config_lib.load_config("configs/pretrain_hierarchical_adam.yaml",
                                   ["lopt.init_from=hierarchical_adam"])
  meta = config_lib.initial_meta_params(shipped.lopt, config_lib.build_lopt(shipped.lopt))
  _, ref, _ = learned_opt.load(str(learned_opt.pretrained_path("hierarchical_adam")))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(meta), jax.tree.leaves(ref)))
  other = config_lib.load_config("configs/pretrain_hierarchical_adam.yaml",
                                 ["lopt.init_from=hierarchical_adam", "lopt.options.num_mlps=2"])
  with pytest.raises(ValueError, match=r"differs from the configured HierarchicalLOpt in \['num_mlps'\]"):
    config_lib.initial_meta_params(other.lopt, config_lib.build_lopt(other.lopt))
  with pytest.raises(ValueError, match="lopt.init_from='nope' is neither a file nor a shipped optimizer"):
    config_lib.initial_meta_params(config_lib.load_config(None, ["lopt.init_from=nope"]).lopt, lopt)


def test_full_batch_families_add_noise_free_sub_pools():
  from learned_opt.tasks.augment import FullBatchFamily
  cfg = config_lib.load_config(None, QUICK + ["task.full_batch_families=[quadratic]"])
  lopt = config_lib.build_lopt(cfg.lopt)
  ests = config_lib.build_estimators(cfg, lopt)
  assert [type(e.family).__name__ for e in ests] == ["QuadraticFamily", "FullBatchFamily"]
  fam = ests[1].family
  assert fam.name == "quadratic_32d_fullbatch"
  qcfg = fam.sample(jax.random.key(0))
  assert float(qcfg.noise_scale) > 0  # the base task is noisy ...
  b1, b2 = fam.batch(qcfg, jax.random.key(1)), fam.batch(qcfg, jax.random.key(2))
  np.testing.assert_array_equal(b1["noise"], b2["noise"])  # ... its full-batch twin is not
  np.testing.assert_array_equal(b1["noise"], 0.0)
  assert isinstance(FullBatchFamily(fam.base).task(), learned_opt.tasks.Task)


@pytest.mark.slow  # ~30 s: a meta-training run with a Taylor-enclosure pass per inner step
def test_meta_training_feeds_the_saferate_feature_its_loss_function(tmp_path):
  # The "saferate" feature bounds the loss along the Adam direction, so the inner loop
  # must hand the optimizer `value_fn` (the step's batch loss); without it the feature
  # raises at trace time.
  sets = ["lopt.name=hierarchical", "task.families=[quadratic]",
          "task.full_batch_families=[quadratic]", "truncation.horizon=12",
          "estimator.unroll_length=4", "estimator.num_tasks=2", "outer.num_steps=2",
          "run.checkpoint_every=2", "run.export=null", "run.tensorboard=false",
          "lopt.options={tensor_hidden: 4, num_mlps: 2, per_param_hidden: 2, nominal: adam, "
          "features: [grad, momentum, adam, saferate, step_embed]}"]
  cfg = config_lib.load_config(None, sets)
  lopt = config_lib.build_lopt(cfg.lopt)
  assert lopt.needs_value_fn and not learned_opt.HierarchicalLOpt().needs_value_fn
  result = run_meta_training(cfg, str(tmp_path / "run"), progress=False)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    history = [json.loads(line) for line in f]
  assert result.finished and len(history) == 2
  assert all(np.isfinite(m["meta_loss"]) and m["skipped"] == 0 for m in history)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(result.learner.meta_params))
