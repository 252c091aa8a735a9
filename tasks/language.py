"""Character-level language-model families: an LSTM and a small transformer."""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.tasks import base, models
from learned_opt.tasks.datasets import TextData
from learned_opt.tasks.sampling import (batch_weights, default_batch_and_init, int_uniform,
                                        sample_batch_and_init, scale_weights, weighted_cross_entropy)


class LanguageModelFamily(base.TaskFamily):
  """Shared data handling of the language-model families (abstract).

  Attributes:
    data: token ids of one long text (pytree leaves).
    seq_len: tokens per training sequence (the model predicts each next token).
    batch_size_range: sampled number of sequences per batch (masked from the maximum).
    full_batch_size: sequences in the deterministic full batch (evenly spaced windows).
  """
  data: TextData
  seq_len: int = struct.field(pytree_node=False, default=32)
  batch_size_range: tuple[int, int] = struct.field(pytree_node=False, default=(16, 32))
  full_batch_size: int = struct.field(pytree_node=False, default=64)

  @abc.abstractmethod
  def logits(self, cfg, params, tokens: jax.Array) -> jax.Array:
    """Next-token logits [B, T, vocab] for token ids [B, T]."""

  def _tokens(self, split):
    if split not in ("train", "test"):
      raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return self.data.train_tokens if split == "train" else self.data.test_tokens

  def _windows(self, tokens, starts):
    window = lambda s: jax.lax.dynamic_slice(tokens, (s,), (self.seq_len + 1,))
    seqs = jax.vmap(window)(starts)
    return seqs[:, :-1], seqs[:, 1:]

  def batch(self, cfg, key, split="train"):
    tokens = self._tokens(split)
    starts = jax.random.randint(key, (self.batch_size_range[1],), 0, tokens.shape[0] - self.seq_len - 1)
    inputs, targets = self._windows(tokens, starts)
    return {"inputs": inputs, "targets": targets,
            "weight": batch_weights(cfg["batch_size"], self.batch_size_range[1])}

  def full_batch(self, cfg, split="train"):
    tokens = self._tokens(split)
    starts = jnp.linspace(0, tokens.shape[0] - self.seq_len - 2, self.full_batch_size).astype(jnp.int32)
    inputs, targets = self._windows(tokens, starts)
    return {"inputs": inputs, "targets": targets, "weight": jnp.ones((self.full_batch_size,))}

  def loss(self, cfg, params, key, batch):
    del key
    return weighted_cross_entropy(self.logits(cfg, params, batch["inputs"]), batch["targets"], batch["weight"])

  def reference_loss(self, cfg):
    del cfg
    return jnp.log(float(self.data.vocab_size))

  def _common(self, key):
    return sample_batch_and_init(key, self.batch_size_range)

  def _common_default(self):
    return default_batch_and_init(self.batch_size_range)

  def _dummy_tokens(self):
    return jnp.zeros((1, self.seq_len), jnp.int32)


class CharLSTMFamily(LanguageModelFamily):
  """Char-level LSTM LM; hidden width, init scale and batch size sampled."""
  embed_dim: int = struct.field(pytree_node=False, default=32)
  hidden_range: tuple[int, int] = struct.field(pytree_node=False, default=(32, 64))

  @property
  def model(self):
    return models.CharLSTM(self.data.vocab_size, self.embed_dim, self.hidden_range[1])

  def sample(self, key):
    k_common, k_h = jax.random.split(key)
    return {**self._common(k_common), "hidden": int_uniform(k_h, *self.hidden_range)}

  def default_cfg(self):
    return {**self._common_default(), "hidden": jnp.asarray(self.hidden_range[1], jnp.int32)}

  def init_params(self, cfg, key):
    params = self.model.init(key, self._dummy_tokens(), hidden=cfg["hidden"])["params"]
    return scale_weights(params, cfg["init_scale"])

  def logits(self, cfg, params, tokens):
    return self.model.apply({"params": params}, tokens, hidden=cfg["hidden"])

  @property
  def name(self):
    return f"lstm{self.hidden_range[1]}_{self.data.name}"


class TransformerLMFamily(LanguageModelFamily):
  """Small decoder-only transformer LM; activation, init scale, batch size sampled."""
  model_dim: int = struct.field(pytree_node=False, default=64)
  num_heads: int = struct.field(pytree_node=False, default=4)
  num_layers: int = struct.field(pytree_node=False, default=2)

  @property
  def model(self):
    return models.TransformerLM(self.data.vocab_size, self.model_dim, self.num_heads,
                                self.num_layers, self.seq_len)

  def sample(self, key):
    k_common, k_a = jax.random.split(key)
    # tanh is left out: it trains transformers poorly and is not what users run.
    act = jax.random.choice(k_a, jnp.asarray([0, 2, 3], jnp.int32))
    return {**self._common(k_common), "act_id": act}

  def default_cfg(self):
    return {**self._common_default(), "act_id": jnp.asarray(2, jnp.int32)}

  def init_params(self, cfg, key):
    params = self.model.init(key, self._dummy_tokens(), act_id=cfg["act_id"])["params"]
    return scale_weights(params, cfg["init_scale"])

  def logits(self, cfg, params, tokens):
    return self.model.apply({"params": params}, tokens, act_id=cfg["act_id"])

  @property
  def name(self):
    return f"transformer{self.model_dim}x{self.num_layers}_{self.data.name}"
