"""`lopt eval` / `lopt report`: metrics, the vmapped grid loop, suites, reports, CLI errors."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import meta_train
import learned_opt as lo
from learned_opt import baselines, tasks
from learned_opt.meta_train import cli
from learned_opt.meta_train.eval import metrics as M
from learned_opt.meta_train.eval import candidates as eval_optimizers
from learned_opt.tasks import suites as eval_suites
from learned_opt.meta_train.eval import evaluation
from learned_opt.meta_train.eval import report
from learned_opt.tasks.suites import SuiteTask


def _quad_suite(steps=30, full_batch=True):
  return {"quad": SuiteTask("quad", lambda d: tasks.QuadraticFamily(dim=4), steps, "offline",
                            "4-d quadratic", full_batch=full_batch)}


# ---- metrics (numpy only) ---------------------------------------------------------------
def test_speedup_counts_steps_to_reference_final_loss():
  t = np.arange(100, dtype=float)
  curves = {"adam": 100.0 - t, "fast": 100.0 - 2 * t, "slow": 100.0 - 0.5 * t}
  curves = {k: (list(range(100)), list(v)) for k, v in curves.items()}
  s = M.speedups(curves, reference="adam", num_steps=100, full_batch=True)
  assert s["adam"]["steps_to_target"] == 100 and s["adam"]["speedup"] == 1.0
  assert s["fast"]["steps_to_target"] == 51  # 100 - 2t <= 1 first at t = 50
  assert s["fast"]["speedup"] == pytest.approx(100 / 51)
  assert s["slow"]["speedup"] is None and s["slow"]["speedup_bound"] == 1.0


def test_stored_results_are_judged_by_the_current_divergence_criterion():
  stored = {"diverged": True, "curves_per_seed": [[2.359, 1.2, 0.6], [2.311, 2.309, 2.304]],
            "final_train_loss_per_seed": [0.58, 2.313]}
  assert not M.result_diverged(stored)
  assert M.result_diverged({**stored, "final_train_loss_per_seed": [0.58, None]})
  assert M.result_diverged({**stored, "curves_per_seed": [[2.359, None, 0.6], [2.311, 2.3, 2.3]]})
  assert M.result_diverged({**stored, "final_train_loss_per_seed": [0.58, 2.5]})
  assert M.result_diverged({"diverged": True})  # older results without per-seed data
  task = {"optimizers": {"adamw_cosine": {"final_train_loss": 0.5, "diverged": False,
                                          "speedup_bound": 1.0},
                         "saferate": {**stored, "final_train_loss": 1.14, "speedup_bound": 0.9}}}
  assert M.summarize({"t": task}, reference="adamw_cosine")["saferate"]["diverged_tasks"] == []


def test_divergence_and_monotonicity():
  ok = np.array([[3.0, 2.0, 1.0]])
  assert not M.diverged(ok, np.array([1.0]))
  assert M.diverged(ok, np.array([3.5]))                       # above the initial loss
  assert M.diverged(np.array([[3.0, np.nan, 1.0]]), np.array([1.0]))
  # A run stalled at its initialization (conv_mnist under SafeRate, one seed: 2.311 on the
  # first minibatch, 2.313 on the evaluation batches at the end) did not diverge.
  stalled = np.array([[2.311, 2.309, 2.304]])
  assert not M.diverged(stalled, np.array([2.313]))
  assert M.diverged(stalled, np.array([2.311 * 1.03]))
  assert M.max_relative_increase(ok) == 0.0
  assert M.max_relative_increase(np.array([[2.0, 1.0, 1.5]])) == pytest.approx(0.5)
  assert M.max_relative_increase(np.array([[2.0, np.inf]])) == math.inf
  # Float32 rounding of a converged loss (initial 2.3) is not an increase; 1% is.
  assert M.is_monotone(np.array([[2.3, 1.0, 0.0056, 0.0056 + 5.6e-8]]))
  assert not M.is_monotone(np.array([[2.3, 1.0, 0.0056, 0.0057]]))
  assert not M.is_monotone(np.array([[2.3, np.nan]]))


def test_summary_fraction_median_and_worst_case():
  def task(adam, lopt, speed, div=False):
    return {"optimizers": {"adam": {"final_train_loss": adam, "diverged": False, "speedup_bound": 1.0},
                           "l": {"final_train_loss": lopt, "diverged": div, "speedup_bound": speed}}}
  s = M.summarize({"a": task(1.0, 0.5, 2.0), "b": task(1.0, 3.0, 0.5, True), "c": task(2.0, 1.0, 4.0)})
  assert s["l"]["frac_beats_reference"] == pytest.approx(2 / 3)
  assert s["l"]["median_speedup"] == 2.0
  assert s["l"]["worst_loss_ratio"] == 3.0 and s["l"]["worst_task"] == "b"
  assert s["l"]["diverged_tasks"] == ["b"]
  assert M.jsonable({"x": np.float32(np.nan), "y": np.arange(2)}) == {"x": None, "y": [0, 1]}


# ---- the grid loop --------------------------------------------------------------------
def test_run_grid_matches_tasks_train_and_does_not_recompile():
  task = tasks.QuadraticFamily(dim=4).task()
  keys = evaluation.seed_keys(2)
  lrs = jnp.asarray([0.01, 0.1])
  cand = eval_optimizers.resolve("adam")
  run = lambda: evaluation.run_grid(task, lrs, keys, None, make=cand.make, num_steps=20,
                                    full_batch=False)
  losses, final_train, final_test = run()
  assert losses.shape == (2, 2, 20) and final_train.shape == (2, 2) and final_test.shape == (2, 2)
  # Same key, same lr -> the same batches and losses as the project's train loop.
  ref = meta_train.train(task, optax.adam(0.1), num_steps=20, key=keys[1])
  np.testing.assert_allclose(losses[1, 1], ref.losses, rtol=1e-5)
  assert float(final_train[1, 1]) < float(losses[1, 1, 0])  # it trained
  traces = evaluation.TRACE_COUNT[0]
  run()
  evaluation.run_grid(task, lrs * 0.5, keys, None, make=cand.make, num_steps=20, full_batch=False)
  assert evaluation.TRACE_COUNT[0] == traces  # new learning rates: no recompilation


def test_prodigy_baseline_is_optax_prodigy_without_a_grid():
  task = tasks.QuadraticFamily(dim=4).task()
  keys = evaluation.seed_keys(1)
  cand = eval_optimizers.resolve("prodigy")
  assert cand.grid == () and cand.kind == "hyperparameter-free" and "prodigy" in eval_optimizers.BASELINES
  losses, final_train, _ = evaluation.run_grid(task, jnp.zeros((1,)), keys, None, make=cand.make,
                                               num_steps=40, full_batch=True)
  ref = meta_train.train(task, optax.contrib.prodigy(1.0), num_steps=40, key=keys[0], full_batch=True)
  np.testing.assert_allclose(losses[0, 0], ref.losses, rtol=1e-5)
  assert float(final_train[0, 0]) < 0.5 * float(losses[0, 0, 0])  # it trained, with no lr given


def test_adam_hd_baseline_is_hypergradient_adam_without_a_grid():
  task = tasks.QuadraticFamily(dim=4).task()
  keys = evaluation.seed_keys(1)
  cand = eval_optimizers.resolve("adam_hd")
  assert cand.grid == () and cand.kind == "hyperparameter-free" and "adam_hd" in eval_optimizers.BASELINES
  losses, _, _ = evaluation.run_grid(task, jnp.zeros((1,)), keys, None, make=cand.make,
                                     num_steps=40, full_batch=True)
  ref = meta_train.train(task, baselines.adam_hd(3e-3), num_steps=40, key=keys[0], full_batch=True)
  np.testing.assert_allclose(losses[0, 0], ref.losses, rtol=1e-5)
  plain = meta_train.train(task, optax.adam(3e-3), num_steps=40, key=keys[0], full_batch=True)
  assert float(losses[0, 0, -1]) < float(plain.losses[-1])   # its rate grew past 3e-3


def test_evaluate_suite_writes_results_and_resumes(tmp_path):
  lopt = lo.PerParamMLP(hidden_sizes=(4,))
  path = str(tmp_path / "rand.lopt")
  lo.save(path, lopt, lopt.init_meta_params(jax.random.key(0)))
  out = str(tmp_path / "run")
  run = lambda names: evaluation.evaluate_suite(_quad_suite(), names, out_dir=out, seeds=2,
                                                lr_grid=(1e-3, 1e-2, 1e-1), progress=False)
  first = run(["adam"])
  traces = evaluation.TRACE_COUNT[0]
  res = run(["adam", path])  # adds the learned optimizer: only it runs
  assert evaluation.TRACE_COUNT[0] == traces + 1
  assert res["tasks"]["quad"]["optimizers"]["adam"] == first["tasks"]["quad"]["optimizers"]["adam"]
  adam = res["tasks"]["quad"]["optimizers"]["adam"]
  assert adam["lr"] == 0.1 and len(adam["grid"]["final_train_loss"]) == 3
  # The best learning rate is the argmin of the recorded grid.
  assert adam["final_train_loss"] == pytest.approx(min(adam["grid"]["final_train_loss"]))
  assert adam["speedup"] == 1.0 and not adam["diverged"]
  rand = res["tasks"]["quad"]["optimizers"]["rand"]
  assert rand["kind"] == "learned" and rand["final_train_loss"] > adam["final_train_loss"]
  assert rand["speedup"] is None and rand["speedup_bound"] <= 1.0  # never reaches Adam's loss
  assert set(res["summary"]) == {"adam", "rand"}
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["tasks"]["quad"]["optimizers"]["adam"]["lr"] == 0.1
  traces = evaluation.TRACE_COUNT[0]
  again = run(["adam", path])
  assert evaluation.TRACE_COUNT[0] == traces  # resumed: nothing re-run
  assert again["tasks"] == res["tasks"]
  md = report.write_report(out)
  text = open(md).read()
  assert "| rand |" in text and "quad" in text and "![loss curves](curves.png)" in text
  assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_report_sums_each_optimizers_wall_time_and_counts_cached_entries():
  r = lambda wall, cached=False: {"wall_s": wall, "cached": cached}
  results = {"tasks": {"a": {"optimizers": {"adam": r(60.0, True), "mine": r(30.0)}},
                       "b": {"optimizers": {"adam": r(120.0), "mine": r(90.0)}}}}
  compute = report.compute_minutes(results)
  assert compute == {"adam": {"minutes": 3.0, "tasks": 2, "cached": 1},
                     "mine": {"minutes": 2.0, "tasks": 2, "cached": 0}}
  text = "\n".join(report._compute_section(results, ["adam", "mine"]))
  assert "The baselines together: 3 min" in text and "| mine | 2 | 2.0 | 0 |" in text


# ---- suites and stress tasks -----------------------------------------------------------
def test_rescaled_family_same_loss_at_rescaled_params():
  base = tasks.QuadraticFamily(dim=4)
  fam = eval_suites.rescaled_params_family(base, 1e-3)
  cfg, key = base.default_cfg(), jax.random.key(1)
  p = base.init_params(cfg, key)
  q = fam.init_params(fam.default_cfg(), key)
  np.testing.assert_allclose(q["x"], 1e-3 * p["x"], rtol=1e-6)
  batch = base.full_batch(cfg)
  np.testing.assert_allclose(fam.loss(fam.default_cfg(), q, key, batch), base.loss(cfg, p, key, batch),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="scale must be a positive number, got -1"):
    eval_suites.rescaled_params_family(base, -1.0)


def test_suites_are_disjoint_from_meta_training_and_short_suite_is_short():
  assert len(eval_suites.HELDOUT_SUITE) >= 8
  assert not set(eval_suites.HELDOUT_SUITE) & set(tasks.META_TRAIN_FAMILIES)
  short = eval_suites.get_suite("heldout_short")
  assert set(short) <= set(eval_suites.HELDOUT_SUITE)
  assert all(t.num_steps <= eval_suites.HELDOUT_SUITE[n].num_steps for n, t in short.items())
  both = eval_suites.get_suite("heldout_short+safeguard")
  assert len(both) == len(short) + len(eval_suites.SAFEGUARD_SUITE)
  assert all(t.full_batch for t in eval_suites.SAFEGUARD_SUITE.values())


# ---- clear errors ------------------------------------------------------------------------
def test_bad_names_fail_clearly(capsys):
  with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
    eval_optimizers.resolve("nope")
  with pytest.raises(ValueError, match="at least 2 positive learning rates, got \\(0.1,\\)"):
    eval_optimizers.resolve("adam", lr_grid=(0.1,))
  with pytest.raises(ValueError, match="does not exist"):
    eval_optimizers.resolve("/no/such/file.lopt")
  assert cli.main(["eval", "--suite", "nope", "--no-progress", "--baselines", "adam"]) == 2
  assert "unknown suite 'nope'; known suites: heldout, heldout_short" in capsys.readouterr().err
  assert cli.main(["report", "/no/such/run"]) == 2
  assert "holds no results.json" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown task 'zzz' in suite"):
    evaluation.evaluate_suite(_quad_suite(), ["adam"], out_dir="/tmp/unused", tasks=["zzz"],
                              progress=False)


def test_baselines_only_fills_the_cache_without_learned_optimizers(tmp_path, capsys):
  cache, out = tmp_path / "cache", tmp_path / "run"
  args = ["eval", "--baselines-only", "--suite", "heldout_offline", "--tasks",
          "quadratic_illcond_long", "--seeds", "1", "--baselines", "adam,adamw_cosine",
          "--cache", str(cache), "--no-progress"]
  assert cli.main(args + ["--out", str(out)]) == 0
  with open(out / evaluation.RESULTS_FILE) as f:
    ran = json.load(f)["tasks"]["quadratic_illcond_long"]["optimizers"]
  assert set(ran) == {"adam", "adamw_cosine"}  # no shipped optimizer, though none was named
  assert sorted(p.name for p in (cache / "quadratic_illcond_long").iterdir()) == [
      "adam.json", "adamw_cosine.json"]
  assert cli.main(args + ["--out", str(tmp_path / "again")]) == 0
  with open(tmp_path / "again" / evaluation.RESULTS_FILE) as f:
    again = json.load(f)["tasks"]["quadratic_illcond_long"]["optimizers"]
  assert all(r["cached"] for r in again.values())
  capsys.readouterr()
  assert cli.main(args + ["--out", str(out), "--optimizer", "hierarchical_hd"]) == 2
  assert "--baselines-only evaluates no learned optimizer" in capsys.readouterr().err


def test_ship_writes_provenance_header(tmp_path):
  from learned_opt.meta_train.run import ship
  run = tmp_path / "run"
  run.mkdir()
  lopt = lo.PerParamMLP(hidden_sizes=(4,))
  lo.save(str(run / "final.lopt"), lopt, lopt.init_meta_params(jax.random.key(0)), {"run": "x"})
  (run / "config.yaml").write_text("name: x\nseed: 0\n")
  with open(run / "metrics.jsonl", "w") as f:
    for step in range(1, 21):
      f.write(json.dumps({"step": step, "meta_loss": 1.0 / step, "wall_s": 0.5}) + "\n")
  results = {"suite": "s", "seeds": 1, "reference": "adam", "summary": {"mine": {"num_tasks": 1}},
             "tasks": {"t": {"optimizers": {"adam": {"final_train_loss": 2.0},
                                            "mine": {"final_train_loss": 1.0, "diverged": False,
                                                     "speedup_bound": 2.0}}}}}
  dest = ship.ship(str(run), str(tmp_path / "mine.lopt"), wall_time_s=12.0, results=results)
  info = lo.read_header(dest)["info"]
  assert info["config"] == {"name": "x", "seed": 0} and info["run"] == "x"
  mt = info["meta_training"]
  assert mt["outer_steps"] == 20 and mt["wall_time_s"] == 12.0 and mt["step_wall_s"] == 10.0
  assert mt["meta_loss_first"] > mt["meta_loss_last"] == pytest.approx(np.mean(1 / np.arange(17, 21)))
  assert info["heldout"]["tasks"]["t"]["loss_ratio_vs_tuned_adam"] == 0.5
  assert info["code_version"].startswith(lo.__version__)
  lopt2, _, _ = lo.load(dest)  # still a valid checkpoint
  assert lopt2 == lopt


def _backtracking_safeguard(direction):
  """Stand-in for SafeRate in the plumbing test: the largest of 1, 1/2, ..., 2^-20 times
  the direction that does not increase value_fn (else no step)."""
  direction = optax.with_extra_args_support(direction)

  def update(g, state, params, *, value_fn, **extra):
    u, state = direction.update(g, state, params, value_fn=value_fn, **extra)
    scales = 2.0 ** -jnp.arange(21.0)
    step = lambda a: optax.apply_updates(params, jax.tree.map(lambda x: a * x, u))
    ok = jax.vmap(lambda a: value_fn(step(a)))(scales) <= value_fn(params)
    a = jnp.where(ok.any(), scales[jnp.argmax(ok)], 0.0)
    return jax.tree.map(lambda x: a * x, u), state
  return optax.GradientTransformationExtraArgs(direction.init, update)


def test_safeguarded_candidates_are_monotone_on_full_batch(tmp_path, monkeypatch):
  monkeypatch.setattr(eval_optimizers, "safeguard", _backtracking_safeguard)
  lopt = lo.PerParamMLP(hidden_sizes=(4,), step_mult=1.0)  # huge steps: the plain one blows up
  path = str(tmp_path / "big.lopt")
  lo.save(path, lopt, lopt.init_meta_params(jax.random.key(0)))
  suite = {"q": SuiteTask("q", lambda d: eval_suites.rescaled_params_family(
      tasks.QuadraticFamily(dim=4), 1e-2), 40, "offline", "rescaled quadratic", full_batch=True)}
  res = evaluation.evaluate_suite(suite, ["adam", path, "saferate+" + path, "saferate"],
                                  out_dir=str(tmp_path / "run"), seeds=2, lr_grid=(1e-3, 1e-2),
                                  progress=False)
  opts = res["tasks"]["q"]["optimizers"]
  assert not opts["big"]["monotone"]
  for name in ("saferate+big", "saferate"):
    assert opts[name]["monotone"] and opts[name]["max_relative_increase"] <= M.MONOTONE_RTOL
    assert not opts[name]["diverged"]
  # With a descent direction (Adam's), the safeguarded run makes progress.
  assert opts["saferate"]["final_train_loss"] < 0.9 * opts["saferate"]["initial_loss"]


_ORPHAN_PARENT = r"""
import concurrent.futures, multiprocessing, os, sys, time
from learned_opt.meta_train.eval import evaluation

