"""Nominals as values (`learned_opt.nominals`): user-defined rules, config round trips,
legacy strings / flat keys / checkpoint headers, and the errors for bad values."""
import dataclasses
import json
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import HierarchicalLOpt, PerParamMLP, nominals
from learned_opt.nominals import AdamHDNominal, AdamNominal, Nominal, ProdigyNominal

_FEATURES = ("grad", "momentum", "adam", "loss")


@dataclasses.dataclass(frozen=True)
class ScaledSGDNominal(Nominal):
  """SGD at `factor * step_mult`: a stateless rule, defined outside the library."""
  kind: ClassVar[str] = "scaled_sgd_for_tests"
  factor: float = 2.0

  def leaf_update(self, values, inputs, i, correction, log_scale, *, step_mult,
                  max_log_scale, residual_clip):
    g = learned_opt.base.sanitize(inputs.grads[i])
    d = jnp.clip(correction, -residual_clip, residual_clip)
    return -(g + d) * jnp.exp(jnp.clip(log_scale, -max_log_scale, max_log_scale)) * (
        step_mult * self.factor)


@dataclasses.dataclass(frozen=True)
class HeavyBallNominal(Nominal):
  """Heavy-ball SGD whose per-tensor step factor is one more (bounded) head output; the
  LSTM reads each tensor's log velocity norm. Uses every hook of the protocol."""
  kind: ClassVar[str] = "heavy_ball_for_tests"
  keeps_state: ClassVar[bool] = True
  num_tensor_inputs: ClassVar[int] = 1
  decay: float = 0.9

  @property
  def num_head_outputs(self):
    return 1

  def init(self, params):
    return ([jnp.zeros_like(p) for p in params],)

  def tensor_inputs(self, state, inputs):
    norms = jnp.stack([jnp.log(jnp.sqrt(jnp.sum(v * v)) + 1e-12) for v in state[0]])
    return [norms[:, None]], None

  def advance(self, state, inputs, head, carry):
    v = [learned_opt.base.sanitize(g) + self.decay * m for g, m in zip(inputs.grads, state[0])]
    return (v, jnp.exp(jnp.clip(head[:, 0], -1.0, 1.0))), (v,)

  def leaf_update(self, values, inputs, i, correction, log_scale, *, step_mult,
                  max_log_scale, residual_clip):
    v, factor = values
    d = jnp.clip(correction, -residual_clip, residual_clip)
    scale = jnp.exp(jnp.clip(log_scale, -max_log_scale, max_log_scale))
    return -(v[i] + d) * scale * step_mult * factor[i]


def _params(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (6, 4)), "b": jax.random.normal(k2, (4,))}


def _loss(p):
  return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)


def _run(opt, params, steps=5):
  state, out = opt.init(params), []
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


def _assert_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("lopt", [
    HierarchicalLOpt(tensor_hidden=8, nominal=ScaledSGDNominal(factor=2.0), step_mult=0.01,
                     features=_FEATURES),
    PerParamMLP(hidden_sizes=(8,), nominal=ScaledSGDNominal(factor=2.0), step_mult=0.01,
                features=_FEATURES)], ids=["hierarchical", "mlp"])
def test_a_user_defined_nominal_untrained_is_its_rule(lopt):
  theta = _zero_outputs(lopt, lopt.init_meta_params(jax.random.key(0)))
  params = _params(jax.random.key(1))
  ours = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params)
  _assert_close(ours, _run(optax.sgd(0.02), params), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_stateful_user_nominal_reads_the_lstm_and_its_head_output():
  lopt = HierarchicalLOpt(tensor_hidden=8, nominal=HeavyBallNominal(decay=0.9),
                          step_mult=0.01, features=_FEATURES)
  theta = _zero_outputs(lopt, lopt.init_meta_params(jax.random.key(0)))
  # One more LSTM input column and one more head output than without a nominal.
  plain = HierarchicalLOpt(tensor_hidden=8, step_mult=0.01, features=_FEATURES)
  plain_theta = plain.init_meta_params(jax.random.key(0))
  assert theta["head"]["w_in"].shape == (plain_theta["head"]["w_in"].shape[0] + 1,
                                         lopt.num_mlps + 2)
  params = _params(jax.random.key(1))
  ours = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params)
  _assert_close(ours, _run(optax.sgd(0.01, momentum=0.9), params), rtol=1e-5, atol=1e-7)
  # A head bias of 0.5 on the nominal's output is heavy ball at e^0.5 the step; jit
  # compiles once for two equal optimizers.
  head = dict(theta["head"], b=theta["head"]["b"].at[lopt.num_mlps + 1].set(0.5))
  twin = HierarchicalLOpt(tensor_hidden=8, nominal=HeavyBallNominal(), step_mult=0.01,
                          features=_FEATURES)
  update = jax.jit(lambda lo, *a, loss: lo.update(*a, loss=loss), static_argnums=0)
  state = lopt.init(theta, params, num_steps=10)
  loss, g = jax.value_and_grad(_loss)(params)
  u1, _ = update(lopt, theta, g, state, params, loss=loss)
  u2, _ = update(twin, dict(theta, head=head), g, state, params, loss=loss)
  _assert_close(u2, jax.tree.map(lambda x: np.exp(0.5) * x, u1), rtol=1e-5)
  assert update._cache_size() == 1 and hash(lopt) == hash(twin)


