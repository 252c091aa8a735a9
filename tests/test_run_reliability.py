"""Run folders under stress: kills, torn writes, Ctrl-C, NaN runs, bad init_from paths.

Each test damages a run folder the way a kill or a full disk does (or stops a run the
way Ctrl-C does) and checks that the run resumes to exactly the uninterrupted result,
losing nothing that was complete, or fails with one line that names the file.
"""
import json
import logging
import os
import shlex
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from learned_opt.meta_train.cli import main
from learned_opt.meta_train.learner.trainer import MetaTrainer
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.runner import NoProgressError, run_meta_training
from test_meta_runs import QUICK, _leaves_equal  # a seconds-long run: 6 outer steps


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """The uninterrupted QUICK run every resumed run must reproduce bit for bit."""
  cfg = config_lib.load_config(None, QUICK)
  return run_meta_training(cfg, str(tmp_path_factory.mktemp("whole") / "run"), progress=False)


def _steps(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def _ckpt_steps(run_dir):
  return [s for s, _ in run_checkpoint.list_checkpoints(os.path.join(run_dir, "checkpoints"))]


def _stopped(tmp_path, after):
  """A QUICK run stopped after `after` outer steps (checkpoints every 2, keep 2)."""
  cfg = config_lib.load_config(None, QUICK)
  run_dir = str(tmp_path / "run")
  run_meta_training(cfg, run_dir, progress=False, stop_after=after)
  return cfg, run_dir


def _resume_matches(cfg, run_dir, whole):
  resumed = run_meta_training(cfg, run_dir, resume=True, progress=False)
  assert resumed.finished and _steps(run_dir) == [1, 2, 3, 4, 5, 6]
  assert _leaves_equal(resumed.learner, whole.learner)
  assert _leaves_equal(resumed.states, whole.states)
  return resumed


# ---- torn and stale files -------------------------------------------------------------
def test_resume_truncates_a_torn_metrics_line(tmp_path, whole, caplog):
  cfg, run_dir = _stopped(tmp_path, 3)
  path = os.path.join(run_dir, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 4, "grad_norm": 0.0, "meta_lo')  # a kill mid-write of step 4's line
  with caplog.at_level(logging.WARNING):
    _resume_matches(cfg, run_dir, whole)
  assert "metrics.jsonl: dropping a torn last line 4" in caplog.text


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
  cfg, run_dir = _stopped(tmp_path, 3)
  path = os.path.join(run_dir, "metrics.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  lines[1] = "garbage\n"
  open(path, "w").writelines(lines)
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record"):
    run_meta_training(cfg, run_dir, resume=True, progress=False)


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, whole, caplog):
  cfg, run_dir = _stopped(tmp_path, 4)
  assert _ckpt_steps(run_dir) == [2, 4]
  newest = run_checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))[1]
  data = open(newest, "rb").read()
  open(newest, "wb").write(data[:len(data) // 2])
  with caplog.at_level(logging.WARNING):
    _resume_matches(cfg, run_dir, whole)
  assert "ckpt_000000004.msgpack is truncated or corrupt" in caplog.text
  assert os.path.exists(newest + ".corrupt")  # set aside for inspection, not deleted
  assert _ckpt_steps(run_dir) == [4, 6]


def test_no_readable_checkpoint_names_every_file(tmp_path):
  cfg, run_dir = _stopped(tmp_path, 4)
  for _, path in run_checkpoint.list_checkpoints(os.path.join(run_dir, "checkpoints")):
    open(path, "wb").close()
  with pytest.raises(ValueError, match=r"no checkpoint in .* is readable: .*ckpt_000000004"
                                       r".*0 bytes.*ckpt_000000002"):
    run_meta_training(cfg, run_dir, resume=True, progress=False)
  assert _ckpt_steps(run_dir) == [2, 4]  # nothing renamed when nothing could be used


def test_resume_survives_an_empty_config_yaml(tmp_path, whole, caplog):
  cfg, run_dir = _stopped(tmp_path, 2)
  open(os.path.join(run_dir, "config.yaml"), "w").close()
  with caplog.at_level(logging.WARNING):
    _resume_matches(cfg, run_dir, whole)
  assert "config.yaml is empty" in caplog.text
  assert open(os.path.join(run_dir, "config.yaml")).read() == config_lib.dump_config(cfg)


def test_broken_config_yaml_is_named(tmp_path):
  cfg, run_dir = _stopped(tmp_path, 2)
  open(os.path.join(run_dir, "config.yaml"), "w").write("outer: [1,\n")
  with pytest.raises(ValueError, match=r"config\.yaml:\d+:\d+: invalid YAML"):
    run_meta_training(cfg, run_dir, resume=True, progress=False)


def test_stale_temp_files_are_removed(tmp_path, whole):
  cfg, run_dir = _stopped(tmp_path, 2)
  stale = [os.path.join(run_dir, "checkpoints", ".tmp_ckpt_k1ll3d"),
           os.path.join(run_dir, "metrics.jsonl.tmp"),
           os.path.join(run_dir, ".config.yaml.x1.tmp"),
           os.path.join(run_dir, ".final.lopt.x2.tmp")]
  for path in stale:
    open(path, "wb").close()  # 0 bytes, as a kill during the write leaves them
  _resume_matches(cfg, run_dir, whole)
  assert not [p for p in stale if os.path.exists(p)]
  assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".")]


