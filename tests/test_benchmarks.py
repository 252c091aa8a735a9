"""The benchmark scripts run end to end at small sizes, and their floors count right."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
import lopt_step  # noqa: E402


def test_transcendental_counts_walk_sub_jaxprs():
  @jax.jit
  def f(x):
    inner = jax.jit(lambda y: jnp.exp(y[:3]).sum())
    return jnp.tanh(x).sum() + inner(x) + jax.nn.sigmoid(x[:2]).sum() + jnp.sqrt(x * x + 1).sum()

  counts = lopt_step.transcendental_counts(f, jnp.ones((10,)))
  assert counts == {"tanh": 10, "exp": 3, "logistic": 2, "sqrt": 10}


def test_least_step_bytes_counts_params_grads_and_state():
  params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((5,), jnp.bfloat16)}
  state = (jnp.zeros((4, 5)), jnp.zeros((), jnp.int32))
  # params read + written and grads written + read: 4 x (80 + 10); state: 2 x (80 + 4).
  assert lopt_step.least_step_bytes(params, state) == 4 * 90 + 2 * 84


def _run(args, tmp_path):
  out = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_lopt_step_runs_and_reports_both_floors(tmp_path):
  stdout = _run([str(_BENCH / "lopt_step.py"), "--model", "mlp", "--rounds", "1", "--iters", "1",
                 "--optimizers", "hierarchical", "--json", "out.json"], tmp_path)
  result = json.loads((tmp_path / "out.json").read_text())
  rows = {r["optimizer"]: r for r in result["models"][0]["rows"]}
  assert set(rows) == {"adam", "hierarchical"} and "x roof" in stdout
  for r in rows.values():
    assert r["ms_per_step"] > 0 and r["floor_ms"] > 0
    # The roofline adds transcendentals to the FLOP floor (or is traffic-bound): never lower.
    assert r["roofline_ms"] >= r["floor_ms"]
  assert rows["adam"]["transcendentals_per_param"] >= 1.0   # Adam's sqrt of v


@pytest.mark.slow
def test_saferate_speed_benchmark_runs(tmp_path):
  stdout = _run([str(_BENCH / "saferate.py"), "--part", "speed", "--speed-tasks", "mlp_synthetic",
                 "--dtypes", "float32", "--repeats", "1", "--out", str(tmp_path)], tmp_path)
  ratio = float(stdout.split("SafeRate[Adam] / Adam = ")[1].split("x")[0])
  assert 1.0 < ratio < 20.0


_TINY_NORMALIZED = """
name: tiny_normalized
seed: 0
task: {families: [mlp_synthetic8x8]}
lopt:
  name: normalized_mlp
  options: {hidden_sizes: [4, 4], meta_train_lr: 0.003, meta_train_lr_max: 0.03,
            meta_train_harness: true, harness_consistent_rms: 0.2}
truncation: {kind: log_uniform, min_length: 8, max_length: 16}
estimator: {kind: pes, num_tasks: 2, unroll_length: 4, sigma: 0.05}
outer: {optimizer: adam, learning_rate: 0.001, num_steps: 1}
"""


@pytest.mark.slow
def test_estimator_snr_and_meta_validation_run(tmp_path):
  (tmp_path / "tiny.yaml").write_text(_TINY_NORMALIZED)
  stdout = _run([str(_BENCH / "estimator_snr.py"), "tiny.yaml", "--set", "estimator.sigma=0.1",
                 "--replicas", "2", "--burn-in", "1", "--keep", "2"], tmp_path)
  row = stdout.strip().splitlines()[-1].split()
  assert row[0] == "estimator.sigma=0.1" and -1.0 <= float(row[2]) <= 1.0
  _run([str(_BENCH / "meta_validation.py"), "tiny.yaml", "--steps", "30", "--seeds", "1",
        "--tasks-per-family", "1", "--lrs", "0.003", "0.03", "--baselines", "adamw_cosine",
        "--variant", "lopt.options.init_rule=momentum",
        "--variant", "lopt.options.meta_train_harness=false", "--json", "val.json"], tmp_path)
  results = json.loads((tmp_path / "val.json").read_text())["results"]
  assert set(results) == {"initialization", "adamw_cosine", "lopt.options.init_rule=momentum",
                          "lopt.options.meta_train_harness=false"}
  for r in results.values():  # both train the task: the loss falls
    assert 0.0 < r["tuned"] < 1.0 and len(r["per_lr"]) == 2


def test_eval_cost_projects_runs_times_budget():
  import eval_cost  # noqa: E402  (benchmarks/ is on the path)
  from learned_opt.meta_train.eval import candidates
  assert eval_cost.runs(candidates.resolve("adam"), seeds=3, tune_seeds=1) == 7 + 2
  assert eval_cost.runs(candidates.resolve("adam"), seeds=3, tune_seeds=3) == 21
  assert eval_cost.runs(candidates.resolve("prodigy"), seeds=3, tune_seeds=1) == 3


@pytest.mark.slow
def test_eval_cost_runs(tmp_path):
  import learned_opt as lo
  lopt = lo.NormalizedMLP(hidden_sizes=(4, 4), meta_train_lr=3e-3, meta_train_harness=True)
  lo.save(tmp_path / "n.lopt", lopt, lopt.init_meta_params(jax.random.key(0)))
  stdout = _run([str(_BENCH / "eval_cost.py"), "--suite", "heldout_offline", "--tasks",
                 "mlp_wide_synthetic,quadratic_wide_noisy", "--optimizer", "n.lopt", "--steps", "2"],
                tmp_path)
  lines = [l.split() for l in stdout.splitlines() if l.startswith(("mlp_wide", "quadratic_wide"))]
  assert [(l[0], l[1]) for l in lines] == [
      ("mlp_wide_synthetic", "adam"), ("mlp_wide_synthetic", "n"),
      ("quadratic_wide_noisy", "adam"), ("quadratic_wide_noisy", "n")]
  assert all(float(l[2]) > 0 and int(l[4]) == 9 for l in lines)
  assert "suite heldout_offline: n projected" in stdout
