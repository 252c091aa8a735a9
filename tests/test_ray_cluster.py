"""The Ray pool on a 3-node cluster on one machine: a node removed mid-run, and the run
ends with the meta-parameters of an undisturbed run."""
import logging
import threading

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster

from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.distributed.pool import RayMetaTrainer, to_host

# A learned step size on 32-d quadratics: the meta-loss falls from ~1 to ~0.1 in 16 steps.
QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.learning_rate=0.3"]
# A dead node is declared after ~1.5 s instead of ~17 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 3}


@pytest.fixture
def cluster():
  if ray.is_initialized():  # a local Ray left by another test module
    ray.shutdown()
  c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH_CHECKS})
  for _ in range(2):
    c.add_node(num_cpus=1)
  c.wait_for_nodes()
  ray.init(address=c.address, log_to_driver=False)
  yield c
  ray.shutdown()
  c.shutdown()


@pytest.mark.slow
# The Cluster harness starts its nodes' daemons from this (JAX-initialized) process by
# fork+exec, which trips JAX's at-fork warning; lopt's own `connect` is not used here.
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_run_survives_a_removed_node_and_keeps_learning(cluster, tmp_path, caplog):
  cfg = config_lib.load_config(None, QUICK)
  lopt = config_lib.build_lopt(cfg.lopt)
  estimators = config_lib.build_estimators(cfg, lopt)
  # One CPU per worker on three 1-CPU nodes: the two workers sit on different nodes
  # and a restarted one has a free node to go to.
  with RayMetaTrainer(estimators, config_lib.build_outer_optimizer(cfg.outer), num_workers=2,
                      cpus_per_worker=1.0, compilation_cache_dir=str(tmp_path)) as tr:
    head = ray.get_runtime_context().get_node_id()
    where = [ray.get(s.actor.node_id.remote()) for s in tr.scheduler.slots]
    assert len(set(where)) == 2
    victim = next(i for i, n in enumerate(where) if n != head)
    node = next(n for n in cluster.list_all_nodes() if n.node_id == where[victim])

    # The undisturbed run first, on the same workers.
    straight, handle = tr.init(0)
    for _ in range(14):
      straight, handle, _ = tr.step(0, straight, handle)
    straight_pools = tr.gather_states(handle)

    learner, handle = tr.init(0)
    hist = []
    caplog.set_level(logging.WARNING, logger="lopt.ray")
    for step in range(14):
      if step == 4:
        # Slows the victim from its next call on: step 5's, sent ahead at the end of
        # step 4 (step 4's own call was prefetched before this and is already done).
        ray.get(tr.scheduler.slots[victim].actor.inject_delay.remote(1.0))
      if step == 5:
        # The node goes away while its worker is inside this step's call.
        threading.Timer(0.3, cluster.remove_node, args=(node,)).start()
      learner, handle, metrics = tr.step(0, learner, handle)
      hist.append(jax.device_get(metrics))
      if step == 4:
        lr_before = float(learner.meta_params["log_lr"])

    assert int(learner.step) == 14
    # The worker's pools were restored exactly: bit-identical to the undisturbed run.
    pools = tr.gather_states(handle)
    for a, b in zip(jax.tree.leaves(to_host((straight, straight_pools))),
                    jax.tree.leaves(to_host((learner, pools)))):
      assert np.array_equal(a, b)
    assert all(h["inexact"] == 0 for h in hist) and hist[5]["runs_replayed"] == 5
    assert sum(h["worker_failures"] for h in hist) == 1 and hist[5]["worker_failures"] == 1
    assert hist[5]["pool_inits"] == 1 and "lost during the compiled-graph step" in caplog.text
    # One line per fault; a loaded machine may add the scheduler's "waiting for workers"
    # progress lines, which are not about the fault.
    faults = [r for r in caplog.records
              if r.name == "lopt.ray" and "waiting for workers" not in r.getMessage()]
    assert len(faults) == 1, [r.getMessage() for r in faults]
    # Steps go through the compiled graph, the failed one through actor calls, and the
    # graph is rebuilt across the nodes once the worker is back.
    assert [h["graph_step"] for h in hist[:5]] == [1] * 5 and hist[5]["graph_step"] == 0
    assert hist[-1]["graph_step"] == 1
    # Every step applied each unit exactly once (the scheduler refuses repeats).
    assert all(h["units_used"] == h["units_total"] == 4 for h in hist)
    assert all(h["skipped"] == 0 and np.isfinite(h["meta_loss"]) for h in hist)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(learner.meta_params))
    new_home = ray.get(tr.scheduler.slots[victim].actor.node_id.remote())
    assert new_home != where[victim]
    loss = np.array([h["meta_loss"] for h in hist])
    assert loss[-3:].mean() < 0.7 * loss[5:8].mean() and loss[-3:].mean() < 0.5 * loss[:3].mean()
    assert float(learner.meta_params["log_lr"]) > lr_before + 0.5
