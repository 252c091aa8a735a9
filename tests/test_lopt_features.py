"""Feature values: per-tensor normalization, Adafactor, Muon, horizons, loss features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt import features as F

ALL = tuple(f for f in F.PARAM_GROUPS if f != "saferate") + F.GLOBAL_GROUPS  # saferate: own test


def _run(spec, grads_seq, params, losses, num_steps=4):
  state = F.init_state(spec, params, num_steps)
  compute = jax.jit(lambda g, s, l: F.compute(spec, g, params, s, loss=l))
  out = None
  for g, l in zip(grads_seq, losses):
    out, state = compute(g, state, jnp.float32(l))
  return out, state


def _problem(steps=3):
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (8, 6)), "conv": jax.random.normal(key, (3, 3, 2, 4)),
            "b": jnp.zeros((6,))}
  grads = [jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, i), p.shape) * 10.0 ** i,
                        params) for i in range(steps)]
  return params, grads


@pytest.mark.slow
def test_shapes_names_and_per_tensor_normalization():
  spec = F.FeatureSpec(ALL)
  params, grads = _problem()
  f, state = _run(spec, grads, params, [3.0, 2.0, 1.0])
  leaves = jax.tree.leaves(params)
  assert len(f.per_param) == len(leaves)
  for chans, p in zip(f.per_param, leaves):
    assert len(chans) == len(spec.param_names())
    assert all(x.shape == p.shape for x in chans)
    rms = jnp.stack([jnp.sqrt(jnp.mean(jnp.square(x))) for x in chans])
    nonzero = rms > 0
    # Every channel has RMS 1 over its tensor (channels that are exactly 0 stay 0).
    np.testing.assert_allclose(rms[nonzero], 1.0, rtol=1e-4)
  assert f.per_tensor.shape == (len(leaves), len(spec.tensor_names()))
  assert f.global_.shape == (len(spec.global_names()),)
  assert int(state.step) == 3
  # log RMS of the gradient channel is the log of the raw gradient's RMS.
  g_w = grads[-1]["w"]
  i_w = [k for k, _ in sorted(params.items())].index("w")
  np.testing.assert_allclose(f.per_tensor[i_w, spec.tensor_names().index("log_rms/grad")],
                             jnp.log(jnp.sqrt(jnp.mean(g_w ** 2))), rtol=1e-5)


def test_adafactor_channels_match_factored_second_moment():
  spec = F.FeatureSpec(("adafactor",), rms_decay=0.5)
  params = {"w": jnp.ones((5, 3))}
  g1 = {"w": jax.random.normal(jax.random.key(1), (5, 3))}
  g2 = {"w": jax.random.normal(jax.random.key(2), (5, 3))}
  f, state = _run(spec, [g1, g2], params, [0.0, 0.0])
  r = 0.25 * jnp.mean(g1["w"] ** 2, 1) + 0.5 * jnp.mean(g2["w"] ** 2, 1)
  c = 0.25 * jnp.mean(g1["w"] ** 2, 0) + 0.5 * jnp.mean(g2["w"] ** 2, 0)
  np.testing.assert_allclose(state.rows[0], r, rtol=1e-6)
  direction = g2["w"] / jnp.sqrt(jnp.outer(r, c) / jnp.mean(r))
  direction = direction / jnp.sqrt(jnp.mean(direction ** 2))
  np.testing.assert_allclose(f.per_param[0][0], direction, rtol=1e-5)
  # Row factor is constant along columns, column factor constant along rows.
  assert float(jnp.ptp(f.per_param[0][1], axis=1).max()) == 0.0
  assert float(jnp.ptp(f.per_param[0][2], axis=0).max()) == 0.0


def test_muon_channel_is_orthogonalized_momentum():
  spec = F.FeatureSpec(("muon", "momentum"), momentum_decays=(0.0, 0.95))
  # An ill-conditioned gradient: singular values 1 .. 1e-3.
  u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (12, 12)))
  v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (6, 6)))
  g = (u[:, :6] * jnp.logspace(0, -3, 6)) @ v.T
  f, _ = _run(spec, [{"w": g}], {"w": jnp.zeros((12, 6))}, [0.0])
  s_muon = jnp.linalg.svd(f.per_param[0][0], compute_uv=False)
  s_mom = jnp.linalg.svd(f.per_param[0][2], compute_uv=False)
  assert float(s_mom.max() / s_mom.min()) > 500
  assert float(s_muon.max() / s_muon.min()) < 4  # Newton-Schulz flattens the spectrum
  # It approximates the polar factor U V^T of the momentum.
  polar = u[:, :6] @ v.T
  muon = f.per_param[0][0]
  cos = jnp.sum(muon * polar) / (jnp.linalg.norm(muon) * jnp.linalg.norm(polar))
  assert float(cos) > 0.9


def test_training_fraction_saturates_past_horizon_and_step_embed():
  spec = F.FeatureSpec(("grad", "train_frac", "step_embed"))
  params = {"w": jnp.ones((2,))}
  names = spec.global_names()
  fracs = []
  state = F.init_state(spec, params, 4)
  for _ in range(7):
    f, state = F.compute(spec, params, params, state)
    fracs.append(float(f.global_[names.index("train_frac")]))
  assert fracs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
  np.testing.assert_allclose(f.global_[names.index("step_embed@10")], np.tanh(6 / 10 - 1), rtol=1e-6)


def test_loss_features_are_relative_and_clipped():
  spec = F.FeatureSpec(("grad", "loss"), loss_decays=(0.5,))
  params = {"w": jnp.ones((2,))}
  f, _ = _run(spec, [params] * 2, params, [4.0, 2.0])
  # ema after two steps: 0.5 * 4 + 0.5 * 2 = 3; loss vs ema = (2 - 3) / 3; ema vs first = -1/4.
  np.testing.assert_allclose(f.global_, [-1.0 / 3.0, -0.25], rtol=1e-6)
  f, _ = _run(spec, [params] * 2, params, [1.0, float("nan")])
  assert bool(jnp.all(jnp.isfinite(f.global_))) and float(f.global_.max()) == F.LOSS_FEATURE_CLIP


def test_bad_feature_selection_is_named():
  with pytest.raises(ValueError, match="repeat"):
    F.FeatureSpec(("grad", "grad"))
  with pytest.raises(ValueError, match="per-parameter group"):
    F.FeatureSpec(("loss",))
  with pytest.raises(ValueError, match="tuple of names"):
    F.FeatureSpec("grad")


@pytest.mark.slow
def test_saferate_channel_carries_the_certified_step():
  from learned_opt.baselines import saferate_step
  spec = F.FeatureSpec(("adam", "saferate"), momentum_decays=(0.9,))
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.3, -0.1])}
  value_fn = lambda p: sum(jnp.sum(jnp.tanh(x) + x ** 2) for x in jax.tree.leaves(p))
  grads = jax.grad(value_fn)(params)
  with pytest.raises(ValueError, match="value_fn"):
    F.compute(spec, grads, params, F.init_state(spec, params, None))
  f, _ = jax.jit(lambda g: F.compute(spec, g, params, F.init_state(spec, params, None),
                                     value_fn=value_fn))(grads)
  # After one step m = 0.1 g and v = 0.001 g^2, so d = -m / sqrt(v) = -sqrt(10) sign(g).
  d = jax.tree.map(lambda g: -0.1 * g / jnp.sqrt(1e-3 * g ** 2), grads)
  eta, _ = saferate_step(value_fn, params, d, F.SAFERATE_MAX_LR)
  assert 0.0 < float(eta) < F.SAFERATE_MAX_LR
  names = spec.tensor_names()
  log_eta = (f.per_tensor[:, names.index("log_rms/saferate")]
             - f.per_tensor[:, names.index("log_rms/adam@0.9")])
  np.testing.assert_allclose(log_eta, jnp.log(eta) * jnp.ones(2), rtol=1e-4)


@pytest.mark.parametrize("shape", [(), (7,), (4096,), (3, 3, 16, 32), (784, 1024), (1024, 256),
                                   (33, 65), (5, 64)])
def test_sums_match_numpy_in_one_pass(shape):
  from learned_opt import _sums
  xs = [jax.random.normal(jax.random.key(i), shape) for i in range(3)]
  got = jax.jit(_sums.sums)(xs)
  for x, s in zip(xs, got):
    assert s.shape == ()
    np.testing.assert_allclose(float(s), float(np.sum(np.asarray(x, np.float64))), rtol=1e-5, atol=1e-3)
  assert _sums.sums([]) == []


def test_moments_are_one_stacked_array_per_leaf():
  spec = F.FeatureSpec(("grad", "momentum", "rms"), momentum_decays=(0.5, 0.9), rms_decay=0.8)
  params, grads = _problem(steps=2)
  _, state = _run(spec, grads, params, [1.0, 1.0])
  g1, g2 = grads
  for i, (a, b) in enumerate(zip(jax.tree.leaves(g1), jax.tree.leaves(g2))):
    assert state.moments[i].shape == (3, *a.shape)
    for k, d in enumerate((0.5, 0.9)):
      np.testing.assert_allclose(F.momenta(spec, state, i)[k], d * (1 - d) * a + (1 - d) * b,
                                 rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.second_moment(spec, state, i),
                               0.8 * 0.2 * a ** 2 + 0.2 * b ** 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="keep no momenta"):
    F.momenta(F.FeatureSpec(("grad", "rms")), state, 0)


@pytest.mark.parametrize("decay", [0.9, 0.3])  # 0.9: derived from the new momentum; 0.3: read
def test_cosine_momentum_sums_use_the_previous_momentum(decay):
  spec = F.FeatureSpec(("grad", "momentum"), momentum_decays=(decay,))
  params, grads = _problem(steps=4)
  state = F.init_state(spec, params, None)
  compute = jax.jit(lambda g, s: F.compute(spec, g, params, s, cosine_momentum=0))
  for step, g in enumerate(grads):
    old = [F.momenta(spec, state, i)[0] for i in range(len(jax.tree.leaves(params)))]
    f, state = compute(g, state)
    for i, (gi, m) in enumerate(zip(jax.tree.leaves(g), old)):
      want = np.array([np.sum(np.float64(gi) ** 2), np.sum(np.float64(m) ** 2),
                       np.sum(np.float64(gi) * np.float64(m))])
      if step == 0:  # m = 0: exact zeros, not rounding
        assert float(f.momentum_sums[i, 1]) == 0.0 and float(f.momentum_sums[i, 2]) == 0.0
      scale = np.sqrt(want[0] * max(want[1], 1e-30))
      np.testing.assert_allclose(f.momentum_sums[i], want, rtol=2e-4, atol=2e-5 * scale)
