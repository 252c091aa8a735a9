"""Meta-parameters set by hand reproduce known rules: proves the feature plumbing.

Each architecture is configured so that its network passes one feature through
unchanged (ReLU pairs relu(x) - relu(-x) = x, or the linear skip paths); the update must
then equal the reference rule to ~1e-6 relative error over several steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt as lo

A = 0.001  # exp_mult of the architectures below


def _params_and_grads(n_steps=3):
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (6, 5)) * 0.3, "b": jnp.zeros((5,)), "s": jnp.ones(())}
  grads = []
  for i in range(n_steps):
    k = jax.random.fold_in(key, i + 1)
    grads.append(jax.tree.map(lambda p: jax.random.normal(k, p.shape) * (0.1 + i), params))
  return params, grads


def _zeros_like(theta):
  return jax.tree.map(jnp.zeros_like, theta)


def _assert_rule(lopt, theta, rule, n_steps=3):
  """Runs lopt and `rule(grads_t, t) -> updates` on the same gradients."""
  params, grads = _params_and_grads(n_steps)
  state = lopt.init(theta, params, num_steps=10)
  update = jax.jit(lambda g, s: lopt.update(theta, g, s, params, loss=jnp.float32(1.0)))
  for t, g in enumerate(grads):
    u, state = update(g, state)
    ref = rule(g, t)
    for name in params:
      err = float(jnp.max(jnp.abs(u[name] - ref[name])))
      scale = float(jnp.max(jnp.abs(ref[name])))
      assert scale > 0
      assert err <= 1e-6 * scale, (name, t, err, scale)


def _pass_through_mlp(lopt, direction_channel):
  """PerParamMLP weights: d = -channel, s = log RMS(grad) / A (exactly SGD) or 0."""
  theta = _zeros_like(lopt.init_meta_params(jax.random.key(0)))
  spec = lopt.spec
  c = spec.param_names().index(direction_channel)
  theta["w_param"] = theta["w_param"].at[c, 0].set(1.0).at[c, 1].set(-1.0)
  for layer in theta["hidden"]:
    layer["w"] = layer["w"].at[jnp.arange(4), jnp.arange(4)].set(1.0)
  theta["out"]["w"] = theta["out"]["w"].at[0, 0].set(-1.0).at[1, 0].set(1.0)
  return theta, spec


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_mlp_reduces_to_sgd(weight_decay):
  lopt = lo.PerParamMLP(exp_mult=A, step_mult=0.01, weight_decay=weight_decay)
  theta, spec = _pass_through_mlp(lopt, "grad")
  t = spec.tensor_names().index("log_rms/grad")
  theta["w_tensor"] = theta["w_tensor"].at[t, 2].set(1.0).at[t, 3].set(-1.0)
  theta["out"]["w"] = theta["out"]["w"].at[2, 1].set(1.0 / A).at[3, 1].set(-1.0 / A)
  params, _ = _params_and_grads()
  _assert_rule(lopt, theta, lambda g, t: jax.tree.map(
      lambda x, p: -0.01 * x - 0.01 * weight_decay * p, g, params))


def test_mlp_reduces_to_per_tensor_normalized_momentum():
  lopt = lo.PerParamMLP(exp_mult=A, step_mult=0.01)
  theta, _ = _pass_through_mlp(lopt, "momentum@0.9")
  tx = optax.ema(0.9, debias=False)
  params, _ = _params_and_grads()
  ema_state = [tx.init(params)]

  def rule(g, t):
    m, ema_state[0] = tx.update(g, ema_state[0])
    return jax.tree.map(lambda x: -0.01 * x / jnp.sqrt(jnp.mean(x ** 2)), m)

  _assert_rule(lopt, theta, rule)


def test_lstm_reduces_to_sgd_with_decoupled_weight_decay():
  lopt = lo.PerParamLSTM(exp_mult=A, step_mult=0.01, weight_decay=0.5)
  theta = _zeros_like(lopt.init_meta_params(jax.random.key(0)))
  spec = lopt.spec
  theta["out"]["w_param"] = theta["out"]["w_param"].at[spec.param_names().index("grad"), 0].set(-1.0)
  theta["out"]["w_tensor"] = theta["out"]["w_tensor"].at[
      spec.tensor_names().index("log_rms/grad"), 1].set(1.0 / A)
  params, _ = _params_and_grads()
  _assert_rule(lopt, theta, lambda g, t: jax.tree.map(lambda x, p: -0.01 * x - 0.01 * 0.5 * p, g, params))


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_hierarchical_reduces_to_sgd(weight_decay):
  lopt = lo.HierarchicalLOpt(exp_mult=A, step_mult=0.01, num_mlps=4, weight_decay=weight_decay)
  theta = _zeros_like(lopt.init_meta_params(jax.random.key(0)))
  spec = lopt.spec
  c = spec.param_names().index("grad")
  bank = theta["bank"]
  bank["w1"] = bank["w1"].at[:, c, 0].set(1.0).at[:, c, 1].set(-1.0)
  bank["w2"] = bank["w2"].at[:, 0, 0].set(-1.0).at[:, 1, 0].set(1.0)
  # Tensor input layout: [log RMS per channel, log param_scale, ...]; the linear skip of
  # the head sets log_scale = log RMS(grad) - log param_scale, so the relative-to-RMS
  # step becomes exactly step_mult * grad.
  n_t = len(spec.tensor_names())
  k = lopt.num_mlps
  theta["head"]["w_in"] = theta["head"]["w_in"].at[
      spec.tensor_names().index("log_rms/grad"), k].set(1.0).at[n_t, k].set(-1.0)
  params, _ = _params_and_grads()
  _assert_rule(lopt, theta, lambda g, t: jax.tree.map(
      lambda x, p: -0.01 * x - 0.01 * weight_decay * p, g, params))


def test_learned_lr_adam_equals_optax_adam():
  lopt = lo.LearnedLR(direction="adam", init_lr=0.03)
  theta = lopt.init_meta_params(jax.random.key(0))
  tx = optax.adam(0.03)
  params, _ = _params_and_grads()
  st = [tx.init(params)]

  def rule(g, t):
    u, st[0] = tx.update(g, st[0], params)
    return u

  _assert_rule(lopt, theta, rule)


def test_rule_reduction_survives_to_optax_and_bfloat16():
  lopt = lo.LearnedLR(init_lr=0.5)
  tx = lo.to_optax(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
  updates, _ = tx.update({"w": jnp.array([0.5, 1.0], jnp.bfloat16)}, tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32), [-0.25, -0.5], rtol=1e-6)