# ---- Ctrl-C ------------------------------------------------------------------------
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_leaves_metrics_and_checkpoint_at_the_same_step(tmp_path, whole, monkeypatch, presses):
  """SIGINT lands while the run waits for step 3's metrics (where a real Ctrl-C lands:
  XLA holds the signal until it returns). One press finishes the step; a second one
  stops at once; either way the metrics and the checkpoint both end at step 3."""
  real_device_get = jax.device_get
  calls = {"n": 0}
  # What the run must restore: Python's default, or SIG_IGN when pytest itself was
  # started in the background by a non-interactive shell.
  handler_before = signal.getsignal(signal.SIGINT)

  def device_get(x):
    if isinstance(x, dict) and "meta_loss" in x:
      calls["n"] += 1
      if calls["n"] == 3:
        for _ in range(presses):
          os.kill(os.getpid(), signal.SIGINT)
    return real_device_get(x)

  cfg = config_lib.load_config(None, QUICK)
  run_dir = str(tmp_path / "run")
  monkeypatch.setattr(jax, "device_get", device_get)
  with pytest.raises(KeyboardInterrupt):
    run_meta_training(cfg, run_dir, progress=False)
  monkeypatch.setattr(jax, "device_get", real_device_get)
  assert _steps(run_dir) == [1, 2, 3] and _ckpt_steps(run_dir)[-1] == 3
  assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
  _resume_matches(cfg, run_dir, whole)


def test_printed_hint_resumes_with_every_set_flag(tmp_path, monkeypatch, capsys):
  """The hint carries the --set flags, shell-quoted; run as printed it finishes the run."""
  out = str(tmp_path / "my run")
  sets = QUICK + ["run.log_every=1", "task.families=[quadratic]"]
  argv = ["meta-train", "configs/tiny.yaml", "--out", out, "--no-progress",
          *[a for s in sets for a in ("--set", s)]]
  original = MetaTrainer.step
  calls = {"n": 0}

  def interrupted(self, *args):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt
    return original(self, *args)

  monkeypatch.setattr(MetaTrainer, "step", interrupted)
  assert main(argv) == 130
  monkeypatch.setattr(MetaTrainer, "step", original)
  err = capsys.readouterr().err
  assert "checkpoint of outer step 3 written" in err
  hint = err.strip().splitlines()[-1].strip()
  assert "'lopt.options={}'" in hint and "'task.families=[quadratic]'" in hint
  tokens = shlex.split(hint)
  assert tokens[:2] == ["lopt", "meta-train"] and tokens[-1] == "--resume"
  assert main(tokens[1:]) == 0
  assert _steps(out) == [1, 2, 3, 4, 5, 6] and os.path.exists(os.path.join(out, "final.lopt"))


def test_config_mismatch_names_keys_and_values(tmp_path):
  cfg, run_dir = _stopped(tmp_path, 2)
  other = config_lib.load_config(None, QUICK + ["estimator.sigma=0.1", "outer.num_steps=9",
                                                "run.log_every=2"])
  with pytest.raises(ValueError, match=r"differs from this config in 2 key\(s\): "
                                       r"estimator\.sigma: run has 0\.01, this config 0\.1; "
                                       r"run\.log_every: run has 1, this config 2"):
    run_meta_training(other, run_dir, resume=True, progress=False)


