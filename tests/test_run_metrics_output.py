"""Where a run's metrics go (issue 23 item 19): TensorBoard is off by default (tensorboardX
is not a dependency); on without tensorboardX it warns once, naming the install; every
run prints once, at its start, the metrics.jsonl path (and the TensorBoard folder)."""
import json
import os
import sys
import types
import warnings

import pytest

from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.metrics import MetricsWriter, read_metrics
from learned_opt.meta_train.run.runner import run_meta_training

# As tests/test_meta_runs.py: a seconds-long run (learned SGD step size on quadratics).
QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.num_steps=2",
         "outer.learning_rate=0.05", "run.checkpoint_every=2", "run.export=null"]


@pytest.fixture
def no_tensorboardx(monkeypatch):
  """`import tensorboardX` raises ImportError, whether or not it is installed here."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)


@pytest.fixture
def fake_tensorboardx(monkeypatch):
  """A stand-in tensorboardX whose SummaryWriter records what it is given."""
  written = {"logdir": [], "scalars": [], "closed": 0}

  class SummaryWriter:
    def __init__(self, logdir):
      written["logdir"].append(logdir)

    def add_scalar(self, tag, value, step):
      written["scalars"].append((tag, value, step))

    def close(self):
      written["closed"] += 1

  monkeypatch.setitem(sys.modules, "tensorboardX",
                      types.SimpleNamespace(SummaryWriter=SummaryWriter))
  return written


def _metrics_lines(text):
  return [line for line in text.splitlines() if line.startswith("metrics: ")]


def test_tensorboard_is_off_by_default():
  assert config_lib.RunConfig().tensorboard is False
  assert config_lib.load_config(None).run.tensorboard is False
  # Shipped configs that do not set it (tiny, the quickstart's defaults) get it off too.
  assert config_lib.load_config("configs/tiny.yaml").run.tensorboard is False
  assert config_lib.load_config(None, ["run.tensorboard=true"]).run.tensorboard is True


def test_writer_off_by_default_prints_the_metrics_path_only(tmp_path, capsys, fake_tensorboardx):
  # tensorboardX importable, but not asked for: nothing of TensorBoard happens.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    writer = MetricsWriter(str(tmp_path))
  writer.write(1, {"meta_loss": 0.5})
  writer.close()
  path = os.path.join(str(tmp_path), "metrics.jsonl")
  assert _metrics_lines(capsys.readouterr().out) == [f"metrics: {path}"]
  assert writer.tensorboard_dir is None and not (tmp_path / "tb").exists()
  assert fake_tensorboardx == {"logdir": [], "scalars": [], "closed": 0}
  assert read_metrics(str(tmp_path)) == [{"step": 1, "meta_loss": 0.5}]


def test_tensorboard_on_without_tensorboardx_warns_once(tmp_path, capsys, no_tensorboardx):
  with pytest.warns(RuntimeWarning) as caught:
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
  [w] = caught.list  # exactly one warning
  path = os.path.join(str(tmp_path), "metrics.jsonl")
  assert "pip install tensorboardX" in str(w.message) and path in str(w.message)
  assert "tensorboardX is not installed" in str(w.message)
  writer.write(1, {"meta_loss": 0.25})
  writer.write(2, {"meta_loss": 0.125})  # writing says nothing more
  writer.close()
  assert read_metrics(str(tmp_path)) == [{"step": 1, "meta_loss": 0.25},
                                         {"step": 2, "meta_loss": 0.125}]
  assert _metrics_lines(capsys.readouterr().out) == [f"metrics: {path}"]
  assert writer.tensorboard_dir is None


def test_tensorboard_on_with_tensorboardx_writes_scalars_and_prints_its_folder(
    tmp_path, capsys, fake_tensorboardx):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
  writer.write(3, {"meta_loss": 0.5, "grad_norm": float("nan"), "note": "x", "skipped": 2})
  writer.close()
  tb = os.path.join(str(tmp_path), "tb")
  assert writer.tensorboard_dir == tb and fake_tensorboardx["logdir"] == [tb]
  # Numbers go to TensorBoard; NaN (kept as the string "nan" in JSON) and strings do not.
  assert fake_tensorboardx["scalars"] == [("meta_loss", 0.5, 3), ("skipped", 2, 3)]
  assert fake_tensorboardx["closed"] == 1
  [line] = _metrics_lines(capsys.readouterr().out)
  assert line.startswith(f"metrics: {os.path.join(str(tmp_path), 'metrics.jsonl')}; ")
  assert f"TensorBoard: {tb}" in line


def _run_with_tensorboard_on(run_dir, capsys, **kwargs):
  cfg = config_lib.load_config("configs/tiny.yaml", QUICK + ["run.tensorboard=true"])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    run_meta_training(cfg, run_dir, progress=False, **kwargs)
  tb_warnings = [w for w in caught if "tensorboard" in str(w.message).lower()]
  assert len(tb_warnings) == 1 and tb_warnings[0].category is RuntimeWarning
  assert "pip install tensorboardX" in str(tb_warnings[0].message)
  path = os.path.join(run_dir, "metrics.jsonl")
  assert _metrics_lines(capsys.readouterr().out) == [f"metrics: {path}"]
  assert not os.path.exists(os.path.join(run_dir, "tb"))
  return path


def test_a_run_says_at_its_start_where_metrics_go(tmp_path, capsys, no_tensorboardx):
  """run.tensorboard on without tensorboardX: at the start of the run (stopped before its
  first outer step, so nothing is compiled but the pools), one line with the
  metrics.jsonl path and one warning naming the install."""
  path = _run_with_tensorboard_on(str(tmp_path / "run"), capsys, stop_after=0)
  assert os.path.exists(path)


@pytest.mark.slow  # compiles an outer step (~7 s of CPU)
def test_a_whole_run_warns_once_and_still_logs_every_step(tmp_path, capsys, no_tensorboardx):
  path = _run_with_tensorboard_on(str(tmp_path / "run"), capsys)
  with open(path) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
