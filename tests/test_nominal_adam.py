"""PerParamMLP(nominal="adam"): an untrained optimizer is Adam; its corrections are bounded."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import HierarchicalLOpt, PerParamMLP, nominals


def _params(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (6, 4)), "b": jax.random.normal(k2, (4,))}


def _loss(p):
  return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)


def _run(opt, params, steps=6):
  state = opt.init(params)
  out = []
  for _ in range(steps):
    loss, g = jax.value_and_grad(_loss)(params)
    u, state = opt.update(g, state, params, loss=loss)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out


def _zero_outputs(lopt, theta):
  if isinstance(lopt, PerParamMLP):
    return dict(theta, out=jax.tree.map(jnp.zeros_like, theta["out"]))
  bank = dict(theta["bank"], w2=jnp.zeros_like(theta["bank"]["w2"]),
              b2=jnp.zeros_like(theta["bank"]["b2"]))
  return dict(theta, head=jax.tree.map(jnp.zeros_like, theta["head"]), bank=bank)


@pytest.mark.parametrize("lopt", [
    PerParamMLP(hidden_sizes=(8,), nominal="adam", step_mult=3e-3, exp_mult=1.0),
    HierarchicalLOpt(tensor_hidden=8, nominal="adam", step_mult=3e-3, exp_mult=1.0,
                     features=("grad", "momentum", "adam", "loss"))],
    ids=["mlp", "hierarchical"])
def test_zero_output_layer_is_exactly_adam(lopt):
  theta = _zero_outputs(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = _params(jax.random.key(1))
  ours = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params)
  ref = _run(optax.adam(3e-3, b1=0.9, b2=0.999, eps=1e-8), params)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_untrained_optimizer_stays_close_to_adam_and_learns_a_step_scale():
  lopt = PerParamMLP(hidden_sizes=(8,), nominal="adam", step_mult=3e-3, exp_mult=1.0)
  theta = lopt.init_meta_params(jax.random.key(0))
  params = _params(jax.random.key(1))
  g = jax.grad(_loss)(params)
  state = lopt.init(theta, params, num_steps=10)
  u, _ = lopt.update(theta, g, state, params)
  # First Adam step is -lr * sign(g); the near-zero output layer perturbs it by < 5%.
  for x, gi in zip(jax.tree.leaves(u), jax.tree.leaves(g)):
    np.testing.assert_allclose(x, -3e-3 * jnp.sign(gi), rtol=0.05)
  # A log-scale bias of log(2) doubles every step; huge outputs stay bounded.
  theta2 = dict(theta, out={"w": jnp.zeros_like(theta["out"]["w"]),
                            "b": jnp.array([0.0, np.log(2.0)])})
  u2, _ = lopt.update(theta2, g, state, params)
  for x, gi in zip(jax.tree.leaves(u2), jax.tree.leaves(g)):
    np.testing.assert_allclose(x, -6e-3 * jnp.sign(gi), rtol=1e-4)
  theta3 = dict(theta, out={"w": jnp.zeros_like(theta["out"]["w"]),
                            "b": jnp.array([1e6, 1e6])})
  u3, _ = lopt.update(theta3, g, state, params)
  bound = 3e-3 * np.exp(4.0) * (1.0 + 3.0) * 1.001
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u3)) <= bound


def test_bad_nominal_settings_are_named():
  with pytest.raises(ValueError, match="nominal must be one of"):
    PerParamMLP(nominal="sgd")
  with pytest.raises(ValueError, match="needs the 'adam' feature group"):
    PerParamMLP(nominal="adam", features=("grad", "momentum"))
  with pytest.raises(ValueError, match="XLA path"):
    PerParamMLP(nominal="adam", fused="interpret")
  with pytest.raises(ValueError, match="needs the 'adam' feature group"):
    HierarchicalLOpt(nominal="adam", features=("grad",))


def test_checkpoint_round_trip_keeps_the_nominal(tmp_path):
  lopt = PerParamMLP(hidden_sizes=(8,), nominal="adam", exp_mult=1.0)
  theta = lopt.init_meta_params(jax.random.key(0))
  path = tmp_path / "a.lopt"
  learned_opt.save(path, lopt, theta)
  lopt2, theta2, _ = learned_opt.load(path)
  assert lopt2 == lopt
  for x, y in zip(jax.tree.leaves(theta), jax.tree.leaves(theta2)):
    np.testing.assert_array_equal(x, y)


# ---- nominal="prodigy" (HierarchicalLOpt) -------------------------------------------------
def _prodigy_lopt(**kw):
  return HierarchicalLOpt(tensor_hidden=8, nominal="prodigy", exp_mult=1.0,
                          features=("grad", "momentum", "adam", "loss"), **kw)


@pytest.mark.slow
def test_zero_output_layer_is_exactly_prodigy():
  lopt = _prodigy_lopt()
  theta = _zero_outputs(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = _params(jax.random.key(1))
  ours = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params, steps=30)
  ref = _run(optax.contrib.prodigy(1.0, betas=(0.9, 0.999)), params, steps=30)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  # Prodigy moved: its step-size estimate grew far past its 1e-6 start (30 steps at
  # 1e-6 would move a coordinate by at most 3e-5).
  assert float(jnp.max(jnp.abs(ref[-1]["b"] - params["b"]))) > 3e-4


def test_prodigy_nominal_scale_correction_bounds_and_jit():
  lopt = _prodigy_lopt()
  theta = _zero_outputs(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = _params(jax.random.key(1))
  state = lopt.init(theta, params, num_steps=10)
  update = jax.jit(lopt.update)
  for _ in range(3):  # a few steps so Prodigy's step size is not at its floor
    loss, g = jax.value_and_grad(_loss)(params)
    u0, state = update(theta, g, state, params, loss=loss)
    params = optax.apply_updates(params, u0)
  assert update._cache_size() == 1   # no recompile after the first call
  loss, g = jax.value_and_grad(_loss)(params)
  u0, _ = update(theta, g, state, params, loss=loss)
  (pstate,) = state.nominal
  step = float(nominals.prodigy_step_size(pstate))
  # A head bias of log 2 on the step-scale output doubles every update.
  head = dict(theta["head"], b=theta["head"]["b"].at[lopt.num_mlps].set(np.log(2.0)))
  u2, _ = update(dict(theta, head=head), g, state, params, loss=loss)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(u0)):
    np.testing.assert_allclose(a, 2.0 * b, rtol=1e-5)
  # Whatever the meta-parameters: |update| <= (|prodigy| + 3 step) * e^4.
  wild = jax.tree.map(lambda x: x + 1e3, theta)
  u3, _ = update(wild, g, state, params, loss=loss)
  for a, b in zip(jax.tree.leaves(u3), jax.tree.leaves(u0)):
    assert bool(jnp.all(jnp.abs(a) <= (jnp.abs(b) + 3.0 * step) * np.exp(4.0) * 1.001))
  with pytest.raises(ValueError, match=r"PerParamMLP has no per-tensor network or nominal "
                                       r"state.*got nominal='prodigy', which keeps state"):
    PerParamMLP(nominal="prodigy")
  # A tighter trust region around Prodigy: |update| <= (|prodigy| + 3 step) * e^0.5.
  tight = _prodigy_lopt(nominal_max_log_scale=0.5)
  u4, _ = jax.jit(tight.update)(wild, g, state, params, loss=loss)
  for a, b in zip(jax.tree.leaves(u4), jax.tree.leaves(u0)):
    assert bool(jnp.all(jnp.abs(a) <= (jnp.abs(b) + 3.0 * step) * np.exp(0.5) * 1.001))
  with pytest.raises(ValueError, match="nominal_max_log_scale must be a number >= 0, got -1"):
    _prodigy_lopt(nominal_max_log_scale=-1)


def test_prodigy_nominal_checkpoint_round_trip(tmp_path):
  lopt = _prodigy_lopt()
  theta = lopt.init_meta_params(jax.random.key(0))
  learned_opt.save(tmp_path / "p.lopt", lopt, theta)
  lopt2, theta2, _ = learned_opt.load(tmp_path / "p.lopt")
  assert lopt2 == lopt and lopt2.nominal == nominals.ProdigyNominal()
  params = _params(jax.random.key(1))
  a = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params, steps=3)
  b = _run(learned_opt.to_optax(lopt2, theta2, num_steps=10), params, steps=3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
