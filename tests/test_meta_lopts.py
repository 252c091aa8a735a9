"""Tiny learned optimizers used by the meta-training tests, and their own checks.

`LearnedStepSize` follows the `LearnedOptimizer` contract (DESIGN.md) with the simplest
meta-parameters there are: log step sizes, a scalar or one per coordinate. Its
meta-objective on quadratics is smooth and cheap to differentiate, which is what the
estimator-correctness tests need.
"""
import jax
import jax.numpy as jnp
import optax
from flax import struct


class LearnedStepSize(struct.PyTreeNode):
  """SGD with learned log step sizes (shape `shape`, broadcast against each leaf)."""
  shape: tuple = struct.field(pytree_node=False, default=())
  init_log_lr: float = struct.field(pytree_node=False, default=-2.3)

  def init_meta_params(self, key):
    del key
    return {"log_lr": jnp.full(self.shape, self.init_log_lr, jnp.float32)}

  def init(self, meta_params, params, *, num_steps):
    del meta_params, params, num_steps
    return {"step": jnp.zeros((), jnp.int32)}

  def update(self, meta_params, grads, state, params, *, loss, key):
    del params, loss, key
    lr = jnp.exp(meta_params["log_lr"])
    return jax.tree.map(lambda g: -lr * g, grads), {"step": state["step"] + 1}


def test_learned_step_size_is_sgd():
  lopt = LearnedStepSize(init_log_lr=float(jnp.log(0.1)))
  theta = lopt.init_meta_params(jax.random.key(0))
  params = {"x": jnp.array([1.0, -2.0])}
  state = lopt.init(theta, params, num_steps=10)
  updates, state = lopt.update(theta, {"x": jnp.array([3.0, 4.0])}, state, params, loss=0.0, key=None)
  assert jnp.allclose(optax.apply_updates(params, updates)["x"], jnp.array([0.7, -2.4]))
  assert int(state["step"]) == 1
