"""Image classification families: logistic regression, MLP, conv net."""
from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
from flax import struct

from learned_opt.tasks import base, models
from learned_opt.tasks.datasets import ImageData
from learned_opt.tasks.sampling import (batch_weights, default_batch_and_init, int_uniform,
                                        log_uniform, sample_batch_and_init, scale_weights,
                                        weighted_cross_entropy)


class ImageClassificationFamily(base.TaskFamily):
  """Shared data handling of the image families (abstract).

  Attributes:
    data: the dataset (arrays are pytree leaves, so jit sees them as arguments).
    batch_size_range: sampled minibatch size; batches are drawn at the maximum and
      the extra examples get weight 0.
    full_batch_size: examples in the deterministic full batch (first N of a split).
  """
  data: ImageData
  batch_size_range: tuple[int, int] = struct.field(pytree_node=False, default=(32, 128))
  full_batch_size: int = struct.field(pytree_node=False, default=1000)

  @abc.abstractmethod
  def logits(self, cfg, params, images: jax.Array) -> jax.Array:
    """Class logits [B, num_classes] for float images [B, H, W, C]."""

  def _split(self, split):
    if split not in ("train", "test"):
      raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return (self.data.train_x, self.data.train_y) if split == "train" else (self.data.test_x, self.data.test_y)

  def _scale(self, x):
    return (x.astype(jnp.float32) / 255.0 - self.data.mean) / self.data.std

  def batch(self, cfg, key, split="train"):
    xs, ys = self._split(split)
    idx = jax.random.randint(key, (self.batch_size_range[1],), 0, xs.shape[0])
    return {"image": self._scale(xs[idx]), "label": ys[idx],
            "weight": batch_weights(cfg["batch_size"], self.batch_size_range[1])}

  def full_batch(self, cfg, split="train"):
    xs, ys = self._split(split)
    n = min(self.full_batch_size, xs.shape[0])
    return {"image": self._scale(xs[:n]), "label": ys[:n], "weight": jnp.ones((n,))}

  def loss(self, cfg, params, key, batch):
    del key
    return weighted_cross_entropy(self.logits(cfg, params, batch["image"]), batch["label"], batch["weight"])

  def metrics(self, cfg, params, batch):
    correct = jnp.argmax(self.logits(cfg, params, batch["image"]), -1) == batch["label"]
    return {"accuracy": jnp.sum(correct * batch["weight"]) / jnp.sum(batch["weight"])}

  def reference_loss(self, cfg):
    del cfg
    return jnp.log(float(self.data.num_classes))

  def _common(self, key):
    return sample_batch_and_init(key, self.batch_size_range)

  def _common_default(self):
    return default_batch_and_init(self.batch_size_range)


class LogisticRegressionFamily(ImageClassificationFamily):
  """Multinomial logistic regression on flattened pixels with a sampled L2 penalty."""
  l2_range: tuple[float, float] = struct.field(pytree_node=False, default=(1e-5, 1e-3))

  def sample(self, key):
    k_common, k_l2 = jax.random.split(key)
    return {**self._common(k_common), "l2": log_uniform(k_l2, *self.l2_range)}

  def default_cfg(self):
    return {**self._common_default(), "l2": jnp.asarray(self.l2_range[0], jnp.float32)}

  def init_params(self, cfg, key):
    dim = math.prod(self.data.image_shape)
    w = jax.random.normal(key, (dim, self.data.num_classes)) * cfg["init_scale"] / jnp.sqrt(dim)
    return {"kernel": w, "bias": jnp.zeros((self.data.num_classes,))}

  def logits(self, cfg, params, images):
    return images.reshape((images.shape[0], -1)) @ params["kernel"] + params["bias"]

  def loss(self, cfg, params, key, batch):
    return super().loss(cfg, params, key, batch) + cfg["l2"] * jnp.sum(params["kernel"] ** 2)

  @property
  def name(self):
    return f"logreg_{self.data.name}"


class MLPImageFamily(ImageClassificationFamily):
  """MLP classifier; width, depth, activation, init scale and batch size sampled."""
  width_range: tuple[int, int] = struct.field(pytree_node=False, default=(32, 128))
  max_depth: int = struct.field(pytree_node=False, default=3)

  @property
  def model(self):
    return models.MaskedMLP(self.width_range[1], self.max_depth, self.data.num_classes)

  def sample(self, key):
    k_common, k_w, k_d, k_a = jax.random.split(key, 4)
    return {**self._common(k_common), "width": int_uniform(k_w, *self.width_range),
            "depth": int_uniform(k_d, 1, self.max_depth),
            "act_id": int_uniform(k_a, 0, len(models.ACTIVATIONS) - 1)}

  def default_cfg(self):
    return {**self._common_default(), "width": jnp.asarray(self.width_range[1], jnp.int32),
            "depth": jnp.asarray(min(2, self.max_depth), jnp.int32), "act_id": jnp.asarray(0, jnp.int32)}

  def init_params(self, cfg, key):
    x = jnp.zeros((1,) + self.data.image_shape)
    params = self.model.init(key, x, width=cfg["width"], depth=cfg["depth"], act_id=cfg["act_id"])
    return scale_weights(params["params"], cfg["init_scale"])

  def logits(self, cfg, params, images):
    return self.model.apply({"params": params}, images, width=cfg["width"], depth=cfg["depth"],
                            act_id=cfg["act_id"])

  @property
  def name(self):
    return f"mlp{self.width_range[1]}x{self.max_depth}_{self.data.name}"


class ConvNetFamily(ImageClassificationFamily):
  """Small conv net; channel fraction, activation, init scale and batch size sampled."""
  channels: tuple[int, ...] = struct.field(pytree_node=False, default=(8, 16, 16))

  @property
  def model(self):
    return models.ConvNet(self.channels, self.data.num_classes)

  def sample(self, key):
    k_common, k_w, k_a = jax.random.split(key, 3)
    return {**self._common(k_common), "width_frac": jax.random.uniform(k_w, (), minval=0.5, maxval=1.0),
            "act_id": int_uniform(k_a, 0, len(models.ACTIVATIONS) - 1)}

  def default_cfg(self):
    return {**self._common_default(), "width_frac": jnp.asarray(1.0), "act_id": jnp.asarray(0, jnp.int32)}

  def init_params(self, cfg, key):
    x = jnp.zeros((1,) + self.data.image_shape)
    params = self.model.init(key, x, width_frac=cfg["width_frac"], act_id=cfg["act_id"])
    return scale_weights(params["params"], cfg["init_scale"])

  def logits(self, cfg, params, images):
    return self.model.apply({"params": params}, images, width_frac=cfg["width_frac"], act_id=cfg["act_id"])

  @property
  def name(self):
    return f"conv{'-'.join(map(str, self.channels))}_{self.data.name}"