@pytest.mark.parametrize("lopt", [
    HierarchicalLOpt(),
    HierarchicalLOpt(nominal=AdamNominal()),
    HierarchicalLOpt(nominal=AdamHDNominal(rate=0.02, max_log_lr=4.0, rate_max_log_scale=0.5)),
    HierarchicalLOpt(nominal=ProdigyNominal(), nominal_max_log_scale=1.0),
    PerParamMLP(),
    PerParamMLP(nominal=AdamNominal())], ids=lambda lo: f"{lo.name}-{lo.nominal}")
def test_config_round_trips_through_json(lopt):
  config = json.loads(json.dumps(lopt.config()))
  expected = None if lopt.nominal is None else lopt.nominal.config()
  assert config["nominal"] == expected
  assert "hypergradient_rate" not in config
  again = type(lopt).from_config(config)
  assert again == lopt and hash(again) == hash(lopt)


def test_legacy_strings_and_flat_keys_build_the_same_optimizer():
  assert HierarchicalLOpt(nominal="adam") == HierarchicalLOpt(nominal=AdamNominal())
  assert HierarchicalLOpt(nominal="none").nominal is None
  assert PerParamMLP(nominal="none") == PerParamMLP(nominal=None)
  assert PerParamMLP(nominal={"kind": "adam"}) == PerParamMLP(nominal="adam")
  legacy = HierarchicalLOpt(nominal="adam_hd", hypergradient_rate_max_log_scale=1.0,
                            hypergradient_rate=0.02, hypergradient_max_log_lr=4.0)
  assert legacy == HierarchicalLOpt(
      nominal=AdamHDNominal(rate=0.02, max_log_lr=4.0, rate_max_log_scale=1.0))
  # replace() keeps the folded nominal, or swaps it.
  assert legacy.replace(step_mult=0.1).nominal == legacy.nominal
  assert legacy.replace(nominal="adam") == HierarchicalLOpt(nominal="adam")


