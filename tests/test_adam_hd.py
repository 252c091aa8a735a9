"""Hypergradient Adam (`baselines.adam_hd`) and HierarchicalLOpt(nominal="adam_hd")."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import HierarchicalLOpt, nominals
from learned_opt.baselines import adam_hd, scale_by_adam_hd


def _params(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (6, 4)), "b": jax.random.normal(k2, (4,))}


def _loss(p):
  return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)


def _run(opt, params, loss_fn=_loss, steps=6):
  state = opt.init(params)
  out = []
  for _ in range(steps):
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, state = opt.update(g, state, params, loss=loss)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


# HierarchicalLOpt derives the cosine's sums from the momentum after the step
# (`feature_state.previous_momentum_sums`): the same math as adam_hd, rounded differently.
_HD_TOL = dict(rtol=1e-4, atol=1e-6)


def _close(xs, ys, **kw):
  for a, b in zip(xs, ys):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, **kw)


def test_rate_zero_is_adam():
  params = _params(jax.random.key(1))
  ours, _ = _run(adam_hd(3e-3, rate=0.0), params)
  ref, _ = _run(optax.adam(3e-3), params)
  _close(ours, ref, rtol=1e-6, atol=1e-8)


def test_log_lr_follows_the_cosine_of_gradient_and_previous_momentum():
  params = _params(jax.random.key(2))
  opt = scale_by_adam_hd(rate=0.05)
  state = opt.init(params)
  grads, mu = [], jax.tree.map(jnp.zeros_like, params)
  expected = np.zeros(2)
  for _ in range(4):
    g = jax.grad(_loss)(params)
    for i, (gi, mi) in enumerate(zip(jax.tree.leaves(g), jax.tree.leaves(mu))):
      gi, mi = np.asarray(gi, np.float64).ravel(), np.asarray(mi, np.float64).ravel()
      n = np.linalg.norm(gi) * np.linalg.norm(mi)
      expected[i] += 0.05 * (gi @ mi / n if n > 0 else 0.0)   # 0 at the first step
    u, state = opt.update(g, state, params)
    mu = jax.tree.map(lambda m, gg: 0.9 * m + 0.1 * gg, mu, g)
    params = optax.apply_updates(params, jax.tree.map(lambda x: -3e-3 * x, u))
    grads.append(g)
  np.testing.assert_allclose(state.log_lr, expected, rtol=1e-5)
  assert np.all(expected > 0.1)   # small steps on a smooth loss: gradients keep aligning


@pytest.mark.slow
def test_oscillation_shrinks_the_rate_within_its_bound():
  # lr 1 on 0.5 x^2 from x = 1e-3: every Adam step overshoots, the gradient flips sign.
  # Adam's momentum turns slower than the gradient, so the cosine alternates in sign
  # with a negative drift.
  quad = lambda p: 0.5 * jnp.sum(p["x"] ** 2)
  opt, params = adam_hd(1.0, rate=0.05, max_log_lr=0.5), {"x": jnp.array([1e-3])}
  state, log_lrs = opt.init(params), []
  for _ in range(150):
    u, state = opt.update(jax.grad(quad)(params), state, params)
    params = optax.apply_updates(params, u)
    log_lrs.append(float(state[0].log_lr[0]))
  assert min(log_lrs) == pytest.approx(-0.5) and max(log_lrs[60:]) < -0.3   # shrank to the bound
  assert abs(float(params["x"][0])) < 1e-2


@pytest.mark.slow
def test_needs_no_learning_rate_on_an_ill_conditioned_quadratic():
  h = jnp.logspace(-3, 0, 20)
  quad = lambda p: 0.5 * jnp.sum(h * p["x"] ** 2)
  params = {"x": jnp.ones(20)}
  (ours, _), (ref, _) = _run(adam_hd(1e-3), params, quad, 400), _run(optax.adam(1e-3), params, quad, 400)
  assert float(quad(ours[-1])) < 0.1 * float(quad(ref[-1]))


def test_nan_gradient_leaves_the_rate_alone():
  opt = scale_by_adam_hd()
  params = {"x": jnp.ones(3)}
  state = opt.init(params)
  _, state = opt.update({"x": jnp.ones(3)}, state, params)
  _, state = opt.update({"x": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  assert float(state.log_lr[0]) == 0.0


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="rate must be a number >= 0, got -1"):
    adam_hd(rate=-1)
  with pytest.raises(ValueError, match="learning_rate must be a number > 0, got 0"):
    adam_hd(0)
  with pytest.raises(ValueError, match=r"hypergradient_rate=-0.1 \(AdamHDNominal.rate\): rate "
                                       "must be a number >= 0"):
    HierarchicalLOpt(nominal="adam_hd", features=("grad", "adam"), hypergradient_rate=-0.1)
  with pytest.raises(ValueError, match="needs the 'adam' feature group"):
    HierarchicalLOpt(nominal="adam_hd", features=("grad", "momentum"))


def _hd_lopt(**kw):
  return HierarchicalLOpt(tensor_hidden=8, nominal="adam_hd", step_mult=3e-3, exp_mult=1.0,
                          features=("grad", "momentum", "adam", "loss"), **kw)


def _zero_outputs(theta):
  bank = dict(theta["bank"], w2=jnp.zeros_like(theta["bank"]["w2"]),
              b2=jnp.zeros_like(theta["bank"]["b2"]))
  return dict(theta, head=jax.tree.map(jnp.zeros_like, theta["head"]), bank=bank)


@pytest.mark.slow
def test_untrained_hierarchical_is_adam_hd_and_does_not_recompile():
  lopt = _hd_lopt()
  theta = _zero_outputs(lopt.init_meta_params(jax.random.key(0)))
  params = _params(jax.random.key(1))
  ours, ostate = _run(learned_opt.to_optax(lopt, theta, num_steps=30), params, steps=30)
  ref, rstate = _run(adam_hd(3e-3), params, steps=30)
  _close(ours, ref, **_HD_TOL)
  # Same per-tensor learning rates, and they moved (so the check above is not Adam's).
  np.testing.assert_allclose(ostate.inner.nominal[0], rstate[0].log_lr, **_HD_TOL)
  assert float(jnp.max(jnp.abs(rstate[0].log_lr))) > 0.2
  update = jax.jit(lopt.update)
  state = lopt.init(theta, params, num_steps=30)
  for _ in range(3):
    loss, g = jax.value_and_grad(_loss)(params)
    u, state = update(theta, g, state, params, loss=loss)
    params = optax.apply_updates(params, u)
  assert update._cache_size() == 1


@pytest.mark.slow
def test_hierarchical_adam_hd_checkpoint_round_trip(tmp_path):
  lopt = _hd_lopt(hypergradient_rate=0.02, hypergradient_max_log_lr=4.0)
  theta = lopt.init_meta_params(jax.random.key(0))
  learned_opt.save(tmp_path / "hd.lopt", lopt, theta)
  lopt2, theta2, _ = learned_opt.load(tmp_path / "hd.lopt")
  assert lopt2 == lopt and lopt2.nominal == nominals.AdamHDNominal(rate=0.02, max_log_lr=4.0)
  for x, y in zip(jax.tree.leaves(theta), jax.tree.leaves(theta2)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_hierarchical_adam_hd_step_stays_within_the_rate_bound():
  lopt = _hd_lopt(nominal_max_log_scale=1.0, hypergradient_max_log_lr=2.0)
  theta = lopt.init_meta_params(jax.random.key(0))
  params = _params(jax.random.key(1))
  state = lopt.init(theta, params, num_steps=10)
  loss, g = jax.value_and_grad(_loss)(params)
  wild = jax.tree.map(lambda x: x + 1e3, theta)   # outputs saturate every clip
  u, _ = jax.jit(lopt.update)(wild, g, state, params, loss=loss)
  # The first Adam direction is sign(g); correction <= 3; total factor <= e^2.
  for x in jax.tree.leaves(u):
    assert float(jnp.max(jnp.abs(x))) <= 3e-3 * (1 + 3) * np.exp(2.0) * 1.001
  # A head bias of log 2 on the step-scale output doubles the untrained update.
  base = _zero_outputs(theta)
  head = dict(base["head"], b=base["head"]["b"].at[lopt.num_mlps].set(np.log(2.0)))
  u0, _ = lopt.update(base, g, state, params, loss=loss)
  u2, _ = lopt.update(dict(base, head=head), g, state, params, loss=loss)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(u0)):
    np.testing.assert_allclose(a, 2.0 * b, rtol=1e-5)


@pytest.mark.slow
def test_learned_hypergradient_rate_is_a_bounded_head_output():
  lopt = _hd_lopt(hypergradient_rate_max_log_scale=np.log(4.0), nominal_max_log_scale=0.5,
                  nominal_residual_clip=0.0)
  theta = _zero_outputs(lopt.init_meta_params(jax.random.key(0)))
  assert theta["head"]["b"].shape == (lopt.num_mlps + 2,)   # + the log rate factor
  params = _params(jax.random.key(1))
  # Zero outputs: the rate is hypergradient_rate, i.e. adam_hd.
  ours, ostate = _run(learned_opt.to_optax(lopt, theta, num_steps=20), params, steps=20)
  ref, _ = _run(adam_hd(3e-3), params, steps=20)
  _close(ours, ref, **_HD_TOL)
  # A head bias of log 2 on the rate output is adam_hd at twice the rate.
  head = dict(theta["head"], b=theta["head"]["b"].at[lopt.num_mlps + 1].set(np.log(2.0)))
  ours, ostate = _run(learned_opt.to_optax(lopt, dict(theta, head=head), num_steps=20),
                      params, steps=20)
  ref, rstate = _run(adam_hd(3e-3, rate=0.1), params, steps=20)
  _close(ours, ref, **_HD_TOL)
  np.testing.assert_allclose(ostate.inner.nominal[0], rstate[0].log_lr, **_HD_TOL)
  # Saturated meta-parameters: the rate is at most 4x (|move| <= 0.2 per step), the
  # direction stays Adam's (no residual) and the step factor within e^0.5.
  wild = jax.tree.map(lambda x: x + 1e3, theta)
  state = lopt.init(wild, params, num_steps=20)
  adam_state = optax.scale_by_adam().init(params)
  update, largest_move = jax.jit(lopt.update), 0.0
  for _ in range(8):
    loss, g = jax.value_and_grad(_loss)(params)
    before = state.nominal[0]
    u, state = update(wild, g, state, params, loss=loss)
    adam_dir, adam_state = optax.scale_by_adam().update(g, adam_state)
    moved = np.abs(np.asarray(state.nominal[0] - before))
    assert np.all(moved <= 4 * 0.05 + 1e-6)
    largest_move = max(largest_move, float(moved.max()))
    for x, a, l in zip(jax.tree.leaves(u), jax.tree.leaves(adam_dir), state.nominal[0]):
      ratio = np.asarray(-x / (3e-3 * np.exp(float(l)) * a))
      assert np.all(ratio >= np.exp(-0.5) * 0.999) and np.all(ratio <= np.exp(0.5) * 1.001)
    params = optax.apply_updates(params, u)
  assert largest_move > 0.05 + 1e-3   # the rate did leave hypergradient_rate
  assert update._cache_size() == 1


def test_learned_rate_needs_the_adam_hd_nominal():
  with pytest.raises(ValueError, match="hypergradient_rate_max_log_scale needs nominal='adam_hd'"):
    HierarchicalLOpt(nominal="adam", features=("grad", "momentum", "adam"),
                     hypergradient_rate_max_log_scale=0.5)
  with pytest.raises(ValueError, match="nominal_residual_clip must be a number >= 0, got -1"):
    _hd_lopt(nominal_residual_clip=-1.0)


def test_donated_step_copies_no_tensor_sized_state():
  # The hypergradient cosine needs the momentum from before the step; reading it after the
  # donated buffer received the new one would make XLA copy it every step.
  lopt = _hd_lopt()
  theta = lopt.init_meta_params(jax.random.key(0))
  tx = learned_opt.to_optax(lopt, theta, num_steps=30)
  params = {"w": jnp.ones((64, 48)), "b": jnp.zeros((48,))}

  def step(params, state):
    loss, g = jax.value_and_grad(_loss)(params)
    u, state = tx.update(g, state, params, loss=loss)
    return optax.apply_updates(params, u), state

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)).compile().as_text()
  copies = [line for line in hlo.splitlines() if " copy(" in line and "64,48" in line]
  assert not copies, copies
