"""Small helpers shared by the task families: hyperparameter sampling and init scaling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def log_uniform(key: jax.Array, low: float, high: float) -> jax.Array:
  return jnp.exp(jax.random.uniform(key, (), minval=jnp.log(low), maxval=jnp.log(high)))


def int_uniform(key: jax.Array, low: int, high: int) -> jax.Array:
  """An int32 scalar uniform on [low, high] (both ends included)."""
  return jax.random.randint(key, (), low, high + 1).astype(jnp.int32)


def scale_weights(params, scale: jax.Array):
  """Multiplies weight matrices and embeddings (not biases or norms) by `scale`."""
  def _scale(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return leaf * scale if name in ("kernel", "embedding", "pos_embedding") else leaf
  return jax.tree_util.tree_map_with_path(_scale, params)


def batch_weights(batch_size: jax.Array, max_batch: int) -> jax.Array:
  """1 for the first `batch_size` examples of a max-size batch, 0 for the rest."""
  return (jnp.arange(max_batch) < batch_size).astype(jnp.float32)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over examples (and positions) with weight > 0.

  `weights` has the shape of `labels` or a prefix of it (per example).
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (losses.ndim - weights.ndim)),
                             losses.shape)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sample_batch_and_init(key: jax.Array, batch_size_range: tuple[int, int]) -> dict:
  """The config entries every dataset family samples: batch size and init scale."""
  k_bs, k_init = jax.random.split(key)
  return {"batch_size": int_uniform(k_bs, *batch_size_range), "init_scale": log_uniform(k_init, 0.5, 2.0)}


def default_batch_and_init(batch_size_range: tuple[int, int]) -> dict:
  return {"batch_size": jnp.asarray(batch_size_range[1], jnp.int32),
          "init_scale": jnp.asarray(1.0, jnp.float32)}