if __name__ == "__main__":
  pool = concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn"),
      initializer=evaluation.exit_with_parent, initargs=(os.getpid(),))
  with open(sys.argv[1], "w") as f:
    f.write(str(pool.submit(os.getpid).result()))
  pool.submit(time.sleep, 600)  # a long task, as one suite task is
  time.sleep(1.0)
  os._exit(0)  # the parent dies without shutting its pool down (as under SIGKILL)
"""


def test_eval_workers_exit_when_the_eval_process_is_killed(tmp_path):
  import os
  import subprocess
  import sys
  import time
  script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
  script.write_text(_ORPHAN_PARENT)
  subprocess.run([sys.executable, str(script), str(pid_file)], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=300, check=True)
  worker = int(pid_file.read_text())

  def alive():
    try:
      with open(f"/proc/{worker}/stat") as f:  # a zombie has exited, only not been reaped
        return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
      return False

  deadline = time.monotonic() + 120  # a liveness wait (the watch polls each second), not a speed bound
  while alive() and time.monotonic() < deadline:
    time.sleep(0.2)
  still = alive()
  if still:
    os.kill(worker, 9)
  assert not still, f"pool worker {worker} outlived its killed parent"


@pytest.mark.slow
def test_worker_processes_write_each_task_in_suite_order_and_log_each_optimizer(tmp_path, capfd):
  out = str(tmp_path / "run")
  res = evaluation.evaluate_suite("heldout_offline", ["prodigy", "adam_hd"], out_dir=out, seeds=1,
                                  tasks=["mlp_rgb32_synthetic", "mlp_wide_synthetic"], workers=2,
                                  progress=False)
  assert list(res["tasks"]) == ["mlp_wide_synthetic", "mlp_rgb32_synthetic"]  # the suite's order
  assert list(evaluation.load_results(out)["tasks"]) == list(res["tasks"])
  for t in res["tasks"].values():
    assert set(t["optimizers"]) == {"prodigy", "adam_hd"} and "task" not in t
    assert t["optimizers"]["adam_hd"]["final_train_loss"] < t["optimizers"]["adam_hd"]["initial_loss"]
  err = capfd.readouterr().err
  for task in res["tasks"]:
    for name in ("prodigy", "adam_hd"):
      assert f"eval {task}: {name} done (" in err, err


def test_parallel_work_units_are_task_optimizer_pairs_in_suite_order():
  # One unit per (task, optimizer): a worker is never idle behind another's last task.
  todo = {"transformer": ["adam", "muon"], "mlp": ["adam"]}
  assert evaluation.work_units(todo) == [("transformer", "adam"), ("transformer", "muon"),
                                         ("mlp", "adam")]
  assert evaluation.work_units({}) == []
