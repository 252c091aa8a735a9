"""The README Quickstart's main job: `lopt meta-train configs/quickstart.yaml`, then
`lopt eval --suite heldout_offline ... --report`, through the CLI entry point.

The default tests run that path at a reduced size (a few outer steps; the suite's
quadratic tasks at a few inner steps) and check that every suite task builds without
data files; the slow one runs the README's exact command, checks that meta-training
lowered the meta-loss and that every suite task has finite results.
"""
import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import optax
import pytest

from learned_opt.meta_train import cli
from learned_opt.meta_train.run.metrics import read_metrics
from learned_opt.tasks import registry, suites

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
SUITE = "heldout_offline"


def _check_results(eval_dir: pathlib.Path, learned: str) -> dict:
  """Every suite task has finite final losses for tuned Adam and the learned optimizer."""
  results = json.loads((eval_dir / "results.json").read_text())
  assert list(results["tasks"]) == list(suites.SUITES[SUITE])
  for name, task in results["tasks"].items():
    for opt in ("adam", learned):
      r = task["optimizers"][opt]
      for key in ("final_train_loss", "test_loss", "initial_loss"):
        assert r[key] is not None and math.isfinite(r[key]), (name, opt, key, r[key])
    assert task["optimizers"]["adam"]["lr"] in results["lr_grid"]
  report = (eval_dir / "report.md").read_text()
  assert all(f"### {name}" in report for name in results["tasks"]), report[:500]
  return results


@pytest.mark.slow
def test_suite_is_offline_held_out_and_builds_without_data_files():
  suite = suites.SUITES[SUITE]
  assert 4 <= len(suite) <= 6
  assert all(t.data == "offline" for t in suite.values())
  assert not set(suite) & set(registry.META_TRAIN_FAMILIES)
  assert max(t.num_steps for t in suite.values()) >= 10 * registry.META_TRAIN_HORIZON
  key = jax.random.key(0)
  for name, spec in suite.items():
    task = spec.build(None).task()  # no data dir: generated data only
    params = task.init(key)
    loss, grads = jax.value_and_grad(task.loss)(params, key, task.batch(key))  # eager: no compile
    gnorm = optax.global_norm(grads)
    assert np.isfinite(float(loss)) and 0 < float(gnorm) < np.inf, (name, loss, gnorm)


@pytest.mark.slow
def test_quickstart_path_reduced(tmp_path, monkeypatch, capsys):
  run = tmp_path / "quickstart"
  # Cheapest meta-training that still runs the whole path (PES, export).
  assert cli.main(["meta-train", CONFIG, "--out", str(run), "--no-progress",
                   "--set", "task.families=[quadratic]", "--set", "estimator.num_tasks=2",
                   "--set", "truncation.horizon=8", "--set", "estimator.unroll_length=4",
                   "--set", "outer.num_steps=2"]) == 0
  assert (run / "final.lopt").is_file()
  assert len(read_metrics(str(run))) == 2
  # The suite at a few inner steps per task, and only its quadratic tasks: compiling
  # the MLP tasks' training loops takes minutes on a loaded 2-core machine (the slow
  # test below evaluates every task at full size).
  short = {n: dataclasses.replace(t, num_steps=3) for n, t in suites.SUITES[SUITE].items()
           if n.startswith("quadratic")}
  monkeypatch.setitem(suites.SUITES, SUITE, short)
  out = tmp_path / "eval"
  assert cli.main(["eval", "--optimizer", str(run / "final.lopt"), "--suite", SUITE,
                   "--seeds", "1", "--baselines", "adam", "--lr-grid", "0.001,0.01",
                   "--out", str(out), "--report", "--no-progress"]) == 0
  printed = capsys.readouterr().out
  assert "quickstart" in printed and "report.md" in printed
  assert len(_check_results(out, "quickstart")["tasks"]) == 2


@pytest.mark.slow
def test_quickstart_readme_command(tmp_path):
  """The README's main job: the meta-loss falls, and the result beats tuned Adam on most
  held-out tasks (what the README says it shows; measured: 5 of 5)."""
  run = tmp_path / "quickstart"
  assert cli.main(["meta-train", CONFIG, "--out", str(run), "--no-progress"]) == 0
  meta_loss = [r["meta_loss"] for r in read_metrics(str(run))]
  first, last = np.mean(meta_loss[:20]), np.mean(meta_loss[-50:])
  print(f"meta-loss: first 20 steps {first:.3f}, last 50 steps {last:.3f}")
  assert last < first, (first, last)
  out = run / "eval"
  assert cli.main(["eval", "--optimizer", str(run / "final.lopt"), "--optimizer", "hierarchical_hd",
                   "--suite", SUITE, "--seeds", "2", "--baselines", "adam,adamw_cosine",
                   "--out", str(out), "--report", "--no-progress"]) == 0
  results = _check_results(out, "quickstart")
  beats = [name for name, task in results["tasks"].items()
           if task["optimizers"]["quickstart"]["final_train_loss"]
           < task["optimizers"]["adam"]["final_train_loss"]]
  assert len(beats) >= 3, beats
