"""The fused per-parameter kernel equals the XLA path (Pallas interpret mode, no GPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt as lo
from learned_opt import fused

# Shapes with a masked tail block (37*21 = 777 is no multiple of the block), a vector, a
# scalar and a 3-D tensor.
SHAPES = {"w": (37, 21), "b": (21,), "s": (), "conv": (3, 3, 4, 5)}
BLOCK = 64


def _problem(seed, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 2 * len(SHAPES))
  params = {k: jax.random.normal(keys[i], s, dtype) for i, (k, s) in enumerate(SHAPES.items())}
  grads = {k: (0.1 * jax.random.normal(keys[len(SHAPES) + i], s)).astype(dtype)
           for i, (k, s) in enumerate(SHAPES.items())}
  params["b"] = jnp.zeros_like(params["b"])  # an all-zero channel: normalizer at its floor
  return params, grads


def _two_steps(lopt, params, grads, **kw):
  theta = lopt.init_meta_params(jax.random.key(7))
  state = lopt.init(theta, params, num_steps=100)
  upd = jax.jit(lambda s, g: lopt.update(theta, g, s, params, loss=jnp.float32(2.0), **kw))
  _, state = upd(state, grads)
  grads2 = jax.tree.map(lambda g: -0.5 * g + 0.01, grads)
  return upd(state, grads2)


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    scale = np.max(np.abs(y)) + 1e-30
    assert np.max(np.abs(x - y)) <= 1e-5 * scale, (np.max(np.abs(x - y)), scale)


# Interpret mode is slow on a shared 2-core machine: the default config runs in the
# default suite, the others in the slow set.
@pytest.mark.parametrize("config", [
    dict(),  # default features (adafactor as side channels), hidden (32, 32)
    pytest.param(dict(features=("grad", "clipped_grad", "momentum", "adam", "muon",
                                "train_frac", "loss"),
                      hidden_sizes=(8,), weight_decay=0.1, mup=True), marks=pytest.mark.slow),
    pytest.param(dict(features=("grad", "param", "rms"), hidden_sizes=(16, 4, 32)),
                 marks=pytest.mark.slow),
])
def test_per_param_mlp_matches_xla(config):
  params, grads = _problem(0)
  # Non-finite gradient entries are sanitized the same way on both paths.
  grads["w"] = grads["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
  ref = _two_steps(lo.PerParamMLP(fused="xla", **config), params, grads)
  got = _two_steps(lo.PerParamMLP(fused="interpret", **config), params, grads)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(got[0]))
  _assert_close(got[0], ref[0])
  _assert_close(got[1], ref[1])  # same state: the kernel only reads it


@pytest.mark.slow
def test_bfloat16_params_keep_dtype():
  params, grads = _problem(1, jnp.bfloat16)
  ref = _two_steps(lo.PerParamMLP(fused="xla"), params, grads)
  got = _two_steps(lo.PerParamMLP(fused="interpret"), params, grads)
  for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0])):
    assert x.dtype == jnp.bfloat16
    # Both round the same float32 update to bfloat16: at most one bf16 ulp apart.
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=2 ** -7, atol=1e-12)


@pytest.mark.parametrize("config", [
    dict(), pytest.param(dict(weight_decay=0.1, mup=True, per_param_hidden=3),
                         marks=pytest.mark.slow)])
def test_hierarchical_matches_xla(config):
  """Per-tensor MLP weights (the mixed bank), hidden width below tl.dot's minimum."""
  params, grads = _problem(3)
  ref = _two_steps(lo.HierarchicalLOpt(fused="xla", **config), params, grads)
  got = _two_steps(lo.HierarchicalLOpt(fused="interpret", **config), params, grads)
  _assert_close(got[0], ref[0])
  _assert_close(got[1], ref[1])


def test_select_and_errors():
  assert fused.select("xla") is None
  assert fused.select("interpret") is True
  expected = False if jax.default_backend() == "gpu" else None
  assert fused.select("auto") is expected
  with pytest.raises(ValueError, match="fused must be one of"):
    fused.select("triton")
  with pytest.raises(ValueError, match="fused must be one of"):
    lo.PerParamMLP(fused="cuda")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      fused.select("pallas")


def test_no_recompile_on_second_call():
  params, grads = _problem(5)
  lopt = lo.PerParamMLP(fused="interpret", features=("grad", "momentum"), hidden_sizes=(16,))
  theta = lopt.init_meta_params(jax.random.key(0))
  traces = []

  @jax.jit
  def step(state, g):
    traces.append(1)
    return lopt.update(theta, g, state, params)

  state = lopt.init(theta, params)
  _, state = step(state, grads)
  u, state = step(state, grads)
  jax.block_until_ready(u)
  assert len(traces) == 1


def test_kernel_reads_momenta_rows_and_needs_them():
  from learned_opt.fused import kernel as fk
  g = jnp.arange(6.0).reshape(2, 3)
  kw = dict(w_in=jnp.ones((1, 4)), b_in=jnp.zeros(4), hidden=(), w_out=jnp.ones((4, 2)),
            b_out=jnp.zeros(2), exp_mult=0.0, has_wd=False, has_scale=False, interpret=True,
            scalars=fk.LeafScalars(*(jnp.float32(x) for x in (1.0, 1.0, 0.0, 1.0))))
  with pytest.raises(ValueError, match="need `moments`"):
    fk.leaf_update(g, g, None, None, channels=(fk.Channel("momentum", 0),), **kw)
  # Channel "momentum" 0 reads row 2 of the stacked accumulators: u = 4 relu(m) = 4 m.
  moments = jnp.stack([jnp.zeros_like(g), -jnp.ones_like(g), g + 1.0])
  u = fk.leaf_update(g, g, moments, None, channels=(fk.Channel("momentum", 0),),
                     momentum_rows=(2,), **kw)
  np.testing.assert_allclose(u, 4.0 * (g + 1.0))
