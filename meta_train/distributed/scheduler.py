"""The learner's side of the Ray pool: shard layout, dispatch, quorum, staleness,
failures, and the gathering of shard estimates.

Written by hand rather than with `ray.util.ActorPool` because that pool puts a
still-busy actor back on timeout (a running jitted unroll cannot be cancelled), and
because work here is tied to the actor that holds the shard states.

Rules, per outer step `t` (the *version* of theta it broadcasts):
  * every idle worker that has not yet finished version t is sent theta_t; a worker
    still busy with an older version keeps running and is sent theta_t when it
    returns, so a straggler never has two calls queued;
  * a result is accepted if it comes from the worker's current *epoch* (pools the
    learner initialized or restored; a restarted actor starts empty and answers
    "uninitialized") and its version is at least t - max_staleness;
  * the step ends when `quorum` of the units (shard x accumulation estimates; one
    worker-combined estimate counts for the shards it covers) are in
    and either nothing of version t is still running or `timeout_s` has passed;
  * a worker that dies (process or node) is restarted by Ray (max_restarts=-1); the
    learner bumps its epoch and re-sends version t with a `Restore`: the worker
    rebuilds its pools as they were after the last result the learner received
    (recovery.py), never from state half-built before the crash, and its units are
    those of an undisturbed run.
Ray's own task retries are off: a finite retry budget can be spent before a dead node
is declared, and units are defined by seeds, so re-issuing one from here is safe.
Every accepted unit key (version, accumulation, family, shard) is applied once: a
repeat raises instead of being averaged in twice.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import ray
import ray.exceptions

from learned_opt.meta_train.distributed.graph import GraphSteps
from learned_opt.meta_train.distributed.recovery import ACTOR_LOST, PoolHistory, PoolStates
from learned_opt.meta_train.distributed.worker import RunCall, Shard

_POLL_S = 30.0


# ---- the shard layout: fixed by the config, not by the number of workers -----------
def make_shards(num_tasks: Sequence[int], tasks_per_shard: int) -> list[Shard]:
  """Cuts each estimator's pool into shards of `tasks_per_shard` consecutive tasks.

  Args:
    num_tasks: pool size of each estimator (family), in order.
    tasks_per_shard: tasks per shard; must divide every pool size.
  """
  if not isinstance(tasks_per_shard, int) or tasks_per_shard < 1:
    raise ValueError(f"tasks_per_shard must be a positive int, got {tasks_per_shard!r}")
  shards = []
  for f, n in enumerate(num_tasks):
    if n % tasks_per_shard:
      raise ValueError(f"tasks_per_shard={tasks_per_shard} does not divide estimator {f}'s "
                       f"num_tasks={n}; expected a divisor of every pool size")
    shards += [Shard(f, s, s * tasks_per_shard, (s + 1) * tasks_per_shard)
               for s in range(n // tasks_per_shard)]
  return shards


def assign_shards(shards: Sequence[Shard], num_workers: int) -> list[list[Shard]]:
  """Balanced contiguous blocks of shards, one block per worker."""
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
  if num_workers > len(shards):
    raise ValueError(f"num_workers={num_workers} exceeds the {len(shards)} shards of the pools; "
                     "use fewer workers, more tasks, or a smaller tasks_per_shard")
  bounds = np.linspace(0, len(shards), num_workers + 1).round().astype(int)
  return [list(shards[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def gather_rows(units: dict) -> np.ndarray:
  """The rows of a step's accepted units ({key: (rows, row)}) in global (version,
  accumulation, family, shard) order: the same array, so the same sum, for any number
  of workers. A reply that holds them all in that order (one worker) is used as is."""
  keys = sorted(units)
  first = units[keys[0]][0]
  if len(first) == len(keys) and all(units[k][0] is first and units[k][1] == i for i, k in enumerate(keys)):
    return first
  return np.stack([units[k][0][units[k][1]] for k in keys])


@dataclasses.dataclass
class _Slot:
  """The learner's view of one worker actor."""
  index: int
  shards: list
  actor: Any
  epoch: int = 0
  initialized: bool = False
  ref: Any = None           # the call in flight (at most one)
  ref_version: int = -1
  ref_theta: Any = None     # the theta it carries (recorded with its result)
  ref_replays: int = -1     # runs it replays before its own (-1: no restore)
  sent_at: float = 0.0      # wall-clock time the call in flight was sent
  done_version: int = -1    # newest version whose result came back in this epoch
  undo: int | None = None   # version of a discarded prefetched call the next call rewinds
  recovering: bool = False  # lost, and no call has succeeded since
  reported: bool = False    # its loss is logged (one line per fault)
  retry_at: float = 0.0     # monotonic time before which it is not sent work
  backoff_s: float = 0.0
  history: PoolHistory = dataclasses.field(default_factory=PoolHistory)
  snapshot_ref: Any = None  # (epoch, ref) of a snapshot of its pools not yet collected


