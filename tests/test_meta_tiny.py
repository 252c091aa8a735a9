"""The tiny default config meta-trains an optimizer that beats its init and tuned SGD.

Slow (a few minutes on 2 cores): CI runs it with `pytest -m slow`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt.meta_train.run import config as config_lib
from learned_opt.meta_train.run.metrics import read_metrics
from learned_opt.meta_train.run.runner import build_trainer, run_meta_training
from learned_opt.meta_train import train
from learned_opt.tasks import get_family

SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def _mean_normalized_loss(family, optimizer, num_steps, seeds=range(16)):
  """Mean normalized training loss over the run, on tasks sampled from the family
  (the meta-training objective), averaged over held-back task seeds."""
  out = []
  for s in seeds:
    task = family.task(family.sample(jax.random.key(10_000 + s)))
    result = train(task, optimizer, num_steps=num_steps, key=jax.random.key(s))
    out.append(float(jnp.mean(task.normalize(result.losses))))
  return float(np.mean(out))


@pytest.mark.slow
def test_tiny_config_beats_init_and_sgd(tmp_path):
  cfg = config_lib.load_config("configs/tiny.yaml")
  result = run_meta_training(cfg, str(tmp_path / "tiny"), progress=False)
  records = read_metrics(str(tmp_path / "tiny"))
  first = np.mean([r["meta_loss"] for r in records[:20]])
  last = np.mean([r["meta_loss"] for r in records[-50:]])
  assert last < 0.7 * first, (first, last)

  family = get_family(cfg.task.families[0])
  horizon = cfg.truncation.horizon
  lopt, theta, _ = learned_opt.load(result.export_path)
  init_theta = build_trainer(cfg).init(cfg.seed)[0].meta_params
  learned = _mean_normalized_loss(family, learned_opt.to_optax(lopt, theta, num_steps=horizon), horizon)
  initial = _mean_normalized_loss(family, learned_opt.to_optax(lopt, init_theta, num_steps=horizon), horizon)
  sgd = {lr: _mean_normalized_loss(family, optax.sgd(lr), horizon) for lr in SGD_GRID}
  print(f"learned {learned:.4f}, init {initial:.4f}, SGD " + ", ".join(f"{k}: {v:.4f}" for k, v in sgd.items()))
  assert learned < initial
  assert learned < min(sgd.values()), (learned, sgd)
