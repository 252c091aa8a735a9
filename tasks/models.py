"""Flax models of the inner tasks, written so sampled hyperparameters can vmap.

Width, depth and activation arrive as *arrays* (from a task config): layers are built
at their maximum size and masked to the sampled width; depth beyond the sampled value
is an identity; the activation is picked with `lax.switch`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Order matters: a config's activation id indexes this tuple.
ACTIVATIONS = (
    ("relu", jax.nn.relu),
    ("tanh", jnp.tanh),
    ("gelu", jax.nn.gelu),
    ("silu", jax.nn.silu),
)


def activate(act_id: jax.Array, x: jax.Array) -> jax.Array:
  return jax.lax.switch(act_id, [fn for _, fn in ACTIVATIONS], x)


def width_mask(width: jax.Array, max_width: int) -> jax.Array:
  return (jnp.arange(max_width) < width).astype(jnp.float32)


class MaskedMLP(nn.Module):
  """Fully connected classifier: input -> `max_depth` hidden layers -> logits."""
  max_width: int
  max_depth: int
  num_outputs: int

  @nn.compact
  def __call__(self, x, *, width, depth, act_id):
    x = x.reshape((x.shape[0], -1))
    mask = width_mask(width, self.max_width)
    h = activate(act_id, nn.Dense(self.max_width)(x)) * mask
    for layer in range(1, self.max_depth):
      out = activate(act_id, nn.Dense(self.max_width)(h)) * mask
      h = jnp.where(layer < depth, out, h)  # layers past the sampled depth are identities
    return nn.Dense(self.num_outputs)(h)


class ConvNet(nn.Module):
  """Strided 3x3 conv stack, global average pool, linear head."""
  channels: Sequence[int]
  num_outputs: int

  @nn.compact
  def __call__(self, x, *, width_frac, act_id):
    for c in self.channels:
      x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME")(x)
      x = activate(act_id, x) * width_mask(jnp.ceil(width_frac * c), c)
    return nn.Dense(self.num_outputs)(jnp.mean(x, axis=(1, 2)))


class CharLSTM(nn.Module):
  """Embedding -> LSTM -> linear head over the vocabulary (next-token logits)."""
  vocab_size: int
  embed_dim: int
  max_hidden: int

  @nn.compact
  def __call__(self, tokens, *, hidden):
    x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
    h = nn.RNN(nn.OptimizedLSTMCell(self.max_hidden))(x)
    return nn.Dense(self.vocab_size)(h * width_mask(hidden, self.max_hidden))


class TransformerBlock(nn.Module):
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, *, act_id):
    d = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d)(nn.LayerNorm()(x), mask=mask)
    y = activate(act_id, nn.Dense(self.mlp_ratio * d)(nn.LayerNorm()(x)))
    return x + nn.Dense(d)(y)


class TransformerLM(nn.Module):
  """Decoder-only pre-LN transformer with learned positions (next-token logits)."""
  vocab_size: int
  model_dim: int
  num_heads: int
  num_layers: int
  max_len: int

  @nn.compact
  def __call__(self, tokens, *, act_id):
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.model_dim))
    x = nn.Embed(self.vocab_size, self.model_dim)(tokens) + pos[: tokens.shape[1]]
    for _ in range(self.num_layers):
      x = TransformerBlock(self.num_heads)(x, act_id=act_id)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))
