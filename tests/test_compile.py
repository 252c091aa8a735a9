"""`learned_opt.compile`: the CPU compiler options and the `jit` that applies them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt as lo
from learned_opt import compile as lopt_compile

YNN_KEY = "xla_cpu_experimental_ynn_fusion_type"


def _entry_fusions(hlo: str) -> int:
  """Fusions in the compiled entry computation. XLA's defaults already hand single dots
  to YNNPACK; the option fuses a whole dot chain (dots and relus) into one kernel."""
  return hlo[hlo.index("\nENTRY"):].count(" fusion(")


def test_options_per_backend_and_env(monkeypatch):
  monkeypatch.delenv(lopt_compile.ENV_VAR, raising=False)
  monkeypatch.setattr(lopt_compile, "cpu_has_avx512", lambda: False)
  assert lo.compiler_options("cpu") == {YNN_KEY: "LIBRARY_FUSION_TYPE_DOT"}
  monkeypatch.setattr(lopt_compile, "cpu_has_avx512", lambda: True)
  assert lo.compiler_options("cpu") == {YNN_KEY: "LIBRARY_FUSION_TYPE_DOT",
                                        "xla_cpu_prefer_vector_width": 512}
  assert lo.compiler_options("gpu") == {}
  assert lo.compiler_options("gpu") == {}
  assert lo.compiler_options("tpu") == {}
  lo.compiler_options("cpu")[YNN_KEY] = "changed"  # a fresh dict each call
  assert lo.compiler_options("cpu")[YNN_KEY] == "LIBRARY_FUSION_TYPE_DOT"
  monkeypatch.setenv(lopt_compile.ENV_VAR, "0")
  assert lo.compiler_options("cpu") == {}
  monkeypatch.setenv(lopt_compile.ENV_VAR, "yes")
  with pytest.raises(ValueError, match="LOPT_CPU_YNN must be '0', '1' or unset, got 'yes'"):
    lo.compiler_options("cpu")


@pytest.mark.parametrize("flag", [None, "0", "1"])
def test_lopts_own_jits_use_the_options_only_when_opted_in(monkeypatch, flag):
  """Experimental XLA option (a vmapped LSTM meta-training estimate deadlocked with it):
  lopt's own loops compile with XLA's defaults unless LOPT_CPU_YNN=1."""
  if flag is None:
    monkeypatch.delenv(lopt_compile.ENV_VAR, raising=False)
  else:
    monkeypatch.setenv(lopt_compile.ENV_VAR, flag)
  on_cpu = jax.default_backend() == "cpu"
  assert lopt_compile.internal_options() == (
      lo.compiler_options() if flag == "1" and on_cpu else {})
  assert (YNN_KEY in lopt_compile.internal_options()) == (flag == "1" and on_cpu)
  f = lopt_compile.jit(lambda x, w: jax.nn.relu(x @ w) @ w)
  x, w = jnp.ones((512, 16)), jnp.full((16, 16), 0.1)
  hlo = f.lower(x, w).compile().as_text()
  if on_cpu:
    assert (_entry_fusions(hlo) == 1) == (flag == "1")


def test_jit_matches_jax_jit_and_compiles_once(monkeypatch):
  monkeypatch.setenv(lopt_compile.ENV_VAR, "1")
  traces = []

  @lopt_compile.jit(static_argnums=1)
  def mlp(x, depth, w):
    traces.append(depth)
    for _ in range(depth):
      x = jax.nn.relu(x @ w)
    return x

  x = jax.random.normal(jax.random.key(0), (4096, 16))
  w = jax.random.normal(jax.random.key(1), (16, 16)) / 4
  got = mlp(x, 3, w)
  mlp(x + 1.0, 3, w)
  assert traces == [3]  # the second call reused the compilation
  assert mlp._cache_size() == 1
  want = jax.jit(mlp.__wrapped__, static_argnums=1)(x, 3, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert mlp.__name__ == "mlp"
  hlo = mlp.lower(x, 3, w).compile().as_text()
  if jax.default_backend() == "cpu":
    assert _entry_fusions(hlo) == 1  # the option reached XLA: the dot chain is one kernel
  with pytest.raises(TypeError, match="compiler_options"):
    lopt_compile.jit(lambda x: x, compiler_options={})


def test_jit_nested_in_a_users_trace():
  """Inside jit/vmap the options are left to the outer compilation (JAX allows them on
  top-level jits only)."""
  f = lopt_compile.jit(lambda x: jnp.tanh(x) * 2.0)
  x = jnp.arange(6.0)
  want = jnp.tanh(x) * 2.0
  np.testing.assert_allclose(jax.jit(lambda y: f(y) + 1.0)(x), want + 1.0, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(x[:, None])[:, 0], want, rtol=1e-6)
  # Inside a jit but with no traced argument: a closed-over constant.
  np.testing.assert_allclose(jax.jit(lambda y: f(x) + y)(1.0), want + 1.0, rtol=1e-6)
  np.testing.assert_allclose(f(x), want, rtol=1e-6)


@pytest.mark.parametrize("make", [lo.PerParamMLP, lo.PerParamLSTM], ids=["mlp", "lstm"])
def test_per_param_update_same_with_and_without_ynn(make):
  """The per-coordinate networks compile to YNN kernels and give the same updates."""
  opt = make()
  theta = opt.init_meta_params(jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 3)
  params = {"w": jax.random.normal(keys[0], (64, 48)), "b": jnp.zeros((48,))}
  grads = {"w": jax.random.normal(keys[1], (64, 48)), "b": jax.random.normal(keys[2], (48,))}
  state = opt.init(theta, params, num_steps=10)

  def two_steps(theta, grads, state, params):
    u, state = opt.update(theta, grads, state, params, loss=jnp.float32(1.0))
    return opt.update(theta, grads, state, params, loss=jnp.float32(0.9))

  plain = jax.jit(two_steps)
  fast = jax.jit(two_steps, compiler_options=lo.compiler_options() or None)
  want, got = plain(theta, grads, state, params), fast(theta, grads, state, params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(got[0]["w"]))) > 0
  if jax.default_backend() == "cpu":
    assert "ynn_fusion" in fast.lower(theta, grads, state, params).compile().as_text()
