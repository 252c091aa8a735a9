"""Exact recovery of a worker's pools, and the learner's calls that read or replace
whole pools (checkpoints, snapshots).

A worker's pools are a function of where they started (fresh pools of the run's seed
initialized with some theta, or states restored from a checkpoint) and of the runs
since: a run advances every shard `accumulate` truncations with the keys of its
version and the theta it was sent. The learner holds every theta it sends, so it keeps
per worker that starting point and the (version, theta) of each run whose result came
back (`PoolHistory`). A restarted worker (its process or its node died) is sent a
`worker.Restore`: it rebuilds the starting point and replays those runs (the same
compiled programs on the same keys and theta, so bit-identical pools), then runs the
step it was asked for. Its estimates, and the run's meta-parameters, are those of an
undisturbed run.

Cost: nothing per step in the common case (a reference to theta, which the learner
has anyway, per worker and step). What is kept and replayed is bounded by a
*snapshot*: every `snapshot_every` runs of a worker, and whenever a checkpoint gathers
the pools, its pool states become the new starting point (an actor call sent between
steps and collected later, never waited for).

Where exactness is impossible the step says so: a step's `inexact` metric is 1 when
its estimate is not the one a synchronous undisturbed run computes (estimates left out
by a quorum or timeout, stale estimates, or pools that skipped a version: a straggler
sent a newer theta, the asynchronous mode).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import ray
import ray.exceptions

from learned_opt.meta_train.distributed.worker import Restore

# Errors meaning "this actor's process is gone or unreachable" (not a bug in the call).
ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


@dataclasses.dataclass
class PoolHistory:
  """The learner's record of one worker's pools: a starting point and the runs since.

  Attributes:
    base_seq, base_states, base_theta: the starting point (see `worker.Restore`): runs
      it had gone through, its states (None: fresh pools of `base_theta`; a theta of
      None is that of the first call sent).
    base_version: version of the starting point's last run (None: none yet).
    runs: [(seq, version, theta)] of the runs whose results came back since.
    exact: the pools went through consecutive versions since they started, as in a
      synchronous undisturbed run.
    broken: a run arrived out of order (a bug): the record cannot rebuild the pools,
      so the next restore starts fresh pools (inexact) instead.
  """
  base_seq: int = 0
  base_states: dict | None = None
  base_theta: Any = None
  base_version: int | None = None
  runs: list = dataclasses.field(default_factory=list)
  exact: bool = True
  broken: bool = False

  @property
  def seq(self) -> int:
    """Runs the recorded pools have gone through."""
    return self.runs[-1][0] if self.runs else self.base_seq

  @property
  def version(self) -> int | None:
    return self.runs[-1][1] if self.runs else self.base_version

  def restore(self, theta) -> Restore:
    """What a call carrying `theta` sends to rebuild the recorded pools."""
    if self.broken or (self.base_states is None and self.base_theta is None):
      return Restore(0, None, None, ())   # fresh pools of the call's theta
    # The call's own theta need not travel twice.
    init_theta = None if self.base_theta is theta else self.base_theta
    return Restore(self.base_seq, self.base_states, init_theta,
                   tuple((version, th) for _, version, th in self.runs))

  def sent(self, theta) -> None:
    """A call with `theta` carrying `restore(theta)` was sent."""
    if self.broken:
      # Fresh pools of this theta are all that can be built: no longer the run's.
      self.base_seq, self.base_states, self.base_theta, self.base_version = 0, None, None, None
      self.runs, self.broken, self.exact = [], False, False
    if self.base_states is None and self.base_theta is None:
      self.base_theta = theta   # fresh pools start from the first theta sent

  def received(self, seq: int, version: int, theta) -> bool:
    """A run's result came back: the worker's pools went through run `seq` (version
    `version`, sent `theta`). False if it does not follow the record (see `broken`)."""
    if seq != self.seq + 1:
      # Every call starts from the pools of the last result received (a call whose
      # result was not read is rewound first), so runs arrive in order.
      self.broken = True
      return False
    if self.version is not None and version != self.version + 1:
      self.exact = False
    self.runs.append((seq, version, theta))
    return True

  def snapshot(self, seq: int, states: dict) -> None:
    """The worker's pool states after run `seq`: the new starting point (if newer, and
    a state the learner has seen the result of)."""
    if not self.base_seq < seq <= self.seq:
      return
    kept = [r for r in self.runs if r[0] > seq]
    self.base_version = next(r[1] for r in self.runs if r[0] == seq)
    self.base_seq, self.base_states, self.base_theta, self.runs = seq, states, None, kept


class PoolStates:
  """The whole-pool calls of `scheduler.Scheduler` (its base class; it sets up `slots`
  with their `history`, `prefetched`, `accumulate`, `snapshot_every` and `_applied`,
  and provides `_lost` and `_graph_discard`)."""

  def _restore_for(self, slot, theta) -> Restore | None:
    """What `slot`'s next call carries: None while the worker holds its pools."""
    if slot.initialized:
      return None
    if slot.snapshot_ref is not None:
      # Taken before the worker was lost (a lost actor's calls fail at once): the
      # newest starting point there is, and the shortest replay.
      self._collect_snapshots(slots=[slot], wait=True)
    return slot.history.restore(theta)

  def _call_all(self, call: Callable[[Any], Any], slots: Sequence[Any] | None = None) -> dict:
    """Runs `call(slot)` on every worker (or on `slots`), re-issuing it on workers that die."""
    results = {}
    todo = list(self.slots if slots is None else slots)
    while todo:
      refs = {s.index: call(s) for s in todo}
      again = []
      for slot in todo:
        try:
          results[slot.index] = ray.get(refs[slot.index])
          slot.recovering, slot.reported, slot.backoff_s = False, False, 0.0
        except ACTOR_LOST as e:
          self._lost(slot, e)
          again.append(slot)
      if again:
        time.sleep(max(0.0, max(s.retry_at for s in again) - time.monotonic()))
      todo = again
    return results

  def get_states(self, theta, *, seed: int) -> dict:
    """{(family, shard): host pool state} from every worker (restoring lost ones), as
    of before any prefetched call (those are still to be applied). Each worker's
    states become its new starting point."""
    self._collect_snapshots()

    def call(slot):
      restore = self._restore_for(slot, theta)
      if restore is not None:
        slot.history.sent(theta)
      slot.initialized = True
      before = self.prefetched if slot.undo is None else slot.undo
      return slot.actor.get_states.remote(theta, epoch=slot.epoch, seed=seed, restore=restore,
                                          accumulate=self.accumulate, before=before)
    out = {}
    for index, result in self._call_all(call).items():
      slot = self.slots[index]
      if result["status"] != "ok":
        # Restarted since its last call (e.g. during a prefetched one): restore it.
        slot.epoch, slot.initialized = slot.epoch + 1, False
        result = self._call_all(call, [slot])[index]
      slot.history.snapshot(result["seq"], result["states"])
      out.update(result["states"])
    return out

  def set_states(self, by_shard: dict) -> None:
    """Replaces every worker's pools (a restored run: outer steps may be replayed, so
    the record of applied estimates restarts); calls in flight become stale."""
    self._applied = set()
    self.prefetched = None
    self._graph_discard()

    def call(slot):
      slot.epoch += 1
      slot.initialized = True
      slot.done_version = -1
      slot.undo = None
      slot.snapshot_ref = None
      mine = {(sh.family, sh.index): by_shard[sh.family, sh.index] for sh in slot.shards}
      slot.history = PoolHistory(base_states=mine)
      return slot.actor.set_states.remote(mine, epoch=slot.epoch, seq=0)
    self._call_all(call)

  # ---- snapshots --------------------------------------------------------------------
  def request_snapshots(self, *, seed: int, next_version: int) -> None:
    """Asks idle workers with `snapshot_every` runs recorded since their starting point
    for their pool states (collected by a later `_collect_snapshots`, never waited for).
    Called between steps, before step `next_version` is sent: `before` keeps that
    step's run (a prefetch the learner may yet discard) out of the snapshot."""
    for slot in self.slots:
      due = len(slot.history.runs) >= self.snapshot_every
      if due and slot.initialized and slot.ref is None and slot.undo is None and slot.snapshot_ref is None:
        ref = slot.actor.get_states.remote(None, epoch=slot.epoch, seed=seed, restore=None,
                                           before=next_version)
        slot.snapshot_ref = (slot.epoch, ref)

  def _collect_snapshots(self, slots: Sequence[Any] | None = None, wait: bool = False) -> None:
    """Takes in the snapshots that have arrived (of `slots`, default all; `wait`: waits
    for them). A worker lost meanwhile is noticed by its next call, so errors here are
    only consumed (Ray would print an unread error when the ref is dropped)."""
    pending = [s for s in (self.slots if slots is None else slots) if s.snapshot_ref is not None]
    if not pending:
      return
    ready, _ = ray.wait([s.snapshot_ref[1] for s in pending], num_returns=len(pending),
                        timeout=None if wait else 0)
    ready = set(ready)
    for slot in pending:
      epoch, ref = slot.snapshot_ref
      if ref not in ready:
        continue
      slot.snapshot_ref = None
      try:
        result = ray.get(ref)
      except ACTOR_LOST:
        continue
      # A lost worker's epoch moved on, but its snapshot predates the loss and is
      # checked against the record (`PoolHistory.snapshot`).
      if result["status"] == "ok" and epoch == result["epoch"]:
        slot.history.snapshot(result["seq"], result["states"])
