"""Every learned optimizer: init, jitted update on a flax MLP, no recompile, robustness."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt as lo

ARCHS = {
    "learned_lr_adam": lambda: lo.LearnedLR(direction="adam"),
    "mlp": lambda: lo.PerParamMLP(features=lo.PerParamMLP().features + ("muon", "loss", "train_frac")),
    "lstm": lambda: lo.PerParamLSTM(features=lo.PerParamLSTM().features + ("adafactor", "loss")),
    "hierarchical": lambda: lo.HierarchicalLOpt(features=lo.HierarchicalLOpt().features + ("loss", "train_frac")),
}


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _problem():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (32, 5))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  params = model.init(jax.random.key(2), x)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  return params, loss_fn


@pytest.fixture(params=sorted(ARCHS))
def lopt(request):
  return ARCHS[request.param]()


TRACES = []


@jax.jit
def _step(opt, theta, params, state, grads, loss, key):
  """One jitted update shared by every test: compiled once per architecture config."""
  TRACES.append(opt.name)  # runs only while tracing
  return opt.update(theta, grads, state, params, loss=loss, key=key)


def test_jitted_update_does_not_recompile(lopt):
  params, loss_fn = _problem()
  theta = lopt.init_meta_params(jax.random.key(3))
  state = lopt.init(theta, params, num_steps=50)
  before = TRACES.count(lopt.name)
  for i in range(3):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    # A fresh but equal instance each call: equal static config must share the cache.
    opt = type(lopt).from_config(lopt.config())
    updates, state = _step(opt, theta, params, state, grads, loss, jax.random.key(i))
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape and u.dtype == p.dtype
      assert bool(jnp.all(jnp.isfinite(u)))
    # The update actually moves the parameters.
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 0
    params = optax.apply_updates(params, updates)
  assert TRACES.count(lopt.name) - before <= 1
  assert int(state.step) == 3


def test_finite_on_huge_zero_and_nan_gradients(lopt):
  params, _ = _problem()
  theta = lopt.init_meta_params(jax.random.key(4))
  state = lopt.init(theta, params, num_steps=10)
  update = lambda g, s, loss: _step(lopt, theta, params, s, g, loss, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  bad = [jnp.zeros_like(p).reshape(-1).at[0].set(1e30).at[-1].set(-jnp.inf).reshape(p.shape)
         for p in leaves]
  bad[0] = bad[0].reshape(-1).at[1].set(jnp.nan).reshape(bad[0].shape)
  cases = [jax.tree.unflatten(treedef, bad),
           jax.tree.map(jnp.zeros_like, params),
           jax.tree.map(lambda p: jnp.full_like(p, 1e-30), params)]
  for grads in cases:
    for loss in (jnp.float32(1.0), jnp.float32(jnp.inf)):
      updates, state = update(grads, state, loss)
      for u in jax.tree.leaves(updates):
        assert bool(jnp.all(jnp.isfinite(u))), u
      for x in jax.tree.leaves(state):
        assert bool(jnp.all(jnp.isfinite(x) | jnp.isinf(x) & (x > 0))), "state has NaN"


def test_same_seed_same_meta_params_and_vmappable(lopt):
  a = lopt.init_meta_params(jax.random.key(7))
  b = lopt.init_meta_params(jax.random.key(7))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  # The meta-training engine vmaps init/update over tasks with different horizons.
  params, loss_fn = _problem()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  horizons = jnp.array([10, 100], jnp.int32)
  states = jax.vmap(lambda n: lopt.init(a, params, num_steps=n))(horizons)
  updates, _ = jax.jit(jax.vmap(
      lambda s: lopt.update(a, grads, s, params, loss=loss, key=jax.random.key(0))))(states)
  single, _ = _step(lopt, a, params, lopt.init(a, params, num_steps=10), grads, loss,
                    jax.random.key(0))
  for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(single)):
    np.testing.assert_allclose(u[0], s, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_meta_gradient_is_finite(lopt):
  params, loss_fn = _problem()
  theta = lopt.init_meta_params(jax.random.key(8))

  def meta_loss(theta):
    state = lopt.init(theta, params, num_steps=5)
    p = params
    for _ in range(2):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      u, state = lopt.update(theta, grads, state, p, loss=loss, key=jax.random.key(0))
      p = optax.apply_updates(p, u)
    return loss_fn(p)

  g = jax.jit(jax.grad(meta_loss))(theta)
  norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(g)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_config_validation_names_bad_value():
  with pytest.raises(ValueError, match="unknown feature 'gradz'"):
    lo.PerParamMLP(features=("gradz",))
  with pytest.raises(ValueError, match="hidden_sizes"):
    lo.PerParamMLP(hidden_sizes=(0,))
  with pytest.raises(ValueError, match="step_mult"):
    lo.HierarchicalLOpt(step_mult=-1.0)
  with pytest.raises(ValueError, match="momentum_decays"):
    lo.PerParamLSTM(momentum_decays=(1.5,))
  with pytest.raises(ValueError, match="num_steps"):
    lo.PerParamMLP(features=("grad", "train_frac")).init({}, {"w": jnp.ones(2)}, num_steps=None)
  with pytest.raises(ValueError, match="loss"):
    opt = lo.PerParamMLP(features=("grad", "loss"))
    theta = opt.init_meta_params(jax.random.key(0))
    p = {"w": jnp.ones(2)}
    opt.update(theta, p, opt.init(theta, p), p)


def test_params_and_state_can_be_donated(lopt):
  """Training loops donate params and optimizer state to jit (no fresh buffers per step);
  a state holding one buffer twice makes that fail ("donate the same buffer twice")."""
  params, loss_fn = _problem()
  tx = lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(3)), num_steps=50)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  buffers = [x.unsafe_buffer_pointer() for x in leaves if isinstance(x, jax.Array) and x.size]
  assert len(buffers) == len(set(buffers)), "the optimizer state aliases a buffer"

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  donated = jax.jit(step, donate_argnums=(0, 1))
  reference = jax.jit(step)
  p_ref, s_ref = params, tx.init(params)
  p, s = jax.tree.map(jnp.copy, params), state
  for _ in range(3):
    p_ref, s_ref, loss_ref = reference(p_ref, s_ref)
    p, s, loss = donated(p, s)
    assert float(loss) == float(loss_ref)
  jax.tree.map(np.testing.assert_array_equal, p, p_ref)