class Scheduler(GraphSteps, PoolStates):
  """Dispatches outer steps to worker actors and gathers their shard estimates.

  Args:
    make_actor: shards -> a new actor handle (a `PoolWorker`).
    assignment: the shards of each worker.
    num_units: estimates per step when every worker reports (accumulate x shards).
    accumulate, quorum, timeout_s, max_staleness, max_failures, combine_on_worker: see
      `RayMetaTrainer`.
    log: where failures and stragglers are reported.
    compiled_graph: run synchronous steps (quorum 1.0, no timeout, no staleness) as one
      Ray compiled graph over all workers (graph.py) instead of one actor call per
      worker; any other step, and any step after a worker failure until every worker
      is healthy again, uses actor calls.
    snapshot_every: runs of a worker after which its pool states become the starting
      point of its recovery (recovery.py): bounds the thetas kept and the replay.
  """

  def __init__(self, make_actor: Callable[[list], Any], assignment: Sequence[list], *,
               num_units: int, accumulate: int, quorum: float, timeout_s: float | None,
               max_staleness: int, max_failures: int, log: logging.Logger,
               combine_on_worker: bool = False, compiled_graph: bool = False,
               snapshot_every: int = 100):
    if not isinstance(snapshot_every, int) or snapshot_every < 1:
      raise ValueError(f"snapshot_every must be a positive int, got {snapshot_every!r}")
    self.snapshot_every = snapshot_every
    self.num_units = num_units
    self.accumulate = accumulate
    self.combine_on_worker = combine_on_worker
    self.set_policy(quorum=quorum, timeout_s=timeout_s, max_staleness=max_staleness)
    self.slots = [_Slot(i, list(shards), make_actor(list(shards))) for i, shards in enumerate(assignment)]
    self.max_failures = max_failures
    self.failures = 0
    self.log = log
    self._applied: set = set()
    self.prefetched: int | None = None   # version sent ahead by `prefetch`, not yet run_step'ed
    self.compiled_graph = compiled_graph
    self._graph: StepGraph | None = None
    self._graph_ref = None                # (ref of the replies, version) of the graph step in flight
    self._graph_retry_at = 0.0

  def set_policy(self, *, quorum: float, timeout_s: float | None, max_staleness: int) -> None:
    """Sets the straggler and staleness policy (takes effect at the next step)."""
    if not (isinstance(quorum, (int, float)) and 0.0 < quorum <= 1.0):
      raise ValueError(f"quorum must be in (0, 1], got {quorum!r}")
    if timeout_s is not None and not timeout_s >= 0:
      raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
    if not isinstance(max_staleness, int) or max_staleness < 0:
      raise ValueError(f"max_staleness must be an int >= 0 (0: synchronous), got {max_staleness!r}")
    self.required = max(1, math.ceil(quorum * self.num_units - 1e-9))
    self.timeout_s = timeout_s
    self.max_staleness = max_staleness

  # ---- one outer step ------------------------------------------------------------------
  def reset(self) -> None:
    """Starts a new run: forgets every worker's pools (the next call re-initializes them)
    and which estimates were applied."""
    self._applied = set()
    self.prefetched = None
    self._graph_discard()
    for slot in self.slots:
      slot.epoch += 1
      slot.initialized = False
      slot.done_version = -1
      slot.undo = None
      slot.snapshot_ref = None
      slot.history = PoolHistory()   # fresh pools of the run's seed

  def run_step(self, theta, *, seed: int, version: int) -> tuple[dict, dict]:
    """Gathers unit estimates for outer step `version`.

    Returns:
      ({(version, j, family, shard): (float32 rows [n, width], row)}, scalar stats).
      Stats include `inexact` (1: the estimate is not a synchronous undisturbed run's:
      units left out, stale ones, or pools that skipped a version) and `dropped_shards`
      (units of this step not applied).
    """
    stats = {"units_used": 0, "units_total": self.num_units, "units_dropped_stale": 0,
             "worker_failures": 0, "pool_inits": 0, "runs_replayed": 0, "staleness": 0.0,
             "worker_compute_s": 0.0, "transit_to_s": 0.0, "transit_back_s": 0.0,
             "graph_step": 0, "inexact": 0, "dropped_shards": 0}
    accepted: dict = {}
    start = time.monotonic()
    last_report = start
    self.prefetched = None
    if self._graph_ref is not None and self._graph_ref[1] != version:
      self._graph_discard()
    if self._graph_ref is None and self._graph_usable(theta):
      self._graph_send(theta, seed, version)   # on failure, actor calls below
    if self._graph_ref is not None:
      # Every worker's reply at once; after a failure the loop below redoes the step
      # with actor calls.
      self._graph_receive(version, accepted, stats)
    self._dispatch_idle(theta, seed, version)
    while True:
      running_current = any(s.ref is not None and s.ref_version == version for s in self.slots)
      enough = sum(n for _, n in accepted.values()) >= self.required
      elapsed = time.monotonic() - start
      if enough and (not running_current or (self.timeout_s is not None and elapsed >= self.timeout_s)):
        break
      refs = [s.ref for s in self.slots if s.ref is not None]
      waits = [_POLL_S]
      if enough and self.timeout_s is not None:
        waits.append(max(0.0, self.timeout_s - elapsed))
      # Workers backing off while Ray restarts them get their retry when it is due.
      waits += [max(0.0, s.retry_at - time.monotonic()) for s in self.slots
                if s.ref is None and s.done_version < version]
      wait = min(waits)
      if not refs:
        time.sleep(wait)
        self._dispatch_idle(theta, seed, version)
        continue
      ready, _ = ray.wait(refs, num_returns=1, timeout=wait)
      if ready:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
      for ref in ready:
        slot = next(s for s in self.slots if s.ref is not None and s.ref == ref)
        self._receive(slot, version, accepted, stats)
      self._dispatch_idle(theta, seed, version)
      now = time.monotonic()
      if not ready and now - last_report >= _POLL_S:
        waiting = [s.index for s in self.slots if s.ref is not None]
        self.log.warning("step %d: %d of %d estimates after %.0f s; waiting for workers %s",
                         version, sum(n for _, n in accepted.values()), self.required,
                         now - start, waiting)
        last_report = now
    dup = self._applied.intersection(accepted)
    if dup:
      raise RuntimeError(f"estimates {sorted(dup)[:3]} were already applied; refusing to apply "
                         "them twice")
    self._applied.update(accepted)
    self._applied = {k for k in self._applied if k[0] >= version - self.max_staleness}
    used = sum(n for _, n in accepted.values())
    stats["units_used"] = used
    if accepted:
      stats["staleness"] = sum(n * (version - k[0]) for k, (_, n) in accepted.items()) / used
    stats["dropped_shards"] = self.num_units - used
    stats["inexact"] = int(bool(stats["inexact"] or stats["dropped_shards"] or stats["staleness"]))
    stats["wait_s"] = time.monotonic() - start
    self._collect_snapshots()
    return {k: est for k, (est, _) in accepted.items()}, stats

  def prefetch(self, theta, *, seed: int, version: int) -> None:
    """Sends step `version` to the idle workers now, ahead of its `run_step`: the
    workers compute while the caller logs, checkpoints or builds the next step. The
    calls become that `run_step`'s calls; `discard_prefetch` undoes them instead."""
    sent = self._graph_ref is None and self._graph_usable(theta) and self._graph_send(theta, seed, version)
    if not sent:
      self._dispatch_idle(theta, seed, version)
    self.prefetched = version

  def discard_prefetch(self) -> None:
    """Forgets the prefetched calls: their results are never read, and each worker's
    next call first rewinds its pools to before them (calls to one actor run in order),
    so the run goes on as if they had not been sent."""
    self._graph_discard()
    for slot in self.slots:
      if slot.ref is not None and slot.ref_version == self.prefetched:
        slot.ref, slot.undo = None, self.prefetched
    self.prefetched = None

  def _dispatch_idle(self, theta, seed, version) -> None:
    now = time.monotonic()
    for slot in self.slots:
      if slot.ref is None and slot.done_version < version and slot.retry_at <= now:
        call = self._call(slot, seed, version, theta)
        sent_at = time.time()   # before the call: the worker may enter it before `remote` returns
        slot.ref = slot.actor.run.remote(theta, call)
        self._sent(slot, call, sent_at, theta)

  def _call(self, slot: _Slot, seed: int, version: int, theta) -> RunCall:
    """The settings of `slot`'s call for step `version` with `theta`."""
    return RunCall(slot.epoch, seed, version, self.accumulate, self._restore_for(slot, theta),
                   self.combine_on_worker, slot.undo)

  @staticmethod
  def _sent(slot: _Slot, call: RunCall, sent_at: float, theta) -> None:
    """Notes `call` (with `theta`) as sent to `slot` at wall-clock time `sent_at`."""
    slot.sent_at, slot.undo, slot.ref_version, slot.ref_theta = sent_at, None, call.version, theta
    slot.ref_replays = -1 if call.restore is None else len(call.restore.replay)
    if call.restore is not None:
      slot.history.sent(theta)
    # Optimistic: if this call fails, the pools are marked lost again.
    slot.initialized = True

  def _receive(self, slot: _Slot, version: int, accepted: dict, stats: dict) -> None:
    ref, slot.ref = slot.ref, None
    try:
      result = ray.get(ref)
      received = time.time()
    except ACTOR_LOST as e:
      stats["worker_failures"] += self._lost(slot, e)
      return
    self._accept(slot, result, received, version, accepted, stats)

  def _accept(self, slot: _Slot, result: dict, received: float, version: int, accepted: dict,
              stats: dict) -> None:
    """Takes in `slot`'s reply to a call of step `version` (received at `received`)."""
    slot.recovering, slot.backoff_s = False, 0.0
    if result["status"] == "uninitialized" or result["epoch"] != slot.epoch:
      # A restarted actor, or a result of pools the learner has since replaced.
      if result["status"] == "uninitialized":
        if not slot.reported:
          self.log.warning("worker %d was restarted (its pools are gone); restoring them "
                           "exactly", slot.index)
        slot.epoch += 1
        slot.initialized = False
      return
    slot.reported = False
    if slot.ref_replays >= 0:
      stats["pool_inits"] += 1
      stats["runs_replayed"] += slot.ref_replays
    slot.done_version = max(slot.done_version, result["version"])
    if not slot.history.received(result["seq"], result["version"], slot.ref_theta):
      self.log.warning("worker %d: run %d arrived out of order; if it is lost its pools restart "
                       "fresh (inexact)", slot.index, result["seq"])
    stats["inexact"] |= int(not slot.history.exact)
    if version - result["version"] > self.max_staleness:
      stats["units_dropped_stale"] += sum(n for _, _, n in result["units"])
      return
    for key, row, covers in result["units"]:
      if key in accepted:
        raise RuntimeError(f"estimate {key} arrived twice in one step; refusing to apply it twice")
      accepted[key] = ((result["rows"], row), covers)
    if result["version"] == version:
      stats["worker_compute_s"] = max(stats["worker_compute_s"], result["compute_s"])
      # Wall-clock stamps of two processes: exact on one machine, clock skew across nodes.
      # A prefetched result that is ready before its step waits for it counts that wait.
      stats["transit_to_s"] = max(stats["transit_to_s"], result["entered"] - slot.sent_at)
      stats["transit_back_s"] = max(stats["transit_back_s"], received - result["left"])

  def _lost(self, slot: _Slot, error: Exception) -> int:
    """Marks the worker's pools lost and backs off its next call; returns 1 for a new
    failure, 0 for a call refused while Ray is still restarting the actor."""
    slot.epoch += 1
    slot.initialized = False
    slot.done_version = -1
    self._graph_drop()   # the actor's restart broke the graph's channels to it
    slot.backoff_s = min(2.0, max(0.1, 2 * slot.backoff_s))
    slot.retry_at = time.monotonic() + slot.backoff_s
    slot.recovering = True
    if slot.reported and isinstance(error, ray.exceptions.ActorUnavailableError):
      return 0   # refused while Ray restarts the actor: the same fault, logged already
    slot.reported = True
    self.failures += 1
    why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    self.log.warning("worker %d lost (%s); Ray restarts it and its pools are restored exactly "
                     "(failure %d of at most %d)", slot.index, why, self.failures, self.max_failures)
    if self.failures > self.max_failures:
      raise RuntimeError(f"{self.failures} worker failures exceed max_failures={self.max_failures}; "
                         "see the log of lopt.ray for their causes")
    return 1

  def close(self) -> None:
    self._graph_drop()
    # Graphs given up after a failure may still await collection: free them while Ray
    # is up (see graph.StepGraph.teardown).
    gc.collect()
    for slot in self.slots:
      try:
        ray.kill(slot.actor, no_restart=True)
      except Exception:  # already gone or Ray already shut down: nothing to stop
        pass
    self.slots = []
