"""Meta-training on a Ray cluster: worker actors hold slices of the task pools.

`RayMetaTrainer` implements the `learner.trainer.Trainer` interface, as the in-process
`MetaTrainer` does, so the runner drives either. The learner keeps theta and the outer optimizer;
each worker actor keeps its *shards* of the estimators' pools and, once per outer step,
receives theta (one `ray.put` read by every worker; small theta rides in the call),
runs its shards' truncations and returns their `GradEstimate`s as the rows of one
float32 buffer (`RowLayout`; theta travels flat too). What travels is
seeds, not noise: a worker rebuilds every key from (seed, step, accumulation index,
family) exactly as the in-process trainer does, and each task folds in its global
index, so a shard's estimate does not depend on which worker ran it.

Determinism: pools are cut into shards of `tasks_per_shard` tasks, a partition fixed
by the config and not by the number of workers; every shard runs the same compiled
program whichever worker holds it, and the learner combines shard estimates in global
(step, accumulation, family, shard) order. So in the synchronous mode with a fixed
seed, 1 worker and 8 workers give bit-identical meta-parameters, and so does a run
during which a worker or its node was lost (recovery.py). Against the in-process
trainer they agree up to the rounding of the combine (docs/ray.md).

Scheduling, stragglers, staleness and failures live in scheduler.py, exact restores of
lost workers and whole-pool calls in recovery.py, the worker actor and what travels in
worker.py. This sub-package is the only one that imports ray.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ray
import ray.exceptions
from flax import struct

from learned_opt.meta_train.learner import outer
from learned_opt.meta_train.learner.trainer import Trainer
from learned_opt.meta_train.distributed.scheduler import Scheduler, assign_shards, gather_rows, make_shards
from learned_opt.meta_train.distributed.worker import (PoolWorker, RowLayout, from_host, theta_shapes,
                                                to_host)

log = logging.getLogger("lopt.ray")

# One XLA thread per actor: several single-threaded actors per node beat a few that
# fight over cores (what ES populations want), and results stay bit-reproducible.
SINGLE_THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                     "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lopt", "jax_cache")


@struct.dataclass
class RayPools:
  """What `RayMetaTrainer` returns in place of pool states (those stay on the workers).

  pools_id: uint32 []: identifies the trainer's current pools; a handle restored from an
    old checkpoint does not match it, and the trainer then re-initializes the pools
    (`scatter_states` restores them exactly instead).
  """
  pools_id: jax.Array


# ---- starting Ray ------------------------------------------------------------------------
class ClusterJoinError(ValueError):
  """Ray could not join the cluster at the given address (wrong address, or the
  cluster's token authentication and this process's token disagree). A ValueError, so
  `lopt` prints it as one line."""


def _token_source() -> str | None:
  """Where Ray would read an authentication token from (RAY_AUTH_TOKEN, the file at
  RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token, in Ray's order), or None."""
  if os.environ.get("RAY_AUTH_TOKEN"):
    return "RAY_AUTH_TOKEN"
  path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
  return path if os.path.isfile(path) and os.path.getsize(path) > 0 else None


def _use_token_auth_if_available() -> str | None:
  """Turns Ray's token authentication on for this process (and the processes it
  starts) when a token is at hand and RAY_AUTH_MODE is unset; returns the token's source.

  What `ray start` and `ray.init(address="auto")` do: since Ray 2.60 a head node
  started next to a token (`ray start --head` writes ~/.ray/auth_token) requires it,
  but `ray.init` given an explicit HOST:PORT leaves token mode off, so the documented
  `--ray-address HOST:PORT` failed with InvalidAuthToken although the token was there.
  """
  source = _token_source()
  if os.environ.get("RAY_AUTH_MODE") is not None or source is None:
    return None
  os.environ["RAY_AUTH_MODE"] = "token"
  # Ray reads RAY_AUTH_MODE into its cached config when it is imported; re-read it, as
  # Ray's own `_enable_token_auth` does.
  ray._raylet.Config.initialize("")
  return source


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
  """Joins a running Ray cluster, or starts an embedded local one.

  Joining picks up the cluster's token authentication as Ray's CLI does: with
  RAY_AUTH_MODE unset and a token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token, token mode is turned on (docs/ray.md). A local Ray keeps Ray's
  defaults (token auth on) and runs its workers at normal priority (Ray's default is
  nice 15).

  Args:
    address: None: start a local Ray in this process's machine; "auto" or "HOST:PORT":
      join that cluster.
    num_cpus: CPUs of the local Ray (None: all of them); ignored when joining.

  Returns:
    Whether this call started Ray (and so who should shut it down).

  Raises:
    ClusterJoinError: the cluster could not be joined (one line saying what to check).
  """
  if ray.is_initialized():
    return False
  if address is not None:
    source = _use_token_auth_if_available()
    if source is not None:
      log.info("joining %s with token authentication (token from %s)", address, source)
    try:
      ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
      mode = os.environ.get("RAY_AUTH_MODE", "unset")
      raise ClusterJoinError(
          f"could not join the Ray cluster at {address} ({(str(e).splitlines() or [''])[0]}); "
          f"RAY_AUTH_MODE is {mode}, token: {_token_source() or 'none found'}. A cluster with "
          "token authentication (Ray's default) needs its token: copy the head node's "
          "~/.ray/auth_token here or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)") from None
  else:
    # Ray starts workers at niceness 15 so that its own daemons stay responsive; here
    # the workers are the computation, so on a machine shared with other work they
    # would get a fraction of what an in-process run gets (measured: ~1/3 at load 8
    # per core). Nice 0 puts them on a par with the learner.
    with warnings.catch_warnings():
      # Ray starts its daemons (GCS, raylet, ...) with subprocess.Popen and a
      # preexec_fn, which runs the at-fork hooks, and JAX's hook warns of a deadlock
      # when its backend is up (the estimators were built first). The child only
      # masks a signal and execs: no JAX code runs in it, so the warning is void here.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
      ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
               _system_config={"worker_niceness": 0})
  return True


