"""Estimator correctness on quadratics, where the meta-gradient is known by backprop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.meta_train.inner import unroll
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncated_es import TruncatedES
from learned_opt.meta_train.estimators.truncation import ConstantTruncation, LogUniformTruncation
from learned_opt.tasks import QuadraticFamily
from test_meta_lopts import LearnedStepSize

DIM, HORIZON, K, N = 4, 40, 10, 2048
# Diagonal, noise-free quadratics with per-coordinate learned step sizes: the
# meta-objective is smooth and deterministic, so backprop through the unroll gives the
# exact gradient the estimators target, and its direction (4-d) is informative.
FAMILY = QuadraticFamily(dim=DIM, rotate=False, noise_range=(0.0, 0.0), log10_cond_range=(2.0, 2.0))
LOPT = LearnedStepSize(shape=(DIM,), init_log_lr=float(np.log(0.02)))
THETA = LOPT.init_meta_params(None)


def _est(cls, unroll_length):
  # No staggering: every task starts at step 0, so truncation j covers steps
  # [jK, (j+1)K) of all tasks, the setting of the bias comparison.
  return cls(family=FAMILY, lopt=LOPT, schedule=ConstantTruncation(horizon=HORIZON), num_tasks=N,
             unroll_length=unroll_length, sigma=0.01, stagger=False, population_map="map",
             map_batch_size=256)


def _backprop_grad(pool, num_steps):
  def mean_loss(theta):
    def one(state):
      _, out = unroll.unroll_member(FAMILY, LOPT, theta, state, state, num_steps=num_steps)
      return jnp.mean(out.meta_loss)
    return jnp.mean(jax.vmap(one)(pool))
  return jax.jit(jax.grad(mean_loss))(THETA)["log_lr"]


def _cos(a, b):
  return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.slow
def test_es_matches_backprop_and_pes_removes_the_truncation_bias():
  """ES against backprop, then four 10-step truncations against one 40-step unroll.

  Truncated ES estimates the gradient of each truncation's own loss (cosine >= 0.95
  with backprop through that truncation). Averaged over the truncations of a horizon,
  PES estimates the full-horizon gradient as well as full-unroll ES does, while
  truncated ES ignores how theta shaped each truncation's start state and comes out
  about half as large (the short-horizon bias).
  """
  tes, pes, full = _est(TruncatedES, K), _est(PES, K), _est(TruncatedES, HORIZON)
  state = full.init(jax.random.key(0), THETA)
  full_target = _backprop_grad(state.pool, HORIZON)
  _, g_full = full.estimate(jax.random.key(1), THETA, state)
  assert _cos(g_full.grad["log_lr"], full_target) >= 0.95

  per_truncation = {}
  for est in (tes, pes):
    s = est.init(jax.random.key(0), THETA)
    grads = []
    for j in range(HORIZON // K):
      if j == 0 and est is tes:
        first_target = _backprop_grad(s.pool, K)
      s, g = est.estimate(jax.random.fold_in(jax.random.key(5), j), THETA, s)
      assert int(g.num_pairs) == N and np.isfinite(float(g.meta_loss))
      grads.append(g.grad["log_lr"])
    per_truncation[type(est).__name__] = jnp.stack(grads)
  assert _cos(per_truncation["TruncatedES"][0], first_target) >= 0.95

  g_tes = jnp.mean(per_truncation["TruncatedES"], axis=0)
  g_pes = jnp.mean(per_truncation["PES"], axis=0)
  full_err, pes_err = _rel_err(g_full.grad["log_lr"], full_target), _rel_err(g_pes, full_target)
  assert full_err < 0.3 and pes_err < 0.3, (full_err, pes_err)
  assert _cos(g_pes, full_target) >= 0.95
  assert float(jnp.linalg.norm(g_tes) / jnp.linalg.norm(full_target)) < 0.65
  assert _rel_err(g_tes, full_target) > 2 * max(full_err, pes_err)


def test_log_uniform_truncation_range():
  sched = LogUniformTruncation(min_length=10, max_length=100)
  h = jax.vmap(sched.sample_horizon)(jax.random.split(jax.random.key(0), 2000))
  assert int(h.min()) == 10 and int(h.max()) == 100
  assert 25 < float(jnp.median(h)) < 40  # log-uniform: median near sqrt(10 * 100)
  first = jax.vmap(lambda k: sched.first_horizon(k, 10))(jax.random.split(jax.random.key(1), 2000))
  assert int(first.min()) == 10 and float(jnp.mean(first)) < float(jnp.mean(h))


def test_estimators_of_equal_settings_never_share_a_compilation():
  """JAX compares the treedefs of PES and TruncatedES built with equal settings as
  equal; the estimator's class is part of the compiled functions' cache key, so each
  class gets its own state type and estimate however the calls interleave."""
  tes, pes = (cls(family=FAMILY, lopt=LOPT, schedule=ConstantTruncation(horizon=HORIZON),
                  num_tasks=4, unroll_length=K, sigma=0.01) for cls in (TruncatedES, PES))
  for _ in range(3):
    for est in (tes, pes, tes):
      state = est.init(jax.random.key(0), THETA)
      assert type(state).__name__ == ("PESState" if est is pes else "TruncatedESState")
      state, g = est.estimate(jax.random.key(1), THETA, state)
      assert np.isfinite(float(g.meta_loss))
