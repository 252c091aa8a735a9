"""One registry of architectures, shared by configs, checkpoints and evaluation."""
import os

import jax
import pytest
from flax import struct

import learned_opt
from learned_opt import registry
from learned_opt.meta_train import MetaTrainer, Trainer, run_meta_training
from learned_opt.meta_train.run import config as config_lib


class UnregisteredLR(learned_opt.LearnedLR):
  """A LearnedLR variant nobody registered: checkpoints could not save it."""
  name = "unregistered_lr"


class ScaledLR(learned_opt.LearnedLR):
  name = "scaled_lr_for_tests"
  scale: float = struct.field(pytree_node=False, default=2.0)


def test_builtin_architectures_are_registered_once_for_checkpoints_and_configs():
  assert set(registry.ARCHITECTURES) >= {"learned_lr", "per_param_mlp", "per_param_lstm",
                                         "hierarchical"}
  assert learned_opt.checkpoint.ARCHITECTURES is registry.ARCHITECTURES
  assert config_lib.lopt_class("hierarchical") is learned_opt.HierarchicalLOpt
  with pytest.raises(ValueError, match="unknown learned optimizer 'nope'.*per_param_mlp"):
    config_lib.lopt_class("nope")


def test_a_config_naming_an_unsaveable_class_fails_before_any_work(tmp_path):
  cfg = config_lib.config_from_dict({
      "lopt": {"name": "test_registry:UnregisteredLR"}, "task": {"families": ["quadratic"]},
      "outer": {"num_steps": 2}})
  out = tmp_path / "run"
  with pytest.raises(ValueError, match="UnregisteredLR is not a registered .*register_architecture"):
    run_meta_training(cfg, str(out), progress=False)
  assert not out.exists()  # nothing was written, nothing ran
  with pytest.raises(ValueError, match="could not be saved"):
    learned_opt.save(str(tmp_path / "x.lopt"), UnregisteredLR(), {"log_lr": jax.numpy.zeros(())})


def test_a_registered_class_trains_saves_and_loads(tmp_path):
  learned_opt.register_architecture(ScaledLR)
  try:
    assert config_lib.lopt_class("test_registry:ScaledLR") is ScaledLR
    lopt = config_lib.build_lopt(config_lib.LOptConfig("scaled_lr_for_tests", {"scale": 3.0}))
    path = str(tmp_path / "s.lopt")
    learned_opt.save(path, lopt, lopt.init_meta_params(jax.random.key(0)))
    loaded, _, _ = learned_opt.load(path)
    assert loaded == lopt and type(loaded) is ScaledLR
    with pytest.raises(ValueError, match="already registered"):
      learned_opt.register_architecture(
          type("Other", (learned_opt.LearnedLR,), {"name": "scaled_lr_for_tests"}))
  finally:
    registry.ARCHITECTURES.pop("scaled_lr_for_tests", None)


def test_trainers_share_one_interface():
  assert issubclass(MetaTrainer, Trainer)
  for method in ("init", "step", "gather_states", "scatter_states", "close"):
    assert callable(getattr(MetaTrainer, method))
  with pytest.raises(TypeError):
    Trainer([object()], None)  # abstract


def test_the_ray_trainer_implements_the_same_interface():
  pytest.importorskip("ray")
  from learned_opt.meta_train.distributed.pool import RayMetaTrainer
  assert issubclass(RayMetaTrainer, Trainer)
