"""Scheduled baselines, the tuning protocol, the baseline cache and the summary
statistics of `lopt eval`."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import baselines, meta_train, tasks
from learned_opt.baselines import scheduled
from learned_opt.meta_train.eval import cache as cache_lib
from learned_opt.meta_train.eval import candidates, evaluation
from learned_opt.meta_train.eval import metrics as M
from learned_opt.tasks.suites import SuiteTask


def _params():
  k = jax.random.key(0)
  return {"dense": {"kernel": jax.random.normal(k, (6, 4)), "bias": jnp.ones((4,))},
          "head": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (4, 3))}}


def _grads(params):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)


def _steps(opt, n=3):
  params, state, out = _params(), None, []
  state = opt.init(params)
  for _ in range(n):
    u, state = opt.update(_grads(params), state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out


@pytest.mark.parametrize("name, reference", [
    ("adamw_cosine", lambda lr, T: optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, 5, T, 0.0), weight_decay=1e-4,
        mask=baselines.decay_mask)),
    ("muon_cosine", lambda lr, T: baselines.muon(
        optax.warmup_cosine_decay_schedule(0.0, lr, 5, T, 0.0))),
    ("schedule_free_adamw", lambda lr, T: optax.contrib.schedule_free_adamw(
        lr, warmup_steps=5, weight_decay=1e-4)),
])
def test_each_new_baseline_equals_the_optax_call_it_wraps(name, reference):
  lr, T = 0.05, 100
  cand = candidates.resolve(name)
  assert cand.kind == "tuned" and cand.grid == candidates.DEFAULT_LR_GRID
  ours, theirs = _steps(cand.make(lr, None, T)), _steps(reference(lr, T))
  for a, b in zip(ours, theirs):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  assert not np.allclose(ours[-1]["dense"]["kernel"], _params()["dense"]["kernel"])  # it moved


@pytest.mark.parametrize("name", ["adamw_cosine", "muon_cosine", "schedule_free_adamw"])
def test_new_baselines_run_their_grid_vmapped(name):
  # The peak rate is traced inside `run_grid`: one compilation for the whole grid.
  task = tasks.QuadraticFamily(dim=4).task()
  cand = candidates.resolve(name, lr_grid=(1e-2, 1e-1))
  losses, final, _ = evaluation.run_grid(task, jnp.asarray(cand.grid), evaluation.seed_keys(1),
                                         None, make=cand.make, num_steps=20, full_batch=False,
                                         eval_params=cand.eval_params)
  assert losses.shape == (2, 1, 20) and np.all(np.isfinite(final))
  assert float(final[1, 0]) < float(losses[1, 0, 0])  # the larger rate trained in 20 steps


def test_warmup_cosine_schedule_is_the_one_stated():
  peak, T = 0.3, 1000
  sched = scheduled.warmup_cosine(peak, T)
  assert scheduled.warmup_steps(T) == 50
  assert float(sched(0)) == 0.0                          # warmup starts from 0
  assert float(sched(25)) == pytest.approx(peak / 2)     # linear
  assert float(sched(50)) == pytest.approx(peak)         # peak at 5% of the budget
  # Cosine from the peak at 5% to 0 at 100%: at 50% it is half way through the decay.
  frac = (500 - 50) / (1000 - 50)
  assert float(sched(500)) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * frac)), rel=1e-6)
  assert float(sched(1000)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="num_steps must be a positive int"):
    scheduled.warmup_cosine(peak, 0)


def test_schedule_free_is_evaluated_at_its_averaged_iterate():
  task = tasks.QuadraticFamily(dim=4, noise_range=(0.0, 0.0)).task()
  keys = evaluation.seed_keys(1)
  cand = candidates.resolve("schedule_free_adamw")
  _, with_eval, _ = evaluation.run_grid(task, jnp.asarray([0.1]), keys, None, make=cand.make,
                                        num_steps=30, full_batch=True, eval_params=cand.eval_params)
  _, at_y, _ = evaluation.run_grid(task, jnp.asarray([0.1]), keys, None, make=cand.make,
                                   num_steps=30, full_batch=True)
  # By hand: train, then measure the loss at schedule_free_eval_params(state, params).
  opt = optax.contrib.schedule_free_adamw(0.1, warmup_steps=2, weight_decay=1e-4)
  k_init, k_data = jax.random.split(keys[0])
  params, state, _ = meta_train.inner.loop.scan_steps_with_state(
      task, opt, task.init(k_init), jax.random.split(k_data, 30), full_batch=True)
  x = optax.contrib.schedule_free_eval_params(state, params)
  expected = task.loss(x, keys[0], task.full_batch("train"))
  np.testing.assert_allclose(float(with_eval[0, 0]), float(expected), rtol=1e-5)
  assert float(with_eval[0, 0]) != float(at_y[0, 0])


@pytest.mark.slow
def test_tune_seeds_picks_on_the_first_seeds_and_runs_the_choice_on_the_rest():
  task = tasks.QuadraticFamily(dim=4).task()
  keys = evaluation.seed_keys(3)
  cand = candidates.resolve("adam", lr_grid=(1e-3, 1e-2, 1e-1))
  res = evaluation.evaluate_candidate(task, cand, keys, num_steps=20, full_batch=False,
                                      tune_seeds=1)
  assert res["grid"]["tuning_seeds"] == 1 and len(res["final_train_loss_per_seed"]) == 3
  full = evaluation.evaluate_candidate(task, cand, keys, num_steps=20, full_batch=False)
  assert full["grid"]["tuning_seeds"] == 3
  lr = res["lr"]
  for i in range(3):  # every seed is the plain run at the chosen rate
    ref = meta_train.train(task, optax.adam(lr), num_steps=20, key=keys[i])
    np.testing.assert_allclose(res["curves_per_seed"][i], np.asarray(ref.losses), rtol=1e-5)


def _suite(steps=15, dim=4, name="quad"):
  return SuiteTask(name, lambda d: tasks.QuadraticFamily(dim=dim), steps, "offline", "q")


@pytest.mark.slow
def test_cache_is_keyed_by_definitions_grid_and_seeds(tmp_path):
  store = cache_lib.ResultCache(str(tmp_path))
  cands = [candidates.resolve("adam", lr_grid=(1e-2, 1e-1)), candidates.resolve("prodigy")]
  run = lambda st, cs, **kw: evaluation.evaluate_task(st, cs, seeds=kw.get("seeds", 2),
                                                      result_cache=store)
  first = run(_suite(), cands)
  assert not any(r.get("cached") for r in first["optimizers"].values())
  traces = evaluation.TRACE_COUNT[0]
  again = run(_suite(), cands)  # same definitions: nothing runs
  assert evaluation.TRACE_COUNT[0] == traces
  assert all(r["cached"] for r in again["optimizers"].values())
  assert again["optimizers"]["adam"]["final_train_loss"] == first["optimizers"]["adam"]["final_train_loss"]
  # An unrelated change (another task's definition, another baseline) leaves it valid.
  run(_suite(dim=8, name="other"), cands[:1])
  assert run(_suite(), cands)["optimizers"]["adam"]["cached"]
  misses = {
      "task definition": (_suite(dim=5), cands),
      "step budget": (_suite(steps=16), cands),
      "grid": (_suite(), [candidates.resolve("adam", lr_grid=(1e-2, 3e-1)), cands[1]]),
  }
  for what, (st, cs) in misses.items():
    assert not run(st, cs)["optimizers"]["adam"].get("cached"), what
  assert not run(_suite(), cands, seeds=3)["optimizers"]["adam"].get("cached"), "seeds"
  # The baseline's definition: its table fingerprint or its factory's source.
  changed = cands[0]._replace(fingerprint="adam:v2")
  assert not run(_suite(), [changed])["optimizers"]["adam"].get("cached"), "baseline"
  keyed = evaluation.cache_keyed_on("t", cands[0], seeds=2, first_seed=0, curve_points=200,
                                    tune_seeds=None)
  other = evaluation.cache_keyed_on("t", cands[0]._replace(make=candidates._muon), seeds=2,
                                    first_seed=0, curve_points=200, tune_seeds=None)
  assert store.key(keyed) != store.key(other)


def test_learned_optimizers_are_not_cached(tmp_path):
  import learned_opt as lo
  lopt = lo.PerParamMLP(hidden_sizes=(4,))
  path = str(tmp_path / "r.lopt")
  lo.save(path, lopt, lopt.init_meta_params(jax.random.key(0)))
  store = cache_lib.ResultCache(str(tmp_path / "cache"))
  evaluation.evaluate_task(_suite(), [candidates.resolve(path)], seeds=1, result_cache=store)
  assert not (tmp_path / "cache").exists()


def test_iqm_and_bootstrap_on_a_hand_computed_example():
  # 8 values, sorted -50 0 1 2 3 4 5 100: the middle half is the 3rd..6th: (1+2+3+4) / 4.
  assert M.iqm([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, -50.0]) == pytest.approx(2.5)
  assert M.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)   # 3 values: nothing cut
  # One task whose seeds all agree: every resample gives that value.
  assert M.bootstrap_iqm([[2.0, 2.0, 2.0]]) == (2.0, 2.0)
  # Two tasks, constant within: resamples are mixes of 1 and 3, so the interval lies in
  # [1, 3], is reproducible, and covers the IQM of all values (2).
  lo, hi = M.bootstrap_iqm([[1.0, 1.0], [3.0, 3.0]], resamples=500)
  assert 1.0 <= lo < 2.0 < hi <= 3.0
  assert M.bootstrap_iqm([[1.0, 1.0], [3.0, 3.0]], resamples=500) == (lo, hi)


def test_summary_reports_iqm_beats_each_baseline_and_worst_ratios():
  def opt(kind, loss, test, seeds):
    return {"kind": kind, "final_train_loss": loss, "test_loss": test, "diverged": False,
            "speedup_bound": float(np.mean(seeds)), "speedup_per_seed": seeds}
  tasks_ = {
      "a": {"optimizers": {"adamw_cosine": opt("tuned", 1.0, 2.0, [1, 1]),
                           "muon_cosine": opt("tuned", 0.5, 1.0, [2, 2]),
                           "new": opt("learned", 0.8, 3.0, [1.5, 2.5])}},
      "b": {"optimizers": {"adamw_cosine": opt("tuned", 1.0, 1.0, [1, 1]),
                           "muon_cosine": opt("tuned", 2.0, 1.0, [0.5, 0.5]),
                           "new": opt("learned", 1.5, 1.2, [0.5, 1.0])}},
  }
  s = M.summarize(tasks_, reference="adamw_cosine")["new"]
  assert s["frac_beats_reference"] == 0.5
  assert s["frac_beats"] == {"adamw_cosine": 0.5, "muon_cosine": 0.5}
  assert s["worst_loss_ratio"] == pytest.approx(1.5) and s["worst_task"] == "b"
  assert s["worst_test_loss_ratio"] == pytest.approx(1.5) and s["worst_test_task"] == "a"
  assert s["iqm_speedup"] == pytest.approx(M.iqm([1.5, 2.5, 0.5, 1.0]))  # = 1.25
  lo, hi = s["iqm_speedup_ci95"]
  assert lo <= s["iqm_speedup"] <= hi


def test_scale_suite_tasks_are_100x_the_meta_training_tasks_at_realistic_budgets(monkeypatch):
  from learned_opt.tasks import datasets, suites
  # Parameter counts do not depend on the data's values: build on generated stand-ins of
  # the same shapes (the builders look the data up when called).
  monkeypatch.setattr(suites, "_img", lambda name: lambda d: datasets.synthetic_images(
      image_shape=(28, 28, 1)))
  monkeypatch.setattr(suites, "_txt", lambda name: lambda d: datasets.synthetic_text(vocab_size=65))
  scale = suites.get_suite("heldout_scale")
  assert len(scale) >= 3
  for name, st in scale.items():
    task = st.build(None).task()
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(task.init, jax.random.key(0))))
    assert n >= 100 * suites.SCALE_REFERENCE_PARAMS, (name, n)
  lm = scale["transformer_scale_tiny_shakespeare"]
  assert lm.num_steps >= 2000 and lm.build(None).seq_len >= 128


def test_cache_key_follows_the_source_of_the_modules_a_baseline_names(tmp_path, monkeypatch):
  import importlib
  import sys
  mod_path = tmp_path / "lopt_fake_rule.py"
  mod_path.write_text("def rule():\n  return 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fake = importlib.import_module("lopt_fake_rule")
  cand = candidates.resolve("adam")._replace(sources=(fake,))
  before = cache_lib.candidate_fingerprint(cand)
  assert cache_lib.candidate_fingerprint(cand) == before
  assert cache_lib.candidate_fingerprint(candidates.resolve("adam")) != before
  mod_path.write_text("def rule():\n  return 2\n")  # the baseline's code changed
  fake = importlib.reload(fake)
  assert cache_lib.candidate_fingerprint(cand._replace(sources=(fake,))) != before
  sys.modules.pop("lopt_fake_rule", None)
  saferate = candidates.resolve("saferate")
  assert {m.__name__ for m in saferate.sources} >= {"learned_opt.baselines.saferate",
                                                    "learned_opt.bounds.rules"}


def test_cache_key_names_the_code_that_was_loaded_when_the_file_changes_later(
    tmp_path, monkeypatch):
  # A long evaluation outlives edits: inspect.getsource would read the edited file with
  # the loaded code's line numbers (shifted text), keying results by code that never ran.
  import importlib
  import sys
  mod_path = tmp_path / "lopt_fake_make.py"
  mod_path.write_text("import optax\n\ndef make(lr, aux, num_steps):\n  return optax.adam(lr)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fake = importlib.import_module("lopt_fake_make")
  cache_lib.snapshot_sources([fake.make, fake])
  cand = candidates.resolve("adam")._replace(make=fake.make, sources=(fake,))
  before = cache_lib.candidate_fingerprint(cand)
  # Two lines added above the function, as a docstring edit would, without reloading.
  mod_path.write_text("# one\n# two\nimport optax\n\ndef make(lr, aux, num_steps):\n"
                      "  return optax.adam(lr)\n")
  assert cache_lib.candidate_fingerprint(cand) == before
  sys.modules.pop("lopt_fake_make", None)
