"""Config files and --set flags: YAML errors, ranges checked up front, numbers as typed."""
import dataclasses
import os

import pytest

from learned_opt.meta_train.cli import main
from learned_opt.meta_train.run import config as config_lib
from test_meta_runs import QUICK


# ---- YAML syntax --------------------------------------------------------------------
@pytest.mark.parametrize("text,line,column,problem", [
    ("outer:\n  learning_rate: 0.01\n  options: [1, 2\nrun: {}\n", 4, 4, "expected ',' or ']'"),
    ("outer:\n\tnum_steps: 5\n", 2, 1, "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, capsys, text, line, column, problem):
  path = tmp_path / "c.yaml"
  path.write_text(text)
  with pytest.raises(ValueError) as info:
    config_lib.load_config(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}:{line}:{column}: invalid YAML: ") and problem in message
  assert "\n" not in message
  assert main(["meta-train", str(path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"lopt meta-train: error: {path}:{line}:{column}: invalid YAML")
  assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_set_value_with_a_yaml_error_is_named():
  with pytest.raises(ValueError, match=r"--set 'lopt.options.hidden_sizes=\[8': invalid YAML at column 3 of the value"):
    config_lib.load_config(None, ["lopt.options.hidden_sizes=[8"])


def test_unreadable_config_path_is_named(tmp_path):
  with pytest.raises(ValueError, match=f"cannot read config {tmp_path}: Is a directory"):
    config_lib.load_config(str(tmp_path))


# ---- ranges, checked before any work -----------------------------------------------------
BAD = [
    ("outer.num_steps=0", "'outer.num_steps': got 0, expected an int >= 1"),
    ("outer.num_steps=-3", "'outer.num_steps': got -3, expected an int >= 1"),
    ("outer.learning_rate=0", "'outer.learning_rate': got 0.0, expected a finite number > 0"),
    ("outer.learning_rate=.inf", "'outer.learning_rate': got inf, expected a finite number > 0"),
    ("outer.grad_clip=-1", "'outer.grad_clip': got -1.0, expected a finite number > 0"),
    ("outer.accumulate=0", "'outer.accumulate': got 0, expected an int >= 1"),
    ("outer.optimizer=adamm", "unknown outer.optimizer 'adamm'; expected one of 'adam'"),
    ("run.checkpoint_every=0", "'run.checkpoint_every': got 0, expected an int >= 1"),
    ("run.keep_checkpoints=0", "'run.keep_checkpoints': got 0, expected an int >= 1"),
    ("run.log_every=0", "'run.log_every': got 0, expected an int >= 1"),
    ("run.export=out/final.lopt", "'run.export': got 'out/final.lopt', expected a file name"),
    ("estimator.num_tasks=0", "'estimator.num_tasks': got 0, expected an int >= 1"),
    ("estimator.unroll_length=0", "'estimator.unroll_length': got 0, expected an int >= 1"),
    ("estimator.sigma=0", "'estimator.sigma': got 0.0, expected a finite number > 0"),
    ("estimator.sigma=.nan", "'estimator.sigma': got nan, expected a finite number > 0"),
    ("estimator.loss_diff_clip=0", "'estimator.loss_diff_clip': got 0.0, expected a finite number > 0"),
    ("estimator.map_batch_size=0", "'estimator.map_batch_size': got 0, expected an int >= 1"),
    ("estimator.population_map=pmap", "unknown estimator.population_map 'pmap'"),
    ("estimator.meta_loss_split=val", "unknown estimator.meta_loss_split 'val'"),
    ("truncation.horizon=0", "'truncation.horizon': got 0, expected an int >= 1"),
    ("truncation.kind=linear", "unknown truncation.kind 'linear'"),
    ("truncation.horizon=4", "'truncation.horizon': got 4, expected >= estimator.unroll_length \\(5\\)"),
    ("seed=-1", "'seed': got -1, expected an int in \\[0, 4294967295\\]"),
    ("seed=4294967296", "'seed': got 4294967296, expected an int in \\[0, 4294967295\\]"),
    ("task.param_scale_range=[2, 1]", "'task.param_scale_range': got \\[2.0, 1.0\\], expected \\[low, high\\]"),
    ("task.families=[]", "task.families is empty"),
]


@pytest.mark.parametrize("setting,match", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_settings_are_refused_up_front(setting, match):
  with pytest.raises(ValueError, match=match):
    config_lib.load_config(None, QUICK + [setting])


def test_log_uniform_lengths_are_checked_together():
  with pytest.raises(ValueError, match=r"'truncation.min_length' \(300\) and 'truncation.max_length' "
                                       r"\(100\): expected min_length <= max_length"):
    config_lib.load_config(None, QUICK + ["truncation.kind=log_uniform", "truncation.min_length=300",
                                          "truncation.max_length=100"])
  with pytest.raises(ValueError, match=r"'truncation.min_length': got 3, expected >= estimator.unroll_length"):
    config_lib.load_config(None, QUICK + ["truncation.kind=log_uniform", "truncation.min_length=3"])


def test_python_built_configs_are_checked_too():
  with pytest.raises(ValueError, match="'outer.num_steps': got 0"):
    config_lib.OuterConfig(num_steps=0)
  cfg = config_lib.load_config(None, QUICK)
  with pytest.raises(ValueError, match="'run.checkpoint_every': got 0"):
    dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_every=0))


@pytest.mark.parametrize("setting", ["outer.num_steps=0", "run.checkpoint_every=0",
                                     "run.keep_checkpoints=0"])
def test_cli_refuses_before_any_work(tmp_path, capsys, setting):
  out = tmp_path / "run"
  argv = ["meta-train", "--out", str(out), "--no-progress",
          *[a for s in QUICK + [setting] for a in ("--set", s)]]
  assert main(argv) == 2
  assert setting.split("=")[0] in capsys.readouterr().err
  assert not out.exists()  # no folder, no checkpoint, no final.lopt


# ---- numbers as people type them ---------------------------------------------------------
def test_floats_typed_without_a_dot_are_floats(tmp_path):
  cfg = config_lib.load_config(None, ["outer.learning_rate=3e-4", "estimator.sigma=1E-2",
                                      "outer.grad_clip=1e1", "task.param_scale_range=[1e-1, 1e1]"])
  assert cfg.outer.learning_rate == 3e-4 and isinstance(cfg.outer.learning_rate, float)
  assert cfg.estimator.sigma == 0.01 and cfg.outer.grad_clip == 10.0
  assert cfg.task.param_scale_range == (0.1, 10.0)
  path = tmp_path / "c.yaml"
  path.write_text("outer:\n  learning_rate: 3e-4\nestimator:\n  loss_diff_clip: 2e0\n")
  cfg = config_lib.load_config(str(path))
  assert cfg.outer.learning_rate == 3e-4 and cfg.estimator.loss_diff_clip == 2.0
  assert config_lib.config_from_dict(config_lib.config_to_dict(cfg)) == cfg
  lopt = config_lib.build_lopt(config_lib.LOptConfig("learned_lr", {"init_lr": "1e-3"}))
  assert lopt.init_lr == 1e-3
  # Not numbers stay errors; ints are not floats in disguise.
  with pytest.raises(ValueError, match=r"'outer.learning_rate': got 'fast' \(str\), expected float"):
    config_lib.load_config(None, ["outer.learning_rate=fast"])
  with pytest.raises(ValueError, match=r"'outer.num_steps': got '1e3' \(str\), expected int"):
    config_lib.load_config(None, ["outer.num_steps=1e3"])


def test_shipped_configs_are_within_range():
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  for name in sorted(n for n in os.listdir(root) if n.endswith(".yaml")):
    config_lib.load_config(os.path.join(root, name))  # raises if any setting is out of range
