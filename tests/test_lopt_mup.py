"""muP option: a hidden layer's output change per step stays O(1) as width grows.

Under muP (Yang et al. 2022; muLO, Therien et al. 2024) an Adam-like O(1)-per-coordinate
update of an n x n hidden matrix must shrink as 1/n, else the layer's output change
grows with n and an optimizer tuned at one width diverges at a wider one. With
meta-parameters set to "normalized gradient" (an Adam-like rule), we measure the change
of the hidden layer's output after one step at widths 32 and 256 (8x).
"""
import jax
import jax.numpy as jnp
import pytest

import learned_opt as lo

A = 0.001


def _normalized_gradient_theta(lopt):
  """Hand-set meta-params: d = -grad / RMS(grad) per tensor, log-magnitude 0."""
  theta = jax.tree.map(jnp.zeros_like, lopt.init_meta_params(jax.random.key(0)))
  c = lopt.spec.param_names().index("grad")
  if isinstance(lopt, lo.PerParamMLP):
    theta["w_param"] = theta["w_param"].at[c, 0].set(1.0).at[c, 1].set(-1.0)
    for layer in theta["hidden"]:
      layer["w"] = layer["w"].at[jnp.arange(2), jnp.arange(2)].set(1.0)
    theta["out"]["w"] = theta["out"]["w"].at[0, 0].set(-1.0).at[1, 0].set(1.0)
  else:  # HierarchicalLOpt: relative-to-RMS step with log step scale 0
    theta["bank"]["w1"] = theta["bank"]["w1"].at[:, c, 0].set(1.0).at[:, c, 1].set(-1.0)
    theta["bank"]["w2"] = theta["bank"]["w2"].at[:, 0, 0].set(-1.0).at[:, 1, 0].set(1.0)
  return theta


def _hidden_output_change(lopt, width):
  k = jax.random.split(jax.random.key(0), 5)
  d_in, batch = 8, 16
  x = jax.random.normal(k[0], (batch, d_in))
  y = jax.random.normal(k[1], (batch, 1))
  params = {  # muP init: input O(1/sqrt(d_in)), hidden 1/sqrt(n), readout 1/n
      "w_in": jax.random.normal(k[2], (d_in, width)) / jnp.sqrt(d_in),
      "w_h": jax.random.normal(k[3], (width, width)) / jnp.sqrt(width),
      "w_out": jax.random.normal(k[4], (width, 1)) / width,
  }
  hidden_in = lambda p: jax.nn.relu(x @ p["w_in"])
  loss = lambda p: jnp.mean((jax.nn.relu(hidden_in(p) @ p["w_h"]) @ p["w_out"] - y) ** 2)
  theta = _normalized_gradient_theta(lopt)
  grads = jax.grad(loss)(params)
  updates, _ = jax.jit(lopt.update)(theta, grads, lopt.init(theta, params), params)
  delta = hidden_in(params) @ updates["w_h"]
  return float(jnp.sqrt(jnp.mean(delta ** 2)))


@pytest.mark.parametrize("make,growth_without_mup", [
    (lambda mup: lo.PerParamMLP(features=("grad",), exp_mult=A, mup=mup, mup_base_fan_in=32), 4.0),
    (lambda mup: lo.HierarchicalLOpt(features=("grad",), exp_mult=A, mup=mup, mup_base_fan_in=32), 2.0),
])
def test_mup_keeps_hidden_output_change_constant_across_width(make, growth_without_mup):
  plain = _hidden_output_change(make(False), 256) / _hidden_output_change(make(False), 32)
  mup = _hidden_output_change(make(True), 256) / _hidden_output_change(make(True), 32)
  print(f"width 32 -> 256: output change x{plain:.2f} plain, x{mup:.2f} muP")
  assert plain > growth_without_mup  # standard parameterization: grows with width
  assert 0.6 < mup < 1.6             # muP: O(1) across an 8x width change
