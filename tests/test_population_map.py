"""The population layouts: vmap and lax.map give the same estimate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt as lo
from learned_opt.meta_train.estimators.pes import PES
from learned_opt.meta_train.estimators.truncation import ConstantTruncation
from learned_opt.tasks import QuadraticFamily


@pytest.mark.slow
def test_vmap_and_map_layouts_give_the_same_estimate():
  family = QuadraticFamily(dim=4)
  lopt = lo.HierarchicalLOpt()
  theta = lopt.init_meta_params(jax.random.key(0))
  grads = {}
  for mode in ("vmap", "map"):
    est = PES(family=family, lopt=lopt, schedule=ConstantTruncation(horizon=20), num_tasks=4,
              unroll_length=5, sigma=0.01, population_map=mode)
    state = est.init(jax.random.key(1), theta)
    state, out = est.estimate(jax.random.key(2), theta, state)
    grads[mode] = out
  flat = lambda out: jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(out.grad)])
  g_vmap, g_map = flat(grads["vmap"]), flat(grads["map"])
  scale = float(jnp.abs(g_map).max())
  assert scale > 0
  # Same members, keys and pairs; only the rounding of batched vs one-by-one matmuls
  # differs, and ES divides loss differences by sigma (float32: ~2e-4 of the largest
  # entry here).
  np.testing.assert_allclose(g_vmap, g_map, rtol=0, atol=2e-3 * scale)
  np.testing.assert_allclose(grads["vmap"].meta_loss, grads["map"].meta_loss, rtol=1e-5)
