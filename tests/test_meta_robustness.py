"""Estimators under stress: blown-up tasks, split pools, recompilation, bad settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.meta_train.estimators.base import _jit_estimate, combine_estimates
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncated_es import TruncatedES
from learned_opt.meta_train.estimators.truncation import ConstantTruncation
from learned_opt.tasks import QuadraticFamily
from test_meta_lopts import LearnedStepSize

DIM = 4
LOPT = LearnedStepSize(shape=(DIM,), init_log_lr=float(np.log(0.05)))
THETA = LOPT.init_meta_params(None)


class _BlowUpQuadratic(QuadraticFamily):
  """Quadratics whose gradient is inf on about one batch in ten."""

  def batch(self, cfg, key, split="train"):
    k_noise, k_bomb = jax.random.split(key)
    bomb = jnp.where(jax.random.uniform(k_bomb) < 0.1, jnp.inf, 0.0)
    return {**super().batch(cfg, k_noise, split), "bomb": bomb}

  def loss(self, cfg, params, key, batch):
    return super().loss(cfg, params, key, batch) + batch["bomb"] * jnp.sum(params["x"])


FAMILY = _BlowUpQuadratic(dim=DIM, noise_range=(0.0, 0.1))


def _est(cls, **kw):
  settings = dict(family=FAMILY, lopt=LOPT, schedule=ConstantTruncation(horizon=20), num_tasks=8,
                  unroll_length=5, sigma=0.01, loss_diff_clip=1.0)
  return cls(**{**settings, **kw})


@pytest.mark.parametrize("cls", [TruncatedES, PES])
def test_blown_up_tasks_do_not_poison_the_estimate(cls):
  est = _est(cls)
  state = est.init(jax.random.key(0), THETA)
  diverged = resets = 0
  for i in range(6):
    state, g = est.estimate(jax.random.key(i), THETA, state)
    assert np.isfinite(np.asarray(g.grad["log_lr"])).all() and np.isfinite(float(g.meta_loss))
    assert 0.0 <= float(g.meta_loss) <= 4.0
    diverged += int(g.counts["diverged"])
    resets += int(g.counts["resets"])
  assert diverged > 0 and resets >= diverged - 8  # diverged tasks restart
  # Blown-up parameters do not linger: only tasks hit at the very last step are non-finite.
  finite = np.isfinite(np.asarray(state.pool.params["x"])).all(axis=-1)
  assert finite.mean() > 0.5


@pytest.mark.slow
def test_split_pool_gives_the_same_estimate():
  """Two workers with half the pool each (same key) reproduce the whole pool's estimate."""
  est = _est(PES)
  key = jax.random.key(3)
  whole = est.init(key, THETA)
  halves = [est.init(key, THETA, indices=jnp.arange(0, 4)), est.init(key, THETA, indices=jnp.arange(4, 8))]
  for step in range(5):  # crosses resets (horizon 20, 5 steps per truncation, staggered)
    k = jax.random.fold_in(jax.random.key(9), step)
    whole, g_whole = est.estimate(k, THETA, whole)
    parts = [est.estimate(k, THETA, h) for h in halves]
    halves = [p[0] for p in parts]
    g_split = combine_estimates([p[1] for p in parts])
    np.testing.assert_allclose(g_split.grad["log_lr"], g_whole.grad["log_lr"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_split.meta_loss, g_whole.meta_loss, rtol=1e-6)
    assert {k: int(v) for k, v in g_split.counts.items()} == {k: int(v) for k, v in g_whole.counts.items()}
  np.testing.assert_array_equal(np.concatenate([np.asarray(h.pool.step) for h in halves]),
                                np.asarray(whole.pool.step))


def test_estimate_compiles_once_and_staggers_resets():
  est = _est(PES)
  state = est.init(jax.random.key(0), THETA)
  horizons = np.asarray(state.pool.horizon[:, 0])
  assert len(set(horizons.tolist())) > 2 and horizons.min() >= 5 and horizons.max() <= 20
  state, _ = est.estimate(jax.random.key(1), THETA, state)
  size = _jit_estimate._cache_size()
  steps = []
  for i in range(3):
    # A new but equal estimator object hits the same compiled function.
    state, _ = _est(PES).estimate(jax.random.key(2 + i), THETA, state)
    steps.append(np.asarray(state.pool.step[:, 0]))
  assert _jit_estimate._cache_size() == size
  assert len(set(steps[-1].tolist())) > 1  # tasks are not in lock-step


def test_bad_settings_name_the_value():
  with pytest.raises(ValueError, match="unroll_length"):
    _est(TruncatedES, unroll_length=30)
  with pytest.raises(ValueError, match="sigma"):
    _est(TruncatedES, sigma=-1.0)
  with pytest.raises(ValueError, match="population_map"):
    _est(PES, population_map="pmap")
  with pytest.raises(ValueError, match="meta_loss_split"):
    _est(PES, meta_loss_split="val")