@pytest.mark.slow
def test_real_sigint_to_the_command(tmp_path):
  """The `lopt` command under a real Ctrl-C, twice: each stop leaves metrics and the
  checkpoint at the same step, and the printed command continues the run."""
  lopt = os.path.join(os.path.dirname(sys.executable), "lopt")
  out = str(tmp_path / "run")
  sets = [s for s in QUICK if not s.startswith("outer.num_steps")] + ["outer.num_steps=100000"]
  cmd = [lopt, "meta-train", "--out", out, "--no-progress",
         *[a for s in sets for a in ("--set", s)]]

  def interrupt(cmd, after_lines):
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    # Lines are counted by their newlines: the run may be writing the next one.
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= after_lines):
      assert proc.poll() is None, proc.stderr.read()
      try:
        proc.wait(timeout=0.05)
      except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    assert proc.returncode == 130, err
    assert _steps(out)[-1] == _ckpt_steps(out)[-1], err
    return err.strip().splitlines()[-1].strip()

  hint = interrupt(cmd, 2)
  first_stop = _steps(out)[-1]
  tokens = shlex.split(hint)
  assert tokens[0] == "lopt" and tokens[-1] == "--resume"
  interrupt([lopt] + tokens[1:], first_stop + 2)
  steps = _steps(out)
  assert steps == list(range(1, steps[-1] + 1))  # no step missing, none twice


# ---- runs that make no progress -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # sigma in float32
def test_a_run_whose_every_step_is_skipped_fails_without_export(tmp_path, capsys):
  out = str(tmp_path / "run")
  argv = ["meta-train", "--out", out, "--no-progress",
          *[a for s in QUICK + ["estimator.sigma=1.0e-40"] for a in ("--set", s)]]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "all 6 outer steps of this call were skipped" in err and "estimator.sigma" in err
  assert len(err.strip().splitlines()) == 1
  assert not os.path.exists(os.path.join(out, "final.lopt"))
  assert _ckpt_steps(out)[-1] == 6  # checkpointed, for inspection
  with open(os.path.join(out, "metrics.jsonl")) as f:
    assert all(json.loads(line)["skipped"] == 1 for line in f)


def test_some_skipped_steps_warn_and_export(tmp_path, monkeypatch, caplog):
  from learned_opt.meta_train.run import runner
  original = MetaTrainer.step
  calls = {"n": 0}

  def one_skipped(self, *args):
    learner, states, metrics = original(self, *args)
    calls["n"] += 1
    return learner, states, {**metrics, "skipped": np.int32(calls["n"] == 2)}

  monkeypatch.setattr(MetaTrainer, "step", one_skipped)
  with caplog.at_level(logging.WARNING):
    result = run_meta_training(config_lib.load_config(None, QUICK), str(tmp_path / "run"),
                               progress=False)
  assert result.export_path and os.path.exists(result.export_path)
  assert "1 of 6 outer steps were skipped" in caplog.text
  with pytest.raises(NoProgressError, match="all 2 outer steps"):
    runner._check_progress({"ran": 2, "skipped": 2}, config_lib.load_config(None, QUICK))


# ---- init_from ------------------------------------------------------------------------
def test_init_from_a_directory_or_a_bad_file_is_named(tmp_path, capsys):
  out = str(tmp_path / "run")
  argv = ["meta-train", "--out", out, "--no-progress", "--set", f"lopt.init_from={tmp_path}",
          *[a for s in QUICK for a in ("--set", s)]]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert f"lopt.init_from='{tmp_path}' is a directory; expected a .lopt file" in err
  assert not os.path.exists(out)  # refused before the run folder was written
  bad = tmp_path / "bad.lopt"
  bad.write_bytes(b"not a checkpoint")
  cfg = config_lib.load_config(None, QUICK + [f"lopt.init_from={bad}"])
  with pytest.raises(ValueError, match=r"lopt.init_from=.*bad\.lopt.*not a lopt checkpoint"):
    run_meta_training(cfg, out, progress=False)