def test_legacy_headers_load_to_equal_optimizers(tmp_path):
  # The shipped hierarchical_hd header has the flat keys.
  header = learned_opt.read_header(learned_opt.pretrained_path("hierarchical_hd"))
  assert header["config"]["nominal"] == "adam_hd"
  lopt, theta, _ = learned_opt.load(learned_opt.pretrained_path("hierarchical_hd"))
  assert lopt.nominal == AdamHDNominal(rate=0.05, max_log_lr=6.0, rate_max_log_scale=0.693)
  assert lopt == HierarchicalLOpt.from_config(dict(header["config"]))
  # What the old code wrote for a non-adam_hd nominal: every flat key, at its default.
  old = dict(lopt.config(), nominal="adam", hypergradient_rate=0.05,
             hypergradient_max_log_lr=6.0, hypergradient_rate_max_log_scale=0.0)
  assert HierarchicalLOpt.from_config(old) == lopt.replace(nominal=AdamNominal())
  # Saved again, the header holds the new form and loads to the same optimizer and steps.
  learned_opt.save(tmp_path / "hd.lopt", lopt, theta)
  assert learned_opt.read_header(tmp_path / "hd.lopt")["config"]["nominal"]["kind"] == "adam_hd"
  lopt2, theta2, _ = learned_opt.load(tmp_path / "hd.lopt")
  assert lopt2 == lopt
  params = _params(jax.random.key(1))
  a = _run(learned_opt.to_optax(lopt, theta, num_steps=10), params, steps=2)
  b = _run(learned_opt.to_optax(lopt2, theta2, num_steps=10), params, steps=2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_registered_user_nominal_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(nominals, "NOMINALS", dict(nominals.NOMINALS))
  lopt = HierarchicalLOpt(tensor_hidden=8, nominal=ScaledSGDNominal(factor=3.0),
                          features=_FEATURES)
  theta = lopt.init_meta_params(jax.random.key(0))
  learned_opt.save(tmp_path / "u.lopt", lopt, theta)
  with pytest.raises(learned_opt.CheckpointError, match="kind 'scaled_sgd_for_tests'; expected "
                                                        "one of"):
    learned_opt.load(tmp_path / "u.lopt")  # unregistered: the header names an unknown kind
  nominals.register_nominal(ScaledSGDNominal)
  learned_opt.save(tmp_path / "u.lopt", lopt, theta)
  assert learned_opt.load(tmp_path / "u.lopt")[0] == lopt
  with pytest.raises(ValueError, match="kind 'adam' is already registered"):
    nominals.register_nominal(dataclasses.make_dataclass(
        "OtherAdam", [], bases=(AdamNominal,), frozen=True))


def test_yaml_configs_with_flat_keys_still_build():
  from learned_opt.meta_train.run import config as config_lib
  cfg = config_lib.load_config(str(pathlib.Path(__file__).resolve().parents[1] / "configs" /
                                   "pretrain_hierarchical_hd.yaml"))
  lopt = config_lib.build_lopt(cfg.lopt)
  assert lopt.nominal == AdamHDNominal(rate_max_log_scale=0.693)


def test_bad_values_are_named():
  with pytest.raises(ValueError, match=r"nominal must be one of \('none', 'adam', 'adam_hd', "
                                       r"'prodigy'\).*got 'sgd'"):
    HierarchicalLOpt(nominal="sgd")
  with pytest.raises(ValueError, match="has kind 'nope'; expected one of"):
    HierarchicalLOpt(nominal={"kind": "nope"})
  with pytest.raises(ValueError, match=r"unknown keys \['rat'\]; expected \['max_log_lr'"):
    HierarchicalLOpt(nominal={"kind": "adam_hd", "rat": 0.1})
  with pytest.raises(ValueError, match="rate must be a number >= 0, got -1"):
    AdamHDNominal(rate=-1)
  with pytest.raises(ValueError, match="hypergradient_rate needs nominal='adam_hd', got "
                                       "nominal='adam'"):
    HierarchicalLOpt(nominal="adam", hypergradient_rate=0.1)
  with pytest.raises(ValueError, match="hypergradient_rate=0.2 conflicts with nominal="):
    HierarchicalLOpt(nominal=AdamHDNominal(rate=0.1), hypergradient_rate=0.2)
  with pytest.raises(ValueError, match="which keeps state and reads per-tensor inputs"):
    PerParamMLP(nominal="adam_hd")
  with pytest.raises(ValueError, match="which keeps state and reads per-tensor inputs and has "
                                       "head outputs"):
    PerParamMLP(nominal=HeavyBallNominal())
  with pytest.raises(ValueError, match=r"nominal=ScaledSGDNominal\(factor=2.0\) runs on the "
                                       "XLA path; got fused='interpret'"):
    HierarchicalLOpt(nominal=ScaledSGDNominal(), fused="interpret")
  with pytest.raises(ValueError, match=r"nominal=AdamNominal\(\) needs the 'adam' feature group"):
    PerParamMLP(nominal="adam", features=("grad", "momentum"))
  with pytest.raises(ValueError, match=r"config has unknown keys \['hypergradient_rate'\]"):
    PerParamMLP.from_config({"hypergradient_rate": 0.05})

  class Mutable(Nominal):  # a Nominal that is no frozen dataclass
    kind = "mutable_for_tests"

    def leaf_update(self, *a, **k):
      raise AssertionError

  with pytest.raises(TypeError, match=r"Mutable must be a @dataclasses.dataclass\(frozen=True\)"):
    HierarchicalLOpt(nominal=Mutable())
