"""The worker side of the Ray pool: the actor that holds shards of the task pools, and
what travels between it and the learner (flat float32 rows, host arrays).

See pool.py for the design; scheduler.py is the learner's side.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import ray

from learned_opt.meta_train.learner import outer
from learned_opt.meta_train.estimators import base as estimator_base
from learned_opt.meta_train.estimators.base import COUNT_NAMES, GradEstimate, combine_estimates



# ---- host transfer ---------------------------------------------------------------------
def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(tree: Any) -> Any:
  """Numpy leaves, typed PRNG keys as their raw uint32 data (plain arrays travel
  through Ray's object store without copies)."""
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def theta_shapes(lopt) -> Any:
  """Shapes and dtypes of `lopt`'s meta-parameters."""
  return jax.eval_shape(lopt.init_meta_params, jax.random.key(0))


def from_host(tree: Any, template: Any) -> Any:
  """Inverse of `to_host`; `template` (arrays or `jax.eval_shape` structs) says which
  leaves are keys."""
  def back(t, x):
    return jax.random.wrap_key_data(jnp.asarray(x)) if _is_key(t) else jnp.asarray(x)
  return jax.tree.map(back, template, tree)


def _fetched(theta):
  """A theta the learner recorded: the array, or the object-store copy it was sent as
  (large theta; a reference inside an argument is not resolved by Ray)."""
  return ray.get(theta) if isinstance(theta, ray.ObjectRef) else theta


class Shard(NamedTuple):
  """Tasks [start, stop) of estimator `family`'s pool; `index` is the shard's number
  within that pool."""
  family: int
  index: int
  start: int
  stop: int


class Restore(NamedTuple):
  """How a worker rebuilds its pools before a call (recovery.py keeps what it needs).

  seq: the number of runs its starting point had gone through.
  states: {(family, shard): host state} of the starting point; None: fresh pools of
    the run's seed, initialized with `theta`.
  theta: flat theta of the fresh pools (None: the call's own theta).
  replay: ((version, flat theta or its ObjectRef), ...): the runs to redo after the
    starting point, in order, with the keys of their version.
  """
  seq: int
  states: dict | None
  theta: Any
  replay: tuple


class RunCall(NamedTuple):
  """The settings of one `PoolWorker.run` call (see there)."""
  epoch: int
  seed: int
  version: int
  accumulate: int
  restore: Restore | None   # rebuild the pools first (None: use the ones held)
  combine: bool
  undo: int | None = None   # first rewind the pools to before this version's run


# ---- what travels: estimates and theta as flat float32 rows --------------------------
class RowLayout:
  """One `GradEstimate` as one float32 row [grad leaves raveled | meta_loss | num_pairs |
  counts], and theta as the grad part alone.

  Ray serializes every array of a message on its own (a pickle-5 buffer and metadata
  each): one row buffer instead of a ~15-leaf pytree halves the round trip of a step's
  call here (measured 3.5 -> 1.9 ms). Integer fields (pair and event counts) are exact
  in float32 below 2**24. The methods are traceable; `pack_many` and `mean_rows` are
  what jitted code on the workers and the learner calls.

  Args:
    meta_params: theta or its `jax.eval_shape`; every leaf must be floating point of at
      most 32 bits (it travels as float32 and is cast back).
    count_names: the keys of `GradEstimate.counts`, in row order.
  """

  def __init__(self, meta_params: Any, count_names: Sequence[str] = COUNT_NAMES):
    leaves, self.treedef = jax.tree.flatten(meta_params)
    for path, x in jax.tree_util.tree_flatten_with_path(meta_params)[0]:
      if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize <= 4):
        raise ValueError(f"meta-parameter {jax.tree_util.keystr(path)} has dtype {x.dtype}; "
                         "the Ray pool sends theta as float32 and expects floating leaves of "
                         "at most 32 bits")
    self.shapes = [tuple(x.shape) for x in leaves]
    self.dtypes = [x.dtype for x in leaves]
    self.offsets = np.cumsum([0] + [math.prod(sh) for sh in self.shapes]).tolist()
    self.grad_size = self.offsets[-1]
    self.count_names = tuple(count_names)
    self.width = self.grad_size + 2 + len(self.count_names)

  def flatten(self, tree: Any) -> jax.Array:
    """float32 [grad_size]."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])

  def unflatten(self, flat: jax.Array) -> Any:
    leaves = [flat[a:b].reshape(sh).astype(dt) for a, b, sh, dt in
              zip(self.offsets[:-1], self.offsets[1:], self.shapes, self.dtypes)]
    return jax.tree.unflatten(self.treedef, leaves)

  def pack(self, est: GradEstimate) -> jax.Array:
    scalars = [est.meta_loss, est.num_pairs] + [est.counts[k] for k in self.count_names]
    return jnp.concatenate([self.flatten(est.grad), jnp.stack(scalars).astype(jnp.float32)])

  def unpack(self, row: jax.Array) -> GradEstimate:
    g = self.grad_size
    return GradEstimate(grad=self.unflatten(row[:g]), meta_loss=row[g],
                        num_pairs=row[g + 1].astype(jnp.int32),
                        counts={k: row[g + 2 + i].astype(jnp.int32) for i, k in enumerate(self.count_names)})

  def pack_many(self, estimates: Sequence[GradEstimate]) -> jax.Array:
    """float32 [len(estimates), width]."""
    return jnp.stack([self.pack(e) for e in estimates])

  def mean_rows(self, rows: jax.Array) -> jax.Array:
    """The row of `combine_estimates` of rows [n, width] (the combine every trainer
    uses), so rows in a fixed order give the same result whichever workers they came
    from."""
    return self.pack(combine_estimates([self.unpack(rows[i]) for i in range(rows.shape[0])]))


# ---- the worker actor --------------------------------------------------------------------
class PoolWorker:
  """A Ray actor's body: the states of its shards and the estimators that advance them.

  Every call carries the learner's `epoch` for this worker: pools exist for one epoch
  only, so a restarted actor (empty) or one whose pools the learner has given up on
  answers "uninitialized" instead of estimating from state the learner did not ask for.

  `run` may arrive through a compiled graph (graph.py), whose loop runs on its own
  thread next to the actor's executor; a lock keeps pool reads and updates (`run`,
  `get_states`, `set_states`) one at a time.
  """

  def __init__(self, estimators: Sequence[Any], shards: Sequence[Shard], cache_dir: str | None):
    if cache_dir:
      # A restarted actor recompiles nothing the cluster has compiled before.
      jax.config.update("jax_compilation_cache_dir", cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    self._estimators = list(estimators)
    self._shards = list(shards)
    self._pools = None
    self._epoch = -1
    self._delay_s = 0.0
    self._layout = RowLayout(theta_shapes(self._estimators[0].lopt))
    # Theta arrives flat; one jitted unflatten puts it on the device once per call
    # rather than once per shard's estimate.
    self._unflatten = jax.jit(self._layout.unflatten)
    self._pack = jax.jit(self._pack_impl, static_argnums=1)
    self._steps_keys = {}
    self._seq = 0          # runs the pools have gone through (the learner's count, see Restore)
    self._before = None    # (epoch, version, pools, seq) the last run started from
    self._lock = threading.Lock()

  def node_id(self) -> str:
    return ray.get_runtime_context().get_node_id()

  def pid(self) -> int:
    return os.getpid()

  def inject_delay(self, seconds: float) -> None:
    """Makes every later `run` sleep first (straggler drills and tests)."""
    self._delay_s = float(seconds)

  def jit_cache_size(self) -> dict:
    """Compiled variants of the jitted functions a step runs in this process
    (no-recompile checks)."""
    return {"estimate": estimator_base._jit_estimate._cache_size(),
            "unflatten": self._unflatten._cache_size(), "pack": self._pack._cache_size()}

  def _init_pools(self, theta, seed: int, epoch: int) -> None:
    pools = {}
    for sh in self._shards:
      indices = jnp.arange(sh.start, sh.stop, dtype=jnp.int32)
      pools[sh.family, sh.index] = self._estimators[sh.family].init(
          outer.pool_key(seed, sh.family), theta, indices=indices)
    self._pools, self._epoch = pools, epoch

  def _restore(self, restore: Restore, theta, seed: int, epoch: int, accumulate: int) -> None:
    """Rebuilds the pools the learner recorded: the starting point, then its runs
    replayed with their own keys and theta (the same compiled programs on the same
    inputs: bit-identical pools)."""
    if restore.states is not None:
      self._set_states(restore.states, epoch=epoch, seq=restore.seq)
    else:
      init_theta = theta if restore.theta is None else self._unflatten(_fetched(restore.theta))
      self._init_pools(init_theta, seed, epoch)
      self._seq = restore.seq
    for version, flat in restore.replay:
      self._pools = self._advance(self._unflatten(_fetched(flat)), seed, version, accumulate)[0]
      self._seq += 1
    self._before = None

  def _keys(self, seed: int, version: int, accumulate: int) -> dict:
    if seed not in self._steps_keys:
      self._steps_keys[seed] = outer.run_keys(seed).steps
    # Keys depend on (step, j, family) only: derived once, not once per shard.
    return {(j, f): outer.estimate_key(self._steps_keys[seed], version, j, f)
            for j in range(accumulate) for f in sorted({sh.family for sh in self._shards})}

  def _advance(self, theta, seed: int, version: int, accumulate: int):
    """Every shard advanced `accumulate` truncations: (new pools, unit keys, estimates)."""
    keys = self._keys(seed, version, accumulate)
    pools, units, estimates = dict(self._pools), [], []
    for j in range(accumulate):
      for sh in self._shards:
        pools[sh.family, sh.index], est = self._estimators[sh.family].estimate(
            keys[j, sh.family], theta, pools[sh.family, sh.index])
        units.append(((version, j, sh.family, sh.index), 1))
        estimates.append(est)
    return pools, units, estimates

  def _ready(self, epoch: int) -> bool:
    return self._pools is not None and self._epoch == epoch

  def _pack_impl(self, estimates, groups):
    rows = self._layout.pack_many(estimates)
    if groups is None:
      return rows
    return jnp.stack([self._layout.mean_rows(rows[a:b]) for a, b in groups])

  def run(self, theta: np.ndarray, call: RunCall) -> dict:
    """Advances every shard `call.accumulate` truncations with theta (of outer step
    `call.version`).

    Args:
      theta: float32 [grad_size], the meta-parameters flattened by `RowLayout`.
      call: the step's settings (one argument: Ray serializes each argument on its own,
        and six keyword arguments cost 0.3 ms per call here).

    Returns {"status": "ok", "epoch", "version", "seq" (runs the pools have now gone
    through), "units": [((version, j, f, s), row, shards covered), ...], "rows": the
    estimates as float32 [rows, width] (`RowLayout`), "compute_s"} or {"status":
    "uninitialized", "epoch"}. With `combine`, one row per (j, f), the pair-weighted
    mean of its shards, keyed by its first shard.
    """
    entered = time.time()   # wall clock: the learner compares it with its own stamps
    with self._lock:
      return self._run(theta, call, entered)

  def _run(self, theta: np.ndarray, call: RunCall, entered: float) -> dict:
    epoch, seed, version, accumulate, restore, combine, undo = call
    if self._delay_s:
      time.sleep(self._delay_s)
    t0 = time.perf_counter()
    theta = self._unflatten(theta)
    if restore is not None:
      self._restore(restore, theta, seed, epoch, accumulate)
    if not self._ready(epoch):
      return {"status": "uninitialized", "epoch": epoch}
    if undo is not None and restore is None and self._before is not None and self._before[:2] == (epoch, undo):
      # The learner discarded that (prefetched) call.
      self._pools, self._seq = self._before[2], self._before[3]
    pools, units, estimates = self._advance(theta, seed, version, accumulate)
    groups = None
    if combine:  # units of one (j, f) are consecutive
      bounds = [i for i in range(len(units) + 1)
                if i in (0, len(units)) or units[i][0][:3] != units[i - 1][0][:3]]
      groups = tuple(zip(bounds[:-1], bounds[1:]))
      units = [(units[a][0], b - a) for a, b in groups]
    # One device->host copy of one buffer: the copy and Ray's serialization both cost
    # per array, and this is on every step's path.
    rows = np.asarray(self._pack(estimates, groups))
    # Committed only once every shard has advanced; the old pools are kept for a
    # checkpoint or an undo of this call while it is a prefetch.
    self._before, self._pools = (epoch, version, self._pools, self._seq), pools
    self._seq += 1
    return {"status": "ok", "epoch": epoch, "version": version, "seq": self._seq, "rows": rows,
            "units": [(k, row, n) for row, (k, n) in enumerate(units)],
            "compute_s": time.perf_counter() - t0, "entered": entered, "left": time.time()}

  def get_states(self, theta: np.ndarray | None, *, epoch: int, seed: int,
                 restore: Restore | None, accumulate: int = 1, before: int | None = None) -> dict:
    """{"status": "ok", "epoch", "seq", "states": the shards' pool states (host arrays)
    keyed by (family, shard)}, or {"status": "uninitialized", "epoch"}. If the last run
    was of version `before` (a prefetch), the states it started from. `restore` (and
    the `theta` and `accumulate` it needs) rebuilds the pools first."""
    with self._lock:
      return self._get_states(theta, epoch=epoch, seed=seed, restore=restore,
                              accumulate=accumulate, before=before)

  def _get_states(self, theta, *, epoch, seed, restore, accumulate, before) -> dict:
    if restore is not None:
      self._restore(restore, None if theta is None else self._unflatten(theta), seed, epoch, accumulate)
    if not self._ready(epoch):
      return {"status": "uninitialized", "epoch": epoch}
    pools, seq = self._pools, self._seq
    if before is not None and self._before is not None and self._before[:2] == (epoch, before):
      pools, seq = self._before[2], self._before[3]
    return {"status": "ok", "epoch": epoch, "seq": seq,
            "states": {k: to_host(v) for k, v in pools.items()}}

  def set_states(self, states: dict, *, epoch: int, seq: int = 0) -> dict:
    """Replaces the shards' pools by `states` ((family, shard) -> host state) that have
    gone through `seq` runs."""
    with self._lock:
      return self._set_states(states, epoch=epoch, seq=seq)

  def _set_states(self, states: dict, *, epoch: int, seq: int = 0) -> dict:
    pools = {}
    for sh in self._shards:
      est = self._estimators[sh.family]
      template = jax.eval_shape(lambda: est.init(jax.random.key(0), est.lopt.init_meta_params(
          jax.random.key(0)), indices=jnp.arange(sh.start, sh.stop, dtype=jnp.int32)))
      pools[sh.family, sh.index] = from_host(states[sh.family, sh.index], template)
    self._pools, self._epoch, self._seq, self._before = pools, epoch, seq, None
    return {"status": "ok", "epoch": epoch}
