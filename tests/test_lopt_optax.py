"""`to_optax`: composes in optax.chain, jit without recompiling, any pytree, bfloat16."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import learned_opt as lo


def _quadratic(params):
  return sum(jnp.sum(jnp.square(jnp.asarray(p, jnp.float32) - 1.0)) for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_chain_with_clipping_and_weight_decay_no_recompile():
  lopt = lo.PerParamMLP(features=("grad", "momentum", "loss", "train_frac"))
  theta = lopt.init_meta_params(jax.random.key(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), lo.to_optax(lopt, theta, num_steps=5),
                   optax.add_decayed_weights(-1e-2))  # outputs are signed steps
  params = {"w": jnp.full((4, 3), 2.0, jnp.float32), "b": jnp.zeros((3,))}  # not weak-typed
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    loss, grads = jax.value_and_grad(_quadratic)(params)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, updates

  for _ in range(7):  # runs past num_steps: the training fraction saturates at 1
    params, state, updates = step(params, state)
  assert len(traces) == 1
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # The chain's weight decay is present: with zero grads, decay alone moves w toward 0.
  zero = jax.tree.map(jnp.zeros_like, params)
  lopt_only = lo.to_optax(lopt, theta, num_steps=5)
  u_chain, _ = tx.update(zero, state, params, loss=jnp.float32(1.0))
  u_lopt, _ = lopt_only.update(zero, state[1], params, loss=jnp.float32(1.0))
  np.testing.assert_allclose(u_chain["w"] - u_lopt["w"], -1e-2 * params["w"], rtol=1e-5, atol=1e-7)


def test_learned_lr_trains_a_flax_linen_model():
  model = nn.Dense(1)
  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = x @ jnp.array([[1.0], [-2.0], [0.5]])
  params = model.init(jax.random.key(1), x)
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
  lopt = lo.LearnedLR(direction="adam", init_lr=0.05)
  tx = lo.to_optax(lopt, lopt.init_meta_params(None))
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda l_g: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1], l_g[0]))(
      tx.update(l_g[1], s, p, loss=l_g[0])))(jax.value_and_grad(loss_fn)(p)))
  first = float(loss_fn(params))
  for _ in range(200):
    params, state, _ = step(params, state)
  assert float(loss_fn(params)) < 1e-2 * first


@pytest.mark.parametrize("make", [lo.PerParamMLP, lo.PerParamLSTM, lo.HierarchicalLOpt])
def test_nnx_state_and_bfloat16_params(make):
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  params = nnx.state(model, nnx.Param)
  lopt = make()
  tx = lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0)))
  state = tx.init(params)
  for leaf in jax.tree.leaves(state):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u)))
  new = optax.apply_updates(params, updates)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(new))


def test_key_defaults_are_reproducible_and_errors_are_clear():
  lopt = lo.PerParamMLP(features=("grad",))
  tx = lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.asarray([0.5, -1.0, 2.0])}
  # No key, the same key, or another key: deterministic optimizers give one update.
  u_none, _ = tx.update(grads, tx.init(params), params)
  u_key, _ = tx.update(grads, tx.init(params), params, key=jax.random.key(1))
  u_other, _ = tx.update(grads, tx.init(params), params, key=jax.random.key(2))
  assert float(jnp.abs(u_none["w"]).max()) > 0
  np.testing.assert_array_equal(u_none["w"], u_key["w"])
  np.testing.assert_array_equal(u_key["w"], u_other["w"])
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  with pytest.raises(TypeError, match="LearnedOptimizer"):
    lo.to_optax(optax.adam(1e-3), {})
  needs_horizon = lo.PerParamMLP(features=("grad", "train_frac"))
  with pytest.raises(ValueError, match="num_steps"):
    lo.to_optax(needs_horizon, needs_horizon.init_meta_params(jax.random.key(0))).init(params)
  with pytest.raises(ValueError, match="num_steps must be a positive"):
    lo.to_optax(needs_horizon, needs_horizon.init_meta_params(jax.random.key(0)), num_steps=0).init(params)


@pytest.mark.slow
def test_saferate_feature_gets_value_fn_through_chain():
  lopt = lo.HierarchicalLOpt(features=("grad", "adam", "saferate"))
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0))))
  params = {"w": jnp.full((3, 2), 2.0, jnp.float32)}
  state = tx.init(params)
  updates, _ = jax.jit(lambda p, s: tx.update(jax.grad(_quadratic)(p), s, p, value_fn=_quadratic))(
      params, state)
  assert bool(jnp.all(jnp.isfinite(updates["w"]))) and float(jnp.abs(updates["w"]).max()) > 0
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(jax.grad(_quadratic)(params), state, params)
