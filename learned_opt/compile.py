"""XLA compiler options that make per-parameter networks fast on CPU, and an opt-in `jit`.

On CPU, XLA's default code for the per-coordinate networks' skinny matmuls (`[N, 13] @
[13, 32] -> [N, 32] @ [32, 32] -> ...`, N in the millions) reaches 15-25 GFLOP/s on the
2-core machine lopt is benchmarked on, a tenth of its dense-matmul rate. XLA:CPU can
instead hand chains of dots to YNNPACK (the successor of XNNPACK), which runs a whole
per-coordinate MLP as one kernel: 4x faster on the network alone, 1.8-2.1x on a 1M-parameter
training step with `PerParamMLP` (`benchmarks/lopt_step.py`). XLA ships this as an
experimental option, off by default; pass it to your own `jax.jit`:

    step = jax.jit(train_step, compiler_options=learned_opt.compiler_options())

Experimental means it: with this jaxlib (0.10.2) a meta-training estimate that vmaps 8
LSTM tasks (`lstm_synthetic`, `HierarchicalLOpt`, population_map="vmap") deadlocks in
execution with the option (4 of 4 runs; fine without it, and fine with `lax.map`). So
lopt's own loops (meta-training, evaluation, tuning, `tasks.train`) compile with XLA's
defaults unless the environment variable `LOPT_CPU_YNN=1` opts them in;
`LOPT_CPU_YNN=0` also empties `compiler_options()`. Other backends get no options.

On CPUs with AVX-512 the options also ask LLVM for 512-bit vectors (it prefers 256 by
default): the hierarchical optimizer's per-coordinate loop is arithmetic-bound, and its
1M-parameter step fell from 1.45-1.48x to 1.38-1.44x Adam's (`benchmarks/README.md`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_AVX512_OPTIONS = {"xla_cpu_prefer_vector_width": 512}
ENV_VAR = "LOPT_CPU_YNN"


@functools.cache
def cpu_has_avx512() -> bool:
  """Whether this (Linux) machine's CPU reports AVX-512F; False where unknown."""
  try:
    with open("/proc/cpuinfo") as fh:
      return " avx512f" in fh.read()
  except OSError:
    return False


def _env_flag() -> str:
  flag = os.environ.get(ENV_VAR, "")
  if flag not in ("", "0", "1"):
    raise ValueError(f"{ENV_VAR} must be '0', '1' or unset, got {flag!r}")
  return flag


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's).

  Args:
    backend: "cpu", "gpu", "tpu" or None for `jax.default_backend()`.

  Returns:
    A new dict: on CPU (unless `LOPT_CPU_YNN=0`) YNNPACK dot fusion, and 512-bit vectors
    where the CPU has AVX-512; else empty.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu" or _env_flag() == "0":
    return {}
  return {**_CPU_OPTIONS, **(_AVX512_OPTIONS if cpu_has_avx512() else {})}


def internal_options() -> dict[str, str]:
  """The options lopt's own jits use: `compiler_options()` only with `LOPT_CPU_YNN=1`."""
  return compiler_options() if _env_flag() == "1" else {}


class _BackendJit:
  """`jax.jit(fun, **kwargs)` with `internal_options()` added at the first use.

  Deferred so that importing lopt does not initialize JAX's backends (a user may still
  be choosing a platform), and so the options match the backend actually used.
  Called inside another trace (a user's `jit` or `vmap` around it), it is a plain
  `jax.jit`: JAX accepts compiler options on top-level jits only, and the outer
  compilation decides. Attribute access (`lower`, `eval_shape`, `_cache_size`, ...) goes
  to the top-level jitted function.
  """

  def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
    functools.update_wrapper(self, fun)
    self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
    self._nested = jax.jit(fun, **jit_kwargs)

  def _get(self):
    if self._jitted is None:
      options = internal_options()
      self._jitted = (jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
                      if options else self._nested)
    return self._jitted

  def __call__(self, *args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      return self._nested(*args, **kwargs)
    try:
      return self._get()(*args, **kwargs)
    except ValueError as e:  # inside a trace but given no traced argument
      if "compiler_options" not in str(e):
        raise
      return self._nested(*args, **kwargs)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fun: Callable | None = None, **jit_kwargs):
  """`jax.jit` with `internal_options()`; usable as `@jit` or `@jit(static_argnums=...)`."""
  if "compiler_options" in jit_kwargs:
    raise TypeError("jit sets compiler_options itself; call jax.jit to choose others")
  if fun is None:
    return lambda f: _BackendJit(f, jit_kwargs)
  return _BackendJit(fun, jit_kwargs)
