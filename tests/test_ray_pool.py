"""The Ray worker pool on a local Ray: determinism across worker counts, no recompiles,
restarts of killed workers, stragglers and staleness, exact checkpoint round trips."""
import logging
import os
import signal
import threading
import time
import warnings

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from flax import serialization

from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run import checkpoint as run_checkpoint
from learned_opt.meta_train.cli import main
from learned_opt.meta_train.learner.trainer import MetaTrainer
from learned_opt.meta_train.run.runner import run_meta_training
from learned_opt.meta_train.distributed.pool import RayMetaTrainer, RayPools, connect, from_host, to_host
from learned_opt.meta_train.estimators.base import COUNT_NAMES, GradEstimate, combine_estimates
from learned_opt.meta_train.distributed.scheduler import assign_shards, gather_rows, make_shards
from learned_opt.meta_train.distributed.worker import RowLayout

# A learned step size on 32-d quadratics (4 tasks, 5-step truncations): short compiles.
QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.learning_rate=0.05"]


def _build(overrides=()):
  cfg = config_lib.load_config(None, QUICK + list(overrides))
  lopt = config_lib.build_lopt(cfg.lopt)
  return config_lib.build_estimators(cfg, lopt), config_lib.build_outer_optimizer(cfg.outer)


def _equal(a, b):
  la, lb = jax.tree.leaves(to_host(a)), jax.tree.leaves(to_host(b))
  return jax.tree.structure(to_host(a)) == jax.tree.structure(to_host(b)) and all(
      np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  """A local Ray and two trainers on the same estimators (1 and 2 workers), shared by
  the tests: actor processes and their compiles are the slow part on 2 cores."""
  if ray.is_initialized():   # a Ray left by another module: start this module's own
    ray.shutdown()
  est, opt = _build()
  jax.devices()   # JAX is up before Ray starts, as in a run
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # Logical CPUs (scheduling tokens): room for the runner's own 1-CPU workers too;
    # every actor runs one XLA thread whatever this says.
    assert connect(num_cpus=4)
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  trainers = {w: RayMetaTrainer(est, opt, num_workers=w, cpus_per_worker=0.25,
                                compilation_cache_dir=cache) for w in (1, 2)}
  yield est, opt, trainers, caught
  for tr in trainers.values():
    tr.close()
  ray.shutdown()


@pytest.fixture
def trainers(pool):
  """The shared trainers with the default (synchronous) policy and no injected delays."""
  est, opt, trainers, _ = pool
  for tr in trainers.values():
    tr.set_policy()
  yield trainers
  for tr in trainers.values():
    tr.set_policy()
    ray.get([s.actor.inject_delay.remote(0.0) for s in tr.scheduler.slots])


def _run(trainer, steps, seed=0, learner=None, handle=None):
  if learner is None:
    learner, handle = trainer.init(seed)
  history = []
  for _ in range(steps):
    learner, handle, metrics = trainer.step(seed, learner, handle)
    history.append(jax.device_get(metrics))
  return learner, handle, history


# ---- no Ray needed -----------------------------------------------------------------------
def test_shard_layout_and_bad_settings():
  shards = make_shards([4, 2], 2)
  assert [(s.family, s.index, s.start, s.stop) for s in shards] == [(0, 0, 0, 2), (0, 1, 2, 4), (1, 0, 0, 2)]
  blocks = assign_shards(shards, 2)
  assert [len(b) for b in blocks] == [2, 1] and sum(blocks, []) == shards
  with pytest.raises(ValueError, match="tasks_per_shard=3 does not divide estimator 0's num_tasks=4"):
    make_shards([4], 3)
  with pytest.raises(ValueError, match="num_workers=4 exceeds the 3 shards"):
    assign_shards(shards, 4)
  with pytest.raises(ValueError, match="tasks_per_shard must be a positive int, got 0"):
    make_shards([4], 0)
  key = jax.random.key(3)
  tree = {"k": key, "x": np.arange(3.0)}
  back = from_host(to_host(tree), tree)
  assert np.array_equal(jax.random.key_data(back["k"]), jax.random.key_data(key))


def test_row_layout_round_trip_and_combination():
  theta = {"b": np.zeros((3,), np.float32), "w": np.zeros((2, 4), np.float32)}
  layout = RowLayout(theta)
  assert layout.width == 11 + 2 + len(COUNT_NAMES)
  rng = np.random.default_rng(0)
  ests = [GradEstimate(grad={"b": rng.normal(size=3).astype(np.float32),
                             "w": rng.normal(size=(2, 4)).astype(np.float32)},
                       meta_loss=np.float32(rng.normal()), num_pairs=np.int32(n),
                       counts={k: np.int32(i + n) for i, k in enumerate(COUNT_NAMES)})
          for n in (1, 3, 2)]
  rows = layout.pack_many(ests)
  back = layout.unpack(rows[1])
  assert _equal(back.grad, ests[1].grad) and int(back.num_pairs) == 3
  assert {k: int(v) for k, v in back.counts.items()} == {k: i + 3 for i, k in enumerate(COUNT_NAMES)}
  mean, ref = layout.unpack(layout.mean_rows(rows)), combine_estimates(ests)
  for a, b in zip(jax.tree.leaves(mean.grad) + [mean.meta_loss], jax.tree.leaves(ref.grad) + [ref.meta_loss]):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(mean.num_pairs) == 6 and int(mean.counts["resets"]) == int(ref.counts["resets"])
  assert _equal(layout.unflatten(layout.flatten(ests[2].grad)), ests[2].grad)
  # Rows gathered in global key order, whichever reply held them.
  host = np.asarray(rows)
  one = {(0, 0, 0, s): (host, s) for s in range(3)}
  two = {(0, 0, 0, 0): (host[:1], 0), (0, 0, 0, 1): (host[1:], 0), (0, 0, 0, 2): (host[1:], 1)}
  assert gather_rows(one) is host and np.array_equal(gather_rows(two), host)
  with pytest.raises(ValueError, match=r"meta-parameter \['n'\] has dtype int32"):
    RowLayout({"n": np.zeros(2, np.int32)})


@pytest.mark.slow
def test_bad_scheduler_settings_are_named(pool):
  est, opt, trainers, _ = pool
  for kw, msg in [({"quorum": 0.0}, r"quorum must be in \(0, 1\], got 0.0"),
                  ({"max_staleness": -1}, "max_staleness must be an int >= 0"),
                  ({"timeout_s": -1.0}, "timeout_s must be >= 0 or None, got -1.0")]:
    with pytest.raises(ValueError, match=msg):
      RayMetaTrainer(est, opt, **kw)
  with pytest.raises(ValueError, match="num_workers=5 exceeds the 4 shards"):
    RayMetaTrainer(est, opt, num_workers=5)
  learner, _ = trainers[1].init(0)
  with pytest.raises(ValueError, match="expects the RayPools handle"):
    trainers[1].step(0, learner, [])


def test_starting_ray_after_jax_gives_no_fork_warning(pool):
  # Ray's daemons start by fork+exec, which ran JAX's at-fork hook and its deadlock
  # warning on every run; `connect` silences that one warning (nothing of JAX runs in
  # the child).
  caught = pool[3]
  assert not [w for w in caught if "os.fork()" in str(w.message)], [str(w.message) for w in caught]


# ---- determinism -------------------------------------------------------------------------
@pytest.mark.slow
def test_one_and_two_workers_give_identical_meta_params(pool):
  est, opt, trainers, _ = pool
  finals = {}
  for workers, tr in trainers.items():
    learner, handle, hist = _run(tr, 5)
    finals[workers] = (learner, tr.gather_states(handle))
    assert all(h["units_used"] == 4 and h["worker_failures"] == 0 for h in hist)
    assert all(h["inexact"] == 0 and h["dropped_shards"] == 0 for h in hist)
    assert all(h["graph_step"] == 1 for h in hist)   # synchronous: one compiled graph per step
    assert hist[0]["pool_inits"] == workers and all(h["pool_inits"] == 0 for h in hist[1:])
    # Where a step's time goes: transit both ways is measured. Only presence and sign:
    # how long it takes depends on the machine's load (benchmarks/ray_scaling.py times it).
    for h in hist:
      assert h["transit_to_s"] > 0 and h["transit_back_s"] > 0
  assert _equal(finals[1][0], finals[2][0])      # theta, outer optimizer state, step
  assert _equal(finals[1][1], finals[2][1])      # every inner task of the pools
  # The estimator of the in-process trainer: same keys and pools, summed in another order.
  mt = MetaTrainer(est, opt)
  learner, states = mt.init(0)
  for _ in range(5):
    learner, states, _ = mt.step(0, learner, states)
  for a, b in zip(jax.tree.leaves(to_host(learner)), jax.tree.leaves(to_host(finals[1][0]))):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert not _equal(learner.meta_params, mt.init(0)[0].meta_params)  # it did train
  for a, b in zip(jax.tree.leaves(to_host(states)), jax.tree.leaves(to_host(finals[1][1]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_combining_on_workers_gives_the_same_estimate(trainers):
  results = {}
  for combine in (False, True):
    trainers[2].scheduler.combine_on_worker = combine
    try:
      learner, _, hist = _run(trainers[2], 3)
    finally:
      trainers[2].scheduler.combine_on_worker = False
    assert all(h["units_used"] == 4 for h in hist)
    results[combine] = learner
  for a, b in zip(jax.tree.leaves(to_host(results[False])), jax.tree.leaves(to_host(results[True]))):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_second_step_does_not_recompile(trainers):
  tr = trainers[2]
  learner, handle, _ = _run(tr, 2)
  sizes = [ray.get(s.actor.jit_cache_size.remote()) for s in tr.scheduler.slots]
  learner_side = (tr._update._cache_size(), tr._flatten._cache_size())
  _run(tr, 3, learner=learner, handle=handle)
  assert [ray.get(s.actor.jit_cache_size.remote()) for s in tr.scheduler.slots] == sizes
  assert [s["estimate"] for s in sizes] == [1, 1] and all(s["unflatten"] >= 1 for s in sizes)
  assert (tr._update._cache_size(), tr._flatten._cache_size()) == learner_side


def test_checkpoint_round_trip_is_exact_across_worker_counts(trainers):
  learner, handle, _ = _run(trainers[2], 2)
  saved_learner, saved = learner, trainers[2].gather_states(handle)
  straight, _, _ = _run(trainers[2], 2, learner=learner, handle=handle)
  trainers[1].init(0)
  handle = trainers[1].scatter_states(saved)
  resumed, handle, hist = _run(trainers[1], 2, learner=saved_learner, handle=handle)
  assert all(h["pool_inits"] == 0 for h in hist)   # the restored pools were used
  assert _equal(straight.meta_params, resumed.meta_params)
  with pytest.raises(ValueError, match="expected num_tasks=4 on every leaf"):
    trainers[1].scatter_states([jax.tree.map(lambda x: x[:2], saved[0])])


# ---- failures and stragglers ---------------------------------------------------------------
@pytest.mark.parametrize("compiled_graph,snapshot_every", [(True, 100), (False, 2)])
def test_killed_worker_resumes_exactly_and_logs_one_line(trainers, caplog, capfd, compiled_graph,
                                                         snapshot_every):
  """kill -9 of a worker in the middle of a step: Ray restarts it, the learner restores
  its pools (fresh pools replayed through every run, or the last snapshot and the runs
  since) and the run's meta-parameters and pools are bit-identical to an undisturbed
  run's; the fault is one log line, no traceback."""
  tr = trainers[2]
  tr.scheduler.compiled_graph, tr.scheduler.snapshot_every = compiled_graph, snapshot_every
  try:
    straight, handle, _ = _run(tr, 5)
    straight_pools = tr.gather_states(handle)
    capfd.readouterr()
    learner, handle, hist = _killed_worker_run(tr, caplog)
    pools = tr.gather_states(handle)
  finally:
    tr.scheduler.compiled_graph, tr.scheduler.snapshot_every = True, 100
  assert _equal(straight, learner) and _equal(straight_pools, pools)
  # Fresh pools and both runs before the kill replayed, or the snapshot taken after them.
  assert hist[0]["runs_replayed"] == (2 if snapshot_every == 100 else 0)
  assert all(h["inexact"] == 0 and h["dropped_shards"] == 0 for h in hist)
  lines = [r for r in caplog.records if r.name.startswith("lopt")]
  assert len(lines) == 1 and "worker 0 lost" in lines[0].getMessage(), [r.getMessage() for r in lines]
  err = capfd.readouterr().err
  assert "Traceback" not in err and "ActorUnavailableError" not in err, err[-2000:]


def _killed_worker_run(tr, caplog):
  learner, handle, _ = _run(tr, 1)
  victim = tr.scheduler.slots[0].actor
  old_pid = ray.get(victim.pid.remote())
  ray.get(victim.inject_delay.remote(1.5))
  # Step 2 was prefetched before the delay: its call is done; step 3's is slow.
  learner, handle, _ = _run(tr, 1, learner=learner, handle=handle)
  if tr.scheduler.snapshot_every <= 2:
    # Sent between steps and not waited for by the learner; here it must be in before
    # the kill, so that the restore starts from it.
    ray.get(tr.scheduler.slots[0].snapshot_ref[1])
  # Killed in the middle of a step: its call fails, Ray restarts the actor, the learner
  # re-sends the step with a restore of the pools.
  threading.Timer(0.5, os.kill, args=(old_pid, signal.SIGKILL)).start()
  with caplog.at_level(logging.INFO, logger="lopt.ray"):
    learner, handle, hist = _run(tr, 3, learner=learner, handle=handle)
  assert hist[0]["worker_failures"] == 1 and hist[0]["pool_inits"] == 1
  assert all(h["units_used"] == h["units_total"] == 4 for h in hist)
  assert all(h["worker_failures"] == 0 and h["pool_inits"] == 0 for h in hist[1:])
  assert ray.get(victim.pid.remote()) != old_pid
  # The failed step is redone with actor calls; the next steps use the rebuilt graph.
  graph = tr.scheduler.compiled_graph
  assert [h["graph_step"] for h in hist] == ([0, 1, 1] if graph else [0, 0, 0])
  assert all(np.isfinite(h["meta_loss"]) and h["skipped"] == 0 for h in hist)
  assert int(learner.step) == 5
  return learner, handle, hist


@pytest.mark.slow
def test_worker_restarted_between_graph_steps_resumes_exactly(trainers, caplog):
  tr = trainers[2]
  tr.prefetch = False
  try:
    straight, _, _ = _run(tr, 5)
    learner, handle, hist = _run(tr, 2)
    assert hist[-1]["graph_step"] == 1
    victim = tr.scheduler.slots[1].actor
    old_pid = ray.get(victim.pid.remote())
    os.kill(old_pid, signal.SIGKILL)
    for _ in range(100):   # wait until Ray has restarted it: the graph's channels are stale
      try:
        if ray.get(victim.pid.remote(), timeout=5) != old_pid:
          break
      except ray.exceptions.RayActorError:
        time.sleep(0.1)
    with caplog.at_level(logging.INFO, logger="lopt.ray"):
      learner, handle, hist = _run(tr, 3, learner=learner, handle=handle)
  finally:
    tr.prefetch = True
  assert all(h["units_used"] == h["units_total"] == 4 for h in hist)
  assert sum(h["pool_inits"] for h in hist) == 1 and hist[0]["graph_step"] == 0
  assert hist[-1]["graph_step"] == 1   # rebuilt once every worker answered again
  assert _equal(straight, learner) and all(h["inexact"] == 0 for h in hist)
  warned = [r.getMessage() for r in caplog.records if r.name == "lopt.ray" and r.levelno >= logging.WARNING
            and "waiting for workers" not in r.getMessage()]  # progress lines of a slow machine
  assert len(warned) == 1 and "worker 1" in warned[0], warned   # one line for the fault


def test_straggler_is_left_behind_and_its_late_estimate_dropped(trainers):
  tr = trainers[2]
  tr.set_policy(quorum=0.5, timeout_s=0.3)
  learner, handle, _ = _run(tr, 1)
  ray.get(tr.scheduler.slots[1].actor.inject_delay.remote(2.0))
  learner, handle, _ = _run(tr, 1, learner=learner, handle=handle)  # prefetched before the delay
  learner, handle, hist = _run(tr, 1, learner=learner, handle=handle)
  # Left behind: the step used only the other worker's 2 units (no wall-clock bound: a
  # loaded machine makes any step slow, whether it waited or not).
  assert hist[0]["units_used"] == 2 and hist[0]["graph_step"] == 0   # quorum needs actor calls
  assert hist[0]["inexact"] == 1 and hist[0]["dropped_shards"] == 2   # said in its metrics line
  ray.get(tr.scheduler.slots[1].actor.inject_delay.remote(0.0))  # queued behind its late call
  learner, handle, hist = _run(tr, 1, learner=learner, handle=handle)
  assert hist[0]["units_dropped_stale"] == 2 and hist[0]["staleness"] == 0
  assert int(learner.step) == 4


def test_async_mode_applies_estimates_within_the_staleness_bound(trainers):
  tr = trainers[2]
  learner, handle, _ = _run(tr, 1)
  # Worker 1 takes ~6 of worker 0's steps per call.
  ray.get([s.actor.inject_delay.remote(d) for s, d in zip(tr.scheduler.slots, (0.1, 0.6))])
  tr.set_policy(quorum=0.5, timeout_s=0.0, max_staleness=10)
  learner, handle, hist = _run(tr, 8, learner=learner, handle=handle)
  # Worker 0's units are at most 1 step old: older ones are worker 1's, applied late.
  assert 2 <= max(h["staleness"] for h in hist) <= 10
  assert all(h["inexact"] == 1 for h in hist if h["staleness"] > 0 or h["dropped_shards"] > 0)
  assert sum(h["units_dropped_stale"] for h in hist) == 0
  tr.set_policy(quorum=0.5, timeout_s=0.0, max_staleness=1)
  learner, handle, hist = _run(tr, 8, learner=learner, handle=handle)
  assert sum(h["units_dropped_stale"] for h in hist) > 0 and max(h["staleness"] for h in hist) <= 1
  assert all(np.isfinite(h["meta_loss"]) and h["skipped"] == 0 for h in hist)


def test_prefetched_step_is_undone_for_another_learner(trainers):
  tr = trainers[2]
  straight, _, _ = _run(tr, 4)
  learner, handle, _ = _run(tr, 2)      # step 3 is now running ahead on the workers
  assert tr.scheduler.prefetched == 2
  for _ in range(2):
    # Equal values in new arrays: not the learner the prefetch was sent for, so the
    # workers rewind their pools and the step runs as if nothing had been sent.
    learner = jax.tree.map(lambda x: x.copy(), learner)
    learner, handle, _ = _run(tr, 1, learner=learner, handle=handle)
  assert _equal(straight.meta_params, learner.meta_params)
  tr.prefetch = False
  try:
    again, _, _ = _run(tr, 4)
  finally:
    tr.prefetch = True
  assert tr.scheduler.prefetched is None and _equal(straight.meta_params, again.meta_params)


@pytest.mark.slow
def test_foreign_handle_reinitializes_pools(trainers, caplog):
  tr = trainers[1]
  learner, handle, _ = _run(tr, 1)
  foreign = RayPools(pools_id=np.uint32(int(handle.pools_id) ^ 1))
  with caplog.at_level(logging.WARNING, logger="lopt.ray"):
    learner, handle, hist = _run(tr, 1, learner=learner, handle=foreign)
  assert hist[0]["pool_inits"] == 1 and "re-initializing" in caplog.text


# ---- the runner and the command line ------------------------------------------------------
@pytest.mark.slow  # ~1.5 min here: the runner starts its own workers twice
def test_cli_workers_run_resumes_with_another_worker_count(trainers, tmp_path):
  out = str(tmp_path / "run")
  sets = QUICK + ["outer.num_steps=4", "run.checkpoint_every=2", "run.export=null",
                  "run.tensorboard=false"]
  cfg = config_lib.load_config(None, sets)
  first = run_meta_training(cfg, out, progress=False, stop_after=2, workers=2)
  assert int(first.learner.step) == 2 and not first.finished
  assert jax.tree.structure(to_host(first.states)) == jax.tree.structure(
      to_host(trainers[1].gather_states(trainers[1].init(0)[1], first.learner.meta_params)))
  argv = ["meta-train", "--out", out, "--no-progress", "--resume", "--workers", "1"]
  assert main(argv + sum((["--set", s] for s in sets), [])) == 0
  step, path = run_checkpoint.latest_checkpoint(os.path.join(out, "checkpoints"))
  with open(path, "rb") as f:
    saved = serialization.msgpack_restore(f.read())
  straight, _, _ = _run(trainers[2], 4)
  assert step == 4 and _equal(saved["learner"]["meta_params"], straight.meta_params)
  assert main(["meta-train", "--out", str(tmp_path / "x"), "--ray-address", "auto", "--no-progress"]
              + sum((["--set", s] for s in sets), [])) == 2   # --ray-address without --workers
