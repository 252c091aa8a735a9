"""tune_learning_rate: picks the analytically best rate, records the grid, survives NaN."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import meta_train
from learned_opt import tasks
from learned_opt.meta_train.inner import tuning
from learned_opt.baselines.adam_muon import muon
from learned_opt.meta_train.inner.tuning import DEFAULT_GRID, tune_learning_rate

NUM_STEPS = 40  # long enough to separate the rates, short of float32 round-off


def _quadratic(log10_cond=1.0, noise=0.0):
  # Diagonal (rotate=False) and noise-free with full_batch=True: plain gradient descent
  # on 1/2 sum_i lambda_i e_i^2, where each error e_i shrinks by (1 - lr * lambda_i).
  fam = tasks.QuadraticFamily(dim=8, log10_cond_range=(log10_cond, log10_cond),
                              noise_range=(noise, noise), rotate=False)
  return fam.task()


def _analytic_curves(task, grid, seed, num_steps):
  """Closed-form SGD losses [G, T] of the diagonal quadratic, before each update."""
  k_init, _ = jax.random.split(jax.random.key(seed))  # tune_learning_rate's (= train's) split
  e0 = np.asarray(task.init(k_init)["x"] - task.cfg.optimum, np.float64)
  lam = np.asarray(task.cfg.eigenvalues, np.float64)
  t = np.arange(num_steps)[None, :, None]
  factor = (1.0 - np.asarray(grid)[:, None, None] * lam[None, None, :]) ** (2 * t)
  return 0.5 * np.sum(lam * e0**2 * factor, axis=-1)


def _balanced(task, seed):
  """`task` with the optimum moved so that every eigen-direction starts at loss 1/2.

  Then no direction is solved by chance at initialization, and the finite-horizon best
  rate is the asymptotic one, 2 / (lambda_min + lambda_max).
  """
  k_init, _ = jax.random.split(jax.random.key(seed))
  x0 = task.init(k_init)["x"]
  return task.replace(cfg=task.cfg.replace(optimum=x0 - 1.0 / jnp.sqrt(task.cfg.eigenvalues)))


def test_picks_the_analytic_optimum_and_records_grid_and_losses():
  task = _balanced(_quadratic(), seed=3)
  lam = np.asarray(task.cfg.eigenvalues, np.float64)
  best = 2.0 / (lam.min() + lam.max())
  grid = best * 10.0 ** (np.arange(-3, 4) / 4.0)  # 7 log-spaced values around the optimum
  result = tune_learning_rate(task, optax.sgd, grid=grid, num_steps=NUM_STEPS, seed=3,
                              full_batch=True)

  assert result.best_index == 3
  np.testing.assert_allclose(result.best_lr, best, rtol=1e-12)
  np.testing.assert_array_equal(result.grid, grid)
  assert result.losses.shape == (7, NUM_STEPS) and not result.all_diverged

  # The recorded curves are gradient descent's, exactly (float32 tolerance).
  expected = _analytic_curves(task, grid, 3, NUM_STEPS)
  stable = np.max(np.abs(1 - grid[:, None] * lam[None]), axis=1) < 1
  assert stable.sum() == 4
  np.testing.assert_allclose(result.losses[stable], expected[stable], rtol=2e-3)
  np.testing.assert_array_equal(result.best_curve, result.losses[3])
  window = NUM_STEPS // 10
  np.testing.assert_allclose(result.final_losses, result.losses[:, -window:].mean(axis=1))
  # The optimum beats its neighbours by two orders of magnitude: a sharp test of the argmin.
  assert result.final_losses[3] < 1e-2 * min(result.final_losses[2], result.final_losses[4])


def test_picks_the_finite_horizon_optimum_of_an_unbalanced_start():
  # Seed 3 starts almost solved along lambda_min, so over 40 steps a smaller rate than
  # 2 / (lambda_min + lambda_max) wins; the tuner must follow the actual final losses.
  task = _quadratic()
  lam = np.asarray(task.cfg.eigenvalues, np.float64)
  grid = 2.0 / (lam.min() + lam.max()) * 10.0 ** (np.arange(-3, 4) / 4.0)
  result = tune_learning_rate(task, optax.sgd, grid=grid, num_steps=NUM_STEPS, seed=3,
                              full_batch=True)
  expected = _analytic_curves(task, grid, 3, NUM_STEPS)[:, -(NUM_STEPS // 10):].mean(axis=1)
  assert result.best_index == int(np.argmin(expected)) == 2


def test_diverging_rates_rank_last_and_all_diverged_is_flagged():
  task = _quadratic()
  lam_max = float(np.max(task.cfg.eigenvalues))
  grid = [0.5 / lam_max, 1.0 / lam_max, 50.0 / lam_max, 1e4 / lam_max]  # last two diverge
  result = tune_learning_rate(task, optax.sgd, grid=grid, num_steps=NUM_STEPS, full_batch=True)
  assert not np.isfinite(result.final_losses[2:]).any()  # inf or NaN: both count as worst
  assert np.isfinite(result.final_losses[:2]).all()
  assert result.best_index == 1 and not result.all_diverged

  result = tune_learning_rate(task, optax.sgd, grid=grid[2:], num_steps=NUM_STEPS,
                              full_batch=True)
  assert result.all_diverged and result.best_index == 0 and result.best_lr == grid[2]


def test_runs_equal_tasks_train_with_the_same_seed():
  # Minibatch noise: every grid value must see the batches `meta_train.train` draws.
  task = _quadratic(log10_cond=2.0, noise=0.3)
  grid = (1e-2, 1e-1)
  result = tune_learning_rate(task, optax.adam, grid=grid, num_steps=20, seed=7)
  for i, lr in enumerate(grid):
    ref = meta_train.train(task, optax.adam(lr), num_steps=20, key=jax.random.key(7))
    np.testing.assert_allclose(result.losses[i], np.asarray(ref.losses), rtol=1e-5, atol=1e-6)


def test_second_call_does_not_recompile():
  fam = tasks.QuadraticFamily(dim=8)
  task_a, task_b = fam.task(fam.sample(jax.random.key(0))), fam.task(fam.sample(jax.random.key(1)))
  tune_learning_rate(task_a, optax.adam, grid=(1e-3, 1e-2, 1e-1), num_steps=20, seed=0)
  before = tuning.TRACE_COUNT[0]
  # New task config, new grid values, new seed: same shapes, so the same program.
  tune_learning_rate(task_b, optax.adam, grid=(3e-3, 3e-2, 3e-1), num_steps=20, seed=5)
  assert tuning.TRACE_COUNT[0] == before


@pytest.mark.slow
def test_tunes_muon_on_an_mlp():
  fam = tasks.get_family("mlp_synthetic").replace(batch_size_range=(16, 16), width_range=(32, 32),
                                                  max_depth=2)
  task = fam.task()
  result = tune_learning_rate(task, muon, grid=(1e-3, 1e-2, 1e-1), num_steps=20, seed=0)
  assert np.isfinite(result.final_losses).all()
  # Training made progress at the chosen rate (loss at init is about log(10) = 2.3).
  assert result.final_losses[result.best_index] < 0.9 * result.losses[result.best_index, 0]
  assert result.final_losses[result.best_index] == np.nanmin(result.final_losses)


def test_default_grid_is_log_spaced_with_at_least_7_values():
  grid = np.asarray(DEFAULT_GRID)
  assert len(grid) >= 7 and (grid > 0).all()
  np.testing.assert_allclose(np.diff(np.log10(grid)), 0.5, rtol=1e-9)


@pytest.mark.parametrize("grid, match", [
    ((), "non-empty"),
    ((1e-3, float("nan")), r"finite positive .*nan"),
    ((1e-3, -1e-2), r"finite positive .*-0.01"),
    (((1e-3, 1e-2),), "1-D"),
    ("fast", "sequence of learning rates"),
])
def test_bad_grid_is_a_clear_error(grid, match):
  with pytest.raises(ValueError, match=match):
    tune_learning_rate(_quadratic(), optax.sgd, grid=grid, num_steps=5)


def test_bad_arguments_are_clear_errors():
  task = _quadratic()
  with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
    tune_learning_rate(task, optax.sgd, num_steps=0)
  with pytest.raises(ValueError, match=r"final_window must be an int in \[1, num_steps=5\], got 9"):
    tune_learning_rate(task, optax.sgd, num_steps=5, final_window=9)
  with pytest.raises(ValueError, match="make_optimizer must be a callable"):
    tune_learning_rate(task, "adam", num_steps=5)
