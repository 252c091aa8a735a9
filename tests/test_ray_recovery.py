"""What the Ray pool guarantees, checked without starting Ray: the learner's record of a
worker's pools (recovery.PoolHistory) rebuilds exactly what the worker went through,
and a shard's estimate differs from the in-process one by the combine's rounding only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("ray")

from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.learner import outer
from learned_opt.meta_train.distributed.recovery import PoolHistory
from learned_opt.meta_train.distributed.worker import Restore, RowLayout, theta_shapes, to_host


def test_history_rebuilds_fresh_pools_then_replays_every_run():
  h, t0, t1, t2 = PoolHistory(), np.zeros(2), np.ones(2), np.full(2, 2.0)
  # The first call initializes fresh pools from its own theta: nothing to send.
  assert h.restore(t0) == Restore(0, None, None, ())
  h.sent(t0)
  assert h.received(1, 0, t0) and h.received(2, 1, t1)
  # A restarted worker: fresh pools of the first theta, then both runs with their own.
  r = h.restore(t2)
  assert (r.seq, r.states) == (0, None) and r.theta is t0
  assert [v for v, _ in r.replay] == [0, 1] and r.replay[1][1] is t1
  assert h.exact and h.seq == 2


def test_history_snapshot_becomes_the_starting_point():
  h, t = PoolHistory(), [np.full(1, float(i)) for i in range(4)]
  h.sent(t[0])
  for i in range(3):
    h.received(i + 1, i, t[i])
  h.snapshot(4, {"s": 4})           # newer than any result taken in: not a known state
  h.snapshot(2, {"s": 2})
  r = h.restore(t[3])
  assert (r.seq, r.states, r.theta) == (2, {"s": 2}, None)
  assert [v for v, _ in r.replay] == [2]
  h.snapshot(1, {"s": 1})           # older than the starting point: ignored
  assert h.base_seq == 2 and h.version == 2


def test_history_marks_skipped_versions_and_broken_records():
  h = PoolHistory()
  h.sent(0)
  h.received(1, 0, 0)
  h.received(2, 2, 2)               # version 1 skipped (a straggler, the async mode)
  assert not h.exact
  h = PoolHistory()
  h.sent(0)
  assert h.received(1, 0, 0) and not h.received(3, 1, 1)   # a run missing: broken
  assert h.restore(5) == Restore(0, None, None, ())          # fresh pools are all there is
  h.sent(5)
  assert h.base_theta == 5 and h.runs == [] and not h.exact


@pytest.mark.slow  # ~40 s here: two compiles of a per-parameter MLP's unroll
def test_shard_estimates_match_in_process_up_to_the_combine():
  """Every shard's tasks are bit-identical to the in-process pool's; only the combine
  (per-shard means, then their pair-weighted mean, against one sum over the pool) rounds
  differently: docs/ray.md states this, and the size measured on configs/tiny.yaml."""
  cfg = config_lib.load_config(None, [
      "lopt.name=per_param_mlp", "lopt.options={hidden_sizes: [4]}", "task.families=[quadratic]",
      "truncation.horizon=20", "estimator.unroll_length=5", "estimator.num_tasks=4"])
  lopt = config_lib.build_lopt(cfg.lopt)
  est = config_lib.build_estimators(cfg, lopt)[0]
  theta = lopt.init_meta_params(outer.run_keys(0).theta)
  key = outer.estimate_key(outer.run_keys(0).steps, 0, 0, 0)
  pool, whole = est.estimate(key, theta, est.init(outer.pool_key(0, 0), theta))
  layout = RowLayout(theta_shapes(lopt))
  rows, shards = [], []
  for s in range(est.num_tasks):    # tasks_per_shard=1: what each worker computes
    state = est.init(outer.pool_key(0, 0), theta, indices=jnp.arange(s, s + 1, dtype=jnp.int32))
    state, e = est.estimate(key, theta, state)
    rows.append(layout.pack(e))
    shards.append(to_host(state))
  joined = jax.tree.map(lambda *xs: np.concatenate(xs), *shards)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(to_host(pool)), jax.tree.leaves(joined)))
  combined = layout.unpack(jax.jit(layout.mean_rows)(jnp.stack(rows)))
  g_ray, g_in = layout.flatten(combined.grad), layout.flatten(whole.grad)
  assert float(jnp.max(jnp.abs(g_ray - g_in))) <= 1e-6 * float(jnp.max(jnp.abs(g_in)))
  assert int(combined.num_pairs) == int(whole.num_pairs) == 4
  np.testing.assert_allclose(combined.meta_loss, whole.meta_loss, rtol=1e-6)