# ---- the trainer -------------------------------------------------------------------------
class RayMetaTrainer(Trainer):
  """Meta-training with the pools spread over Ray worker actors; see the module docstring.

  Args:
    estimators: one `GradientEstimator` per task family (as for `MetaTrainer`).
    optimizer: the outer optax transform.
    accumulate: truncations per shard averaged into one outer update.
    num_workers: worker actors (at most the number of shards).
    tasks_per_shard: the unit of work and of determinism; results are identical for
      any `num_workers` at a fixed value. On CPU members run one after another, so 1
      costs nothing; on accelerators raise it so each call vectorizes many tasks.
    quorum: fraction (0, 1] of the step's shard estimates the learner needs before it
      applies an update; 1.0 waits for all (deterministic).
    timeout_s: once the quorum is met, how long (seconds from the step's start) to
      wait for the remaining estimates; late ones are ignored. None: wait for all.
    max_staleness: 0 is synchronous. S > 0 is asynchronous: estimates computed on
      theta of up to S steps ago are applied, older ones are dropped, and workers are
      re-sent theta as soon as they finish instead of at the step's start.
    address: Ray address to join ("auto", "HOST:PORT"); None starts a local Ray.
    num_cpus: CPUs of a local Ray (None: all).
    cpus_per_worker, gpus_per_worker: Ray resources each actor reserves.
    worker_env: environment variables of the actor processes (default: one thread).
    compilation_cache_dir: JAX persistent compilation cache of the workers (None: off).
    combine_on_worker: each worker averages its shards' estimates before sending: the
      learner then takes in one meta-gradient per worker instead of one per shard (what
      large meta-parameters or many shards need, see docs/ray.md), at the price of
      bit-identity across worker counts (the sum order follows the assignment).
    inline_theta_bytes: theta up to this size travels inside each worker call; larger
      theta is put in the object store once per step and every worker reads that copy.
    max_failures: worker failures tolerated over the run before giving up.
    prefetch: at the end of a step, send the new theta to the idle workers at once,
      so they compute while the caller logs or checkpoints and the next `step` only
      waits. A next `step` with another learner or seed discards that work (the
      workers rewind their pools), and `gather_states` returns the pools from before
      it, so results are those without prefetching.
    compiled_graph: send synchronous steps (quorum 1.0, no timeout, no staleness) to all
      workers as one Ray compiled graph (shared-memory channels; ~1.5 instead of ~3.3
      ms per round trip here, docs/ray.md) rather than one actor call each. A step
      during which a worker dies is redone with actor calls, which also serve every
      other policy; the graph is rebuilt once all workers answer again. Results are
      identical either way.
    snapshot_every: a lost worker's pools are rebuilt exactly from their last known
      states and the runs since, replayed (recovery.py); every this many runs of a
      worker (and at each `gather_states`), its states are fetched between steps and
      become that starting point, bounding the thetas kept and the replay.
  """

  def __init__(self, estimators: Sequence[Any], optimizer: optax.GradientTransformation, *,
               accumulate: int = 1, num_workers: int = 1, tasks_per_shard: int = 1,
               quorum: float = 1.0, timeout_s: float | None = None, max_staleness: int = 0,
               address: str | None = None, num_cpus: int | None = None,
               cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
               worker_env: dict[str, str] | None = None,
               compilation_cache_dir: str | None = DEFAULT_CACHE_DIR, max_failures: int = 100,
               combine_on_worker: bool = False, inline_theta_bytes: int = 100_000,
               prefetch: bool = True, compiled_graph: bool = True, snapshot_every: int = 100):
    super().__init__(estimators, optimizer, accumulate=accumulate)
    self.shards = make_shards([e.num_tasks for e in self.estimators], tasks_per_shard)
    assignment = assign_shards(self.shards, num_workers)
    self._owns_ray = connect(address, num_cpus=num_cpus)
    env = SINGLE_THREAD_ENV if worker_env is None else worker_env
    actor_cls = ray.remote(PoolWorker).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=-1, max_task_retries=0,
        scheduling_strategy="SPREAD", runtime_env={"env_vars": dict(env)} if env else None)
    # One copy of the estimators (with their datasets) in the object store; restarted
    # actors read it again from there.
    self._estimators_ref = ray.put(self.estimators)
    make_actor = lambda shards: actor_cls.remote(self._estimators_ref, shards, compilation_cache_dir)
    self.scheduler = Scheduler(make_actor, assignment, num_units=accumulate * len(self.shards),
                               accumulate=accumulate, quorum=quorum, timeout_s=timeout_s,
                               max_staleness=max_staleness, max_failures=max_failures, log=log,
                               combine_on_worker=combine_on_worker,
                               compiled_graph=compiled_graph, snapshot_every=snapshot_every)
    self._pools_id = 0
    self._seed = None
    self._theta = None
    self.inline_theta_bytes = inline_theta_bytes
    self.layout = RowLayout(theta_shapes(self.lopt))
    self._flatten = jax.jit(self.layout.flatten)
    self._update = jax.jit(self._update_impl)
    self._flat_theta = (None, None)   # (meta_params, their flat host copy) of the last update
    self.prefetch = prefetch
    self._prefetched_for = ((None, None), None)   # ((version, seed), meta_params) sent ahead

  # ---- the Trainer interface ----------------------------------------------------------
  @property
  def num_workers(self) -> int:
    return len(self.scheduler.slots)

  def set_policy(self, *, quorum: float = 1.0, timeout_s: float | None = None,
                 max_staleness: int = 0) -> None:
    """Changes the straggler/staleness policy between steps (see the class Args)."""
    self.scheduler.set_policy(quorum=quorum, timeout_s=timeout_s, max_staleness=max_staleness)

  def init(self, seed: int, meta_params: Any | None = None) -> tuple[outer.LearnerState, RayPools]:
    """Learner state for run seed `seed` (theta as `MetaTrainer.init`) and a pools
    handle; workers initialize their shards with theta in the first step."""
    meta_params = self.init_meta_params(seed, meta_params)
    self._seed = seed
    self.scheduler.reset()
    return outer.init_learner(meta_params, self.optimizer), self._new_handle()

  def step(self, seed: int, learner: outer.LearnerState,
           states: RayPools) -> tuple[outer.LearnerState, RayPools, dict]:
    """One outer step: broadcast theta, gather shard estimates, one outer update; with
    `prefetch`, then the broadcast of the next step's theta."""
    self._check_handle(states)
    t0 = time.perf_counter()
    version = int(learner.step)
    sched = self.scheduler
    ahead = sched.prefetched is not None and self._prefetched_for[0] == (version, seed)
    ahead = ahead and self._prefetched_for[1] is learner.meta_params
    if sched.prefetched is not None and not ahead:
      sched.discard_prefetch()   # sent for a learner or seed this call does not continue
    if not ahead:
      self._theta = self._broadcast(learner.meta_params)
    t_put = time.perf_counter() - t0
    units, stats = sched.run_step(self._theta, seed=seed, version=version)
    t1 = time.perf_counter()
    learner, metrics, flat = self._update(learner, gather_rows(units))
    metrics = dict(metrics)
    # Waits for the update (one execution gives theta, its flat copy and the metrics).
    self._flat_theta = (learner.meta_params, np.asarray(flat))
    t2 = time.perf_counter()
    # Before the prefetch: idle workers' pools are those of the results just taken in.
    sched.request_snapshots(seed=seed, next_version=version + 1)
    if self.prefetch:
      self._theta = self._broadcast(learner.meta_params)
      sched.prefetch(self._theta, seed=seed, version=version + 1)
      self._prefetched_for = ((version + 1, seed), learner.meta_params)
    stats["broadcast_s"] = t_put + time.perf_counter() - t2
    stats["learner_s"] = t2 - t1
    metrics.update(stats)
    return learner, states, metrics

  # ---- checkpoints ------------------------------------------------------------------
  def gather_states(self, states: RayPools, meta_params: Any | None = None) -> list:
    """The full pool states in `MetaTrainer`'s layout (one per estimator, global task
    order), fetched from the workers; what a run checkpoint stores.

    Args:
      states: the handle returned by `init` / `step`.
      meta_params: theta to initialize pools with where a worker has none yet (default:
        the last broadcast theta).
    """
    self._check_handle(states)
    theta = self._theta
    if meta_params is not None or theta is None:
      if meta_params is None:
        raise ValueError("gather_states before the first step needs meta_params to "
                         "initialize the pools with")
      theta = self._broadcast(meta_params)
    by_shard = self.scheduler.get_states(theta, seed=self._seed)
    out = []
    for f, est in enumerate(self.estimators):
      parts = [by_shard[sh.family, sh.index] for sh in self.shards if sh.family == f]
      template = jax.eval_shape(lambda: est.init(jax.random.key(0), est.lopt.init_meta_params(
          jax.random.key(0)), indices=jnp.arange(est.num_tasks, dtype=jnp.int32)))
      out.append(from_host(jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts), template))
    return out

  def scatter_states(self, pool_states: Sequence[Any]) -> RayPools:
    """Sends full pool states (`MetaTrainer` layout, e.g. from a checkpoint) to the
    workers; returns the handle to continue with."""
    if len(pool_states) != len(self.estimators):
      raise ValueError(f"expected pool states for {len(self.estimators)} estimators, got "
                       f"{len(pool_states)}")
    by_shard = {}
    for f, (est, st) in enumerate(zip(self.estimators, pool_states)):
      host = to_host(st)
      sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(host)}
      if sizes != {est.num_tasks}:
        raise ValueError(f"pool states of estimator {f} have leading sizes {sorted(map(str, sizes))}; "
                         f"expected num_tasks={est.num_tasks} on every leaf")
      for sh in self.shards:
        if sh.family == f:
          by_shard[f, sh.index] = jax.tree.map(lambda x: x[sh.start:sh.stop], host)
    self.scheduler.set_states(by_shard)
    return self._new_handle()

  def close(self) -> None:
    """Stops the workers, and Ray if this trainer started it."""
    self.scheduler.close()
    if self._owns_ray and ray.is_initialized():
      ray.shutdown()
    self._owns_ray = False

  # ---- internals --------------------------------------------------------------------
  def _update_impl(self, learner, rows):
    """The combined estimate of rows [n, width] applied: (learner, metrics, flat theta)."""
    combined = self.layout.unpack(self.layout.mean_rows(rows))
    learner, metrics = outer.apply_estimate(self.optimizer, learner, combined)
    return learner, metrics, self.layout.flatten(learner.meta_params)

  def _broadcast(self, meta_params):
    """Theta for this step's calls, flat float32: one object-store copy shared by every
    worker, or, when small, the array itself (Ray then inlines it in each call; a
    `ray.put` costs a store round trip, ~2 ms per step here for a 3 KB theta). A
    compiled graph takes the array itself whatever its size (its channels copy it once
    per node)."""
    last, flat = self._flat_theta
    if last is not meta_params:
      flat = np.asarray(self._flatten(meta_params))
    small = flat.nbytes <= self.inline_theta_bytes
    return flat if small or self.scheduler.compiled_graph else ray.put(flat)

  def _new_handle(self) -> RayPools:
    self._pools_id = int.from_bytes(os.urandom(4), "little")
    return RayPools(pools_id=jnp.asarray(self._pools_id, jnp.uint32))

  def _check_handle(self, states) -> None:
    if not isinstance(states, RayPools):
      raise ValueError(f"RayMetaTrainer expects the RayPools handle from its init/step, got "
                       f"{type(states).__name__}; restore checkpointed pools with scatter_states")
    if int(states.pools_id) != self._pools_id:
      # A handle from another process (e.g. a checkpoint restored without
      # scatter_states): its pools are not on these workers, so start fresh ones.
      log.warning("pool handle does not match this trainer's pools; re-initializing them")
      self.scheduler.reset()
      self._pools_id = int(states.pools_id)
