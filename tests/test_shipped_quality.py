"""The recommended shipped optimizer against per-task-tuned Adam on held-out tasks.

These are two of the held-out tasks of `lopt eval` (`tasks.suites`), rerun here at
one seed: neither is in the meta-training distribution (a 1e4-conditioned quadratic
at a 10x horizon; an MLP on 32x32 color images). The bar is the evaluation issue's:
within 2x of tuned Adam's final training loss, never diverging.
"""
import jax
import numpy as np
import optax
import pytest

from learned_opt import meta_train
import learned_opt
from learned_opt import tasks
from learned_opt.meta_train import tune_learning_rate
from learned_opt.tasks import suites


@pytest.mark.parametrize("task_name", ["quadratic_illcond_long", "mlp_rgb32_synthetic"])
def test_hierarchical_hd_is_within_2x_of_tuned_adam(task_name):
  spec = {**suites.HELDOUT_SUITE, **suites.HELDOUT_OFFLINE}[task_name]
  task, n = spec.build(None).task(), spec.num_steps
  window = max(1, n // 10)   # the evaluation's final window
  adam = tune_learning_rate(task, optax.adam, num_steps=n, seed=0, final_window=window)
  result = meta_train.train(task, learned_opt.load_pretrained("hierarchical_hd", num_steps=n),
                       num_steps=n, key=jax.random.key(0))
  losses = np.asarray(result.losses)
  ours = float(losses[-window:].mean())
  assert np.all(np.isfinite(losses)) and losses.max() <= losses[0] * 1.5, task_name
  assert ours <= 2.0 * float(adam.final_losses[adam.best_index]), (
      task_name, ours, adam.best_lr, adam.final_losses)
