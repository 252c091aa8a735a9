"""Every task family: finite init loss, Adam makes progress, configs vmap without recompiling."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_opt import meta_train
from learned_opt import tasks
from conftest import shared_data_dir

ADAM_LR = {"quadratic": 0.05, "logreg": 1e-2, "mlp": 3e-3, "conv": 1e-2, "lstm": 1e-2, "transformer": 3e-3}
OFFLINE = list(tasks.META_TRAIN_FAMILIES)
ON_SHARED_DATA = ["mlp_mnist", "mlp_mnist8x8", "logreg_mnist", "conv_mnist", "lstm_tiny_shakespeare",
                  "transformer_tiny_shakespeare"]
# Conv, LSTM and transformer families take 14-31 s each here: CI's second pass runs them.
_SLOW = ("conv", "lstm", "transformer")


def _marked(names):
  return [pytest.param(n, marks=pytest.mark.slow) if n.startswith(_SLOW) else n for n in names]


def _family(name):
  if name in tasks.META_TRAIN_FAMILIES:
    return tasks.get_family(name)
  data_dir = shared_data_dir()
  if data_dir is None:
    pytest.skip("shared data not present")
  return tasks.get_family(name, str(data_dir))


@pytest.mark.parametrize("name", _marked(OFFLINE + ON_SHARED_DATA))
def test_adam_lowers_loss_by_30_percent_in_200_steps(name):
  task = _family(name).task()
  lr = ADAM_LR[name.split("_")[0]]
  key = jax.random.key(0)
  result = meta_train.train(task, optax.adam(lr), num_steps=200, key=key)
  params0 = task.init(jax.random.split(key)[0])  # the same init as train()
  full = task.full_batch()
  before, after = float(task.loss(params0, key, full)), float(task.loss(result.params, key, full))
  assert np.isfinite(before) and np.all(np.isfinite(np.asarray(result.losses)))
  assert after <= 0.7 * before, f"{name}: full-batch loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", _marked(OFFLINE))
def test_vmapped_step_over_8_sampled_configs_compiles_once(name):
  family = tasks.get_family(name)
  cfgs = jax.vmap(family.sample)(jax.random.split(jax.random.key(1), 8))
  opt = optax.adam(1e-3)
  traces = []

  def init(cfg, key):
    params = family.task(cfg).init(key)
    return params, opt.init(params)

  @jax.jit
  def step(cfgs, params, opt_state, keys):
    traces.append(1)

    def one(cfg, params, opt_state, key):
      task = family.task(cfg)
      loss, grads = jax.value_and_grad(task.loss)(params, key, task.batch(key))
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, task.normalize(loss)

    return jax.vmap(one)(cfgs, params, opt_state, keys)

  params, opt_state = jax.vmap(init)(cfgs, jax.random.split(jax.random.key(2), 8))
  params, opt_state, loss, norm = step(cfgs, params, opt_state, jax.random.split(jax.random.key(3), 8))
  assert loss.shape == (8,) and bool(jnp.all(jnp.isfinite(loss)))
  assert bool(jnp.all((norm >= 0) & (norm <= tasks.NORMALIZED_LOSS_CAP)))
  step(cfgs, params, opt_state, jax.random.split(jax.random.key(4), 8))
  assert len(traces) == 1, "second call recompiled"
  # Sampled configs differ (hyperparameters really are sampled).
  leaves = [np.asarray(x) for x in jax.tree.leaves(cfgs)]
  assert any(len(np.unique(x.reshape(8, -1), axis=0)) > 1 for x in leaves)


@pytest.mark.parametrize("name", list(tasks.HELDOUT_SUITE))
def test_heldout_suite_tasks_build_with_finite_loss(name):
  spec = tasks.get_suite_task(name)
  if spec.data != "offline" and shared_data_dir() is None:
    pytest.skip("shared data not present")
  task = spec.build(str(shared_data_dir()) if spec.data != "offline" else None).task()
  params = task.init(jax.random.key(0))
  batch = task.full_batch() if spec.full_batch else task.batch(jax.random.key(1))
  assert np.isfinite(float(task.loss(params, jax.random.key(1), batch)))
  assert spec.name not in tasks.META_TRAIN_FAMILIES


def test_suites_are_disjoint_and_long_enough():
  assert len(tasks.HELDOUT_SUITE) >= 8
  assert max(t.num_steps for t in tasks.HELDOUT_SUITE.values()) >= 10 * tasks.META_TRAIN_HORIZON
  assert len(tasks.META_TRAIN_FAMILIES) >= 6


@pytest.mark.parametrize("loss, expected", [(jnp.nan, 4.0), (jnp.inf, 4.0), (-jnp.inf, 4.0), (1e30, 4.0),
                                            (-3.0, 0.0), (1.0, 0.5)])
def test_normalizer_is_finite_and_bounded(loss, expected):
  assert float(tasks.normalize_loss(jnp.asarray(loss), jnp.asarray(2.0))) == expected


@pytest.mark.slow
def test_mlp_on_mnist_files_reaches_90_percent(data_dir):
  family = tasks.get_family("mlp_mnist", str(data_dir))
  task = family.task()
  result = meta_train.train(task, optax.adam(1e-3), num_steps=1500, key=jax.random.key(0))
  test_set = family.replace(full_batch_size=2000).full_batch(task.cfg, "test")  # all 2000 held out
  assert test_set["image"].shape[0] == 2000
  accuracy = float(task.metrics(result.params, test_set)["accuracy"])
  assert accuracy >= 0.90, accuracy


def test_downsample_keeps_uint8_constants_and_means_and_names_a_bad_size():
  from learned_opt.tasks import datasets
  data = datasets.synthetic_images(image_shape=(16, 16, 1), num_train=64, num_test=16)
  small = datasets.downsample(data, 8)
  assert small.image_shape == (8, 8, 1) and small.train_x.dtype == jnp.uint8
  assert small.name == "synthetic_images_16x16x1_8x8"
  np.testing.assert_array_equal(small.train_y, data.train_y)
  # Averaging filters keep each image's mean brightness (up to rounding and edges).
  np.testing.assert_allclose(np.asarray(small.train_x, np.float32).mean((1, 2, 3)),
                             np.asarray(data.train_x, np.float32).mean((1, 2, 3)), atol=3.0)
  flat = data.replace(train_x=jnp.full_like(data.train_x, 77), test_x=jnp.full_like(data.test_x, 77))
  assert np.all(np.asarray(datasets.downsample(flat, 8).train_x) == 77)
  with pytest.raises(ValueError, match=r"downsample size must be in \[1, 16\].*got 32"):
    datasets.downsample(data, 32)


def test_tiny_image_mlp_families_are_celo2_sized():
  """64-32-10 at most (2,410 parameters, the scale suite's reference size)."""
  from learned_opt.tasks import suites
  family = tasks.get_family("mlp_synthetic8x8")
  widest = {**family.default_cfg(), "width": jnp.asarray(32, jnp.int32)}
  params = family.task(widest).init(jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == suites.SCALE_REFERENCE_PARAMS == 2410
  hard = tasks.get_family("mlp_synthetic8x8_hard")
  assert hard.data.name != family.data.name and hard.data.image_shape == (8, 8, 1)
