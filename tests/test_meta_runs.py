"""Meta-training runs: config validation, the learner, checkpoints, resume, CLI, plots."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.cli import main
from learned_opt.meta_train.estimators.base import GradEstimate
from learned_opt.meta_train.learner.outer import apply_estimate, init_learner, make_outer_optimizer
from learned_opt.meta_train.learner.trainer import MetaTrainer
from learned_opt.meta_train.run import build
from learned_opt.meta_train.run import ship
from learned_opt.meta_train.run.runner import run_meta_training

# A seconds-long run: learned SGD step size on 32-d quadratics.
QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.num_steps=6",
         "outer.learning_rate=0.05", "run.checkpoint_every=2", "run.keep_checkpoints=2"]


def _leaves_equal(a, b):
  raw = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(np.asarray(raw(x)), np.asarray(raw(y))) for x, y in zip(la, lb))


# ---- config ------------------------------------------------------------------------
def test_unknown_keys_and_bad_types_are_named(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("estimator:\n  num_task: 8\n")
  with pytest.raises(ValueError, match=r"'estimator.num_task'.*valid keys under estimator: kind, num_tasks"):
    config_lib.load_config(str(path))
  with pytest.raises(ValueError, match=r"unknown config key 'outr'.*valid keys: name, seed"):
    config_lib.config_from_dict({"outr": {}})
  with pytest.raises(ValueError, match=r"'outer.num_steps': got 'many' \(str\), expected int"):
    config_lib.load_config(None, ["outer.num_steps=many"])
  with pytest.raises(ValueError, match="'estimator.sigma'"):
    config_lib.load_config(None, ["estimator.sigma=true"])
  with pytest.raises(ValueError, match="key=value"):
    config_lib.load_config(None, ["estimator.sigma"])
  with pytest.raises(ValueError, match="lopt.options.hiden"):
    config_lib.build_lopt(config_lib.LOptConfig("per_param_mlp", {"hiden": 3}))
  with pytest.raises(ValueError, match="unknown learned optimizer 'mlp'"):
    config_lib.build_lopt(config_lib.LOptConfig("mlp"))
  with pytest.raises(ValueError, match="unknown outer optimizer 'adamm'"):
    make_outer_optimizer("adamm")
  with pytest.raises(ValueError, match="unknown outer optimizer 'apply_updates'"):
    make_outer_optimizer("apply_updates")  # a function of optax, not an optimizer
  assert make_outer_optimizer(optax.adamw, 0.1, weight_decay=0.5) is not None


def test_overrides_types_and_round_trip():
  cfg = config_lib.load_config("configs/tiny.yaml", ["estimator.sigma=0.02", "outer.learning_rate=1",
                                                     "lopt.options.hidden_sizes=[8]", "task.families=quadratic"])
  assert cfg.estimator.sigma == 0.02 and isinstance(cfg.outer.learning_rate, float)
  assert cfg.lopt.options["hidden_sizes"] == [8] and cfg.task.families == ("quadratic",)
  assert config_lib.config_from_dict(config_lib.config_to_dict(cfg)) == cfg
  assert config_lib.build_lopt(cfg.lopt).hidden_sizes == (8,)


_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".yaml")))
def test_shipped_configs_validate(name, monkeypatch):
  cfg = config_lib.load_config(os.path.join(_CONFIG_DIR, f"{name}.yaml"))
  lopt = config_lib.build_lopt(cfg.lopt)
  config_lib.build_schedule(cfg.truncation).check(cfg.estimator.unroll_length)
  # A config's init_from is a shipped name or a path from the repository root (where
  # the README runs `lopt meta-train`); it must load and match the architecture.
  monkeypatch.chdir(os.path.dirname(_CONFIG_DIR))
  if cfg.lopt.init_from is not None:
    assert build.initial_meta_params(cfg.lopt, lopt) is not None


# ---- learner -------------------------------------------------------------------------
def test_non_finite_estimate_is_skipped():
  opt = make_outer_optimizer("adam", 0.1)
  learner = init_learner({"w": jnp.ones(3)}, opt)
  good = GradEstimate({"w": jnp.ones(3)}, jnp.asarray(1.0), jnp.asarray(4), {})
  bad = good.replace(grad={"w": jnp.array([1.0, jnp.inf, jnp.nan])})
  after_bad, m = apply_estimate(opt, learner, bad)
  assert int(m["skipped"]) == 1 and _leaves_equal(after_bad.meta_params, learner.meta_params)
  after_good, m = apply_estimate(opt, after_bad, good)
  assert int(m["skipped"]) == 0 and float(after_good.meta_params["w"][0]) < 1.0
  assert np.isfinite(np.asarray(after_good.meta_params["w"])).all()


def test_accumulation_averages_estimates():
  cfg = config_lib.load_config(None, QUICK + ["outer.accumulate=2"])
  lopt = config_lib.build_lopt(cfg.lopt)
  trainer = MetaTrainer(config_lib.build_estimators(cfg, lopt), optax.sgd(1.0), accumulate=2)
  learner, states = trainer.init(0)
  assert trainer.inner_steps_per_outer_step == 2 * 2 * 4 * 5
  new, _, metrics = trainer.step(0, learner, states)
  assert np.isfinite(float(metrics["meta_loss"])) and int(new.step) == 1
  with pytest.raises(ValueError, match="accumulate"):
    MetaTrainer(trainer.estimators, optax.sgd(1.0), accumulate=0)


# ---- checkpoints and resume -------------------------------------------------------------
def test_checkpoints_are_atomic_and_pruned(tmp_path):
  tree = {"a": jnp.arange(3.0), "k": jax.random.key(7), "n": (jnp.int32(2),)}
  for step in range(5):
    run_checkpoint.save(str(tmp_path), step, tree, keep=2)
  assert [s for s, _ in run_checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
  back = run_checkpoint.restore(run_checkpoint.latest_checkpoint(str(tmp_path))[1], tree)
  assert _leaves_equal(back, tree)
  with pytest.raises(ValueError, match="does not match|expects"):
    run_checkpoint.restore(run_checkpoint.latest_checkpoint(str(tmp_path))[1], {"a": jnp.arange(4.0)})


def test_resume_is_bit_for_bit(tmp_path, monkeypatch):
  cfg = config_lib.load_config(None, QUICK)
  whole = run_meta_training(cfg, str(tmp_path / "whole"), progress=False)
  assert whole.finished and os.path.exists(whole.export_path)

  # Stopped by Ctrl-C during the 5th outer step: the 4 finished steps are checkpointed.
  calls = {"n": 0}
  original = MetaTrainer.step

  def interrupted(self, *args):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt
    return original(self, *args)

  monkeypatch.setattr(MetaTrainer, "step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    run_meta_training(cfg, str(tmp_path / "split"), progress=False)
  monkeypatch.setattr(MetaTrainer, "step", original)
  assert run_checkpoint.latest_checkpoint(str(tmp_path / "split" / "checkpoints"))[0] == 4
  # A stopped run exports nothing itself; `lopt export` writes its newest checkpoint.
  assert not os.path.exists(tmp_path / "split" / "final.lopt")
  path, step = ship.export_run(str(tmp_path / "split"))
  assert step == 4 and path.endswith("step_4.lopt") and learned_opt.load(path)[2]["outer_steps"] == 4
  init_path, _ = ship.export_run(str(tmp_path / "split"), str(tmp_path / "init.lopt"), init=True)
  lopt = config_lib.build_lopt(cfg.lopt)
  assert _leaves_equal(learned_opt.load(init_path)[1], lopt.init_meta_params(jax.random.key(cfg.seed)))
  assert not _leaves_equal(learned_opt.load(path)[1], learned_opt.load(init_path)[1])
  with pytest.raises(ValueError, match="has no config.yaml"):
    ship.export_run(str(tmp_path))
  (tmp_path / "torn.msgpack").write_bytes(b"\x85\xa7learner")
  with pytest.raises(ValueError, match="torn.msgpack does not hold meta-parameters"):
    ship.checkpoint_meta_params(str(tmp_path / "torn.msgpack"), lopt.init_meta_params(jax.random.key(0)))
  with pytest.raises(ValueError, match="--resume"):
    run_meta_training(cfg, str(tmp_path / "split"), progress=False)
  other = config_lib.load_config(None, QUICK + ["estimator.sigma=0.1"])
  with pytest.raises(ValueError, match="differs"):
    run_meta_training(other, str(tmp_path / "split"), resume=True, progress=False)
  resumed = run_meta_training(cfg, str(tmp_path / "split"), resume=True, progress=False)
  assert int(resumed.learner.step) == 6
  assert _leaves_equal(resumed.learner, whole.learner)
  assert _leaves_equal(resumed.states, whole.states)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "split" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6]
  lopt, theta, info = learned_opt.load(resumed.export_path)
  assert info["outer_steps"] == 6 and _leaves_equal(theta, whole.learner.meta_params)
  path, step = ship.export_run(str(tmp_path / "split"))
  assert step == 6 and _leaves_equal(learned_opt.load(path)[1], theta)


def test_cli_meta_train_and_plot(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert main(["meta-train", "configs/tiny.yaml", "--out", out, "--no-progress",
               *[a for s in QUICK for a in ("--set", s)]]) == 0
  assert os.path.exists(os.path.join(out, "final.lopt"))
  assert main(["plot", out]) == 0
  assert main(["export", out, "--out", str(tmp_path / "mine.lopt")]) == 0
  assert "mine.lopt (outer step 6)" in capsys.readouterr().out
  assert main(["export", str(tmp_path)]) == 2
  assert "has no config.yaml" in capsys.readouterr().err
  for name in ("meta_loss.png", "grad_norm.png"):
    with open(os.path.join(out, "plots", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert main(["meta-train", "configs/tiny.yaml", "--set", "estimator.kind=es"]) == 2
  assert "unknown estimator.kind 'es'" in capsys.readouterr().err
