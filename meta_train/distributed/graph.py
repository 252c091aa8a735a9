"""One outer step as a Ray compiled graph: theta and every worker's `RunCall` go out in
one `execute`, all replies come back through one ref.

An actor call costs three thread wake-ups each way (caller, Ray's io threads, the
actor's executor); a compiled graph keeps a loop running in each actor that reads its
input from a shared-memory channel (or a remote one across nodes), so a step's round
trip drops from ~3.3 to ~1.5 ms on this project's 2-core machine (docs/ray.md). The
graph serves the synchronous case only (quorum 1.0, no timeout, no staleness): all
workers get the same step and the learner needs all replies. Quorum, timeouts,
staleness and recovery from failures stay with actor calls (scheduler.py), which
falls back to them when a graph step fails and rebuilds the graph once every worker
is healthy again.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Sequence

import numpy as np
import ray
import ray.exceptions
from ray.dag import InputNode, MultiOutputNode

# A worker (process or node) gone while the graph ran, or the graph's channels broken
# by it: the step is redone with actor calls. Errors raised by lopt's own code in a
# worker (RayTaskError) are bugs and propagate.
GRAPH_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
              ray.exceptions.RayChannelError)
_GRAPH_RETRY_S = 30.0   # after a failed graph compile, actor calls only for this long


class _QuietTeardown(logging.Filter):
  """Drops what Ray's compiled graph logs when it is torn down: four INFO lines per
  teardown, and, after a worker died, "Error cancelling worker task" with the full
  traceback of the dead actor's RayActorError (its loop cannot be cancelled: it is
  gone). The scheduler reports such a loss in one line; other records pass."""

  CHATTER = ("Tearing down compiled DAG", "Cancelling compiled worker on actor",
             "Waiting for worker tasks to exit", "Teardown complete")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if record.levelno <= logging.INFO and message.startswith(self.CHATTER):
      return False
    dead_actor = record.exc_info is not None and isinstance(record.exc_info[1], ray.exceptions.RayActorError)
    return not (message.startswith("Error cancelling worker task") and dead_actor)


_DAG_LOG = logging.getLogger("ray.dag.compiled_dag_node")   # the logger of Ray's module
if not any(isinstance(f, _QuietTeardown) for f in _DAG_LOG.filters):
  _DAG_LOG.addFilter(_QuietTeardown())


class StepGraph:
  """A compiled graph calling `run(theta, call_i)` on every actor, in actor order.

  Args:
    actors: the worker actors (`PoolWorker` handles), one per scheduler slot.
  """

  def __init__(self, actors: Sequence[Any]):
    with InputNode() as inp:
      dag = MultiOutputNode([a.run.bind(inp[0], inp[i + 1]) for i, a in enumerate(actors)])
    self._compiled = dag.experimental_compile()
    self.actors = list(actors)

  def execute(self, theta, calls: Sequence[Any]):
    """Sends one step (theta a numpy array: graphs do not take ObjectRefs); returns
    the refs of the replies, one per actor (read them with `read`)."""
    if len(calls) != len(self.actors):
      raise ValueError(f"expected {len(self.actors)} calls (one per worker), got {len(calls)}")
    return self._compiled.execute(theta, *calls)

  @staticmethod
  def read(refs) -> list:
    """The replies of one `execute`, waiting as long as the step runs (a graph ref can
    be read once, so a read that timed out could not be retried)."""
    return [ref.get(timeout=-1) for ref in refs]

  def teardown(self) -> None:
    """Stops the actors' graph loops and frees the graph. After a failure Ray reports
    the actors it cannot reach in its log; the graph is gone either way."""
    if self._compiled is None:
      return
    try:
      self._compiled.teardown()
    except Exception:  # a dead actor's loop: nothing left to stop
      pass
    # The compiled graph and its channels sit in reference cycles; collected after
    # `ray.shutdown()`, their native buffers crashed the process (segfault in the next
    # test of the suite). Collect them now, while Ray is up.
    self._compiled = None
    gc.collect()


class GraphSteps:
  """The compiled-graph path of `scheduler.Scheduler` (its base class; the state
  it uses: `slots`, the policy, `compiled_graph`, `_graph`, `_graph_ref` and
  `_graph_retry_at`, is set up there)."""

  def _graph_usable(self, theta) -> bool:
    """Whether this step can go out as one compiled graph, building it if needed."""
    if not (self.compiled_graph and isinstance(theta, np.ndarray) and self.slots):
      return False
    if self.required < self.num_units or self.timeout_s is not None or self.max_staleness:
      return False
    now = time.monotonic()
    if any(s.ref is not None or s.recovering or s.retry_at > now for s in self.slots):
      return False   # a straggler still runs, or a worker is being restarted
    if self._graph is None:
      if now < self._graph_retry_at:
        return False
      try:
        self._graph = StepGraph([s.actor for s in self.slots])
      except ray.exceptions.RayError as e:
        self._graph_retry_at = now + _GRAPH_RETRY_S
        self.log.warning("could not compile the step graph (%s: %s); using actor calls",
                         type(e).__name__, (str(e).splitlines() or [''])[0])
        return False
    return True

  def _graph_send(self, theta, seed: int, version: int) -> bool:
    """Sends step `version` through the graph; False (nothing sent) if the graph's
    channels broke since it was built (an actor restarted between steps)."""
    calls = [self._call(slot, seed, version, theta) for slot in self.slots]
    # Stamped before `execute`: the workers may start the step before it returns.
    sent_at = time.time()
    try:
      self._graph_ref = (self._graph.execute(theta, calls), version)
    except GRAPH_LOST as e:
      # An actor restarted between steps: its next actor call reports it (one line).
      self.log.info("the step graph is broken (%s: %s); using actor calls until it is rebuilt",
                    type(e).__name__, (str(e).splitlines() or [''])[0])
      self._graph_drop()
      return False
    for slot, call in zip(self.slots, calls):
      self._sent(slot, call, sent_at, theta)
    return True

  def _graph_drop(self) -> None:
    """Tears the graph down (it is rebuilt when every worker is healthy). A step in
    flight in it is given up: each worker's next call first rewinds its pools to
    before that step, in case it ran."""
    if self._graph_ref is not None:
      for slot in self.slots:
        slot.undo = self._graph_ref[1]
      self._graph_ref = None
    if self._graph is not None:
      self._graph.teardown()
      self._graph = None

  def _graph_receive(self, version: int, accepted: dict, stats: dict) -> None:
    ref, sent_version = self._graph_ref
    self._graph_ref = None
    try:
      results = StepGraph.read(ref)
      received = time.time()
    except GRAPH_LOST as e:
      self._graph_failed(e, sent_version)
      stats["worker_failures"] += 1
      return
    for slot, result in zip(self.slots, results):
      self._accept(slot, result, received, version, accepted, stats)
    stats["graph_step"] = 1

  def _graph_discard(self) -> None:
    """Waits out a graph step whose replies are not wanted; each worker's next call
    rewinds its pools to before it."""
    if self._graph_ref is None:
      return
    ref, sent_version = self._graph_ref
    self._graph_ref = None
    try:
      StepGraph.read(ref)
    except GRAPH_LOST as e:
      self._graph_failed(e, sent_version)
      return
    for slot in self.slots:
      slot.undo = sent_version

  def _graph_failed(self, error: Exception, version: int) -> None:
    """A worker died during a graph step: the graph is torn down (rebuilt once every
    worker answers actor calls again), and the workers that did run the step rewind
    their pools before redoing it, so the step's estimates are those of one run."""
    self._graph_drop()
    self.failures += 1
    why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    dead = getattr(error, "actor_id", None)
    who = [f"worker {s.index}" for s in self.slots if s.actor._actor_id.hex() == dead]
    for slot in self.slots:
      slot.reported = slot.reported or slot.actor._actor_id.hex() == dead   # logged here
    # Unnamed (a broken channel, say), the worker's next actor call reports it: one
    # warning per fault either way.
    (self.log.warning if who else self.log.info)(
        "%s lost during the compiled-graph step %d (%s); Ray restarts it and the step is "
        "redone with actor calls (failure %d of at most %d)",
        (who or ["a worker"])[0], version, why, self.failures, self.max_failures)
    if self.failures > self.max_failures:
      raise RuntimeError(f"{self.failures} worker failures exceed max_failures={self.max_failures}; "
                         "see the log of lopt.ray for their causes")
    for slot in self.slots:
      slot.undo = version
      slot.recovering = True   # no graph until every worker has answered an actor call

