"""Autoregressive image models: PixelCNN, Gated PixelCNN and PixelCNN++.

p(x) = prod_i prod_c p(x_{i,c} | x_{<i}, x_{i,<c}) over pixels i in raster
order and channels c in R -> G -> B order, trained by exact maximum
likelihood. ``make(model_config)`` returns the ``Family``; the keys it reads
from ``config.model`` (defaults in ``DEFAULTS``):

  architecture        "pixelcnn" | "gated_pixelcnn" | "pixelcnnpp"
  likelihood          "bernoulli" (binary data) | "categorical" (256-way per
                      channel) | "logistic_mixture" (PixelCNN++'s discretized
                      logistic mixture over whole pixels, coupled RGB means)
  binarize            "none" | "threshold" (pixel > 127) | "dynamic" (a fresh
                      Bernoulli(pixel / 255) draw per step; only with
                      "bernoulli"). "none" with "bernoulli" expects {0, 1}
                      data (e.g. tfds binarized_mnist).
  num_filters         hidden channels (PixelCNN: h, residual stream 2h)
  num_layers          residual blocks (pixelcnn) / gated layers (gated)
  kernel_size         hidden masked kernel (pixelcnn, gated)
  first_kernel_size   first (type A) kernel (pixelcnn, gated)
  num_output_filters  width of the 1x1 output layers (pixelcnn, gated)
  num_resnet          gated resnet blocks per stage (pixelcnnpp)
  dropout             dropout rate (pixelcnnpp)
  num_mixtures        logistic mixture components
  num_classes         0 = unconditional; else class-conditional on
                      batch["label"], samples cycle through labels 0..n-1.
  fast_sampling       run the net only on the rows that the current row
                      depends on (pixelcnn, gated); exact, same samples.

Sampling runs the network once per pixel (per-pixel mixture) or once per
channel of each pixel (per-channel likelihoods) inside ``lax.fori_loop``.
For PixelCNN and Gated PixelCNN the output at row r depends only on the
``receptive_rows`` rows ending at r, so with ``fast_sampling`` each step
runs the net on that window of rows instead of the whole canvas: the same
numbers at a fraction of the cost (e.g. 9 of 28 rows for the MNIST config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses
from gm_jax.autoregressive.layers import (
  DownRightShiftedConv,
  DownRightShiftedConvTranspose,
  DownShiftedConv,
  DownShiftedConvTranspose,
  MaskedConv,
  causal_mask,
  channel_groups,
  concat_elu,
  down_shift,
  right_shift,
)
from gm_jax.autoregressive.networks import (
  GatedPixelCNN,
  PixelCNN,
  PixelCNNPlusPlus,
)
from gm_jax.family import Family
from gm_jax.losses import binarize_images  # noqa: F401  (re-export)

__all__ = [
    "ARCHITECTURES", "BINARIZE", "DEFAULTS", "LIKELIHOODS", "ModelSpec",
    "DownRightShiftedConv", "DownRightShiftedConvTranspose", "DownShiftedConv",
    "DownShiftedConvTranspose", "GatedPixelCNN", "MaskedConv", "PixelCNN",
    "PixelCNNPlusPlus", "binarize_images", "build_network", "causal_mask",
    "channel_groups", "concat_elu", "default_model_config", "down_shift", "make", "parse_config",
    "rbg_key", "receptive_rows", "right_shift",
]

Array = jax.Array

ARCHITECTURES = ("pixelcnn", "gated_pixelcnn", "pixelcnnpp")
LIKELIHOODS = ("bernoulli", "categorical", "logistic_mixture")
BINARIZE = losses.BINARIZATIONS
NUM_BINS = 256  # 8-bit data.

DEFAULTS: Mapping[str, Any] = {
    "architecture": "pixelcnn",
    "likelihood": "bernoulli",
    "binarize": "threshold",
    "num_filters": 64,
    "num_layers": 7,
    "kernel_size": 3,
    "first_kernel_size": 7,
    "num_output_filters": 256,
    "num_resnet": 5,
    "dropout": 0.0,
    "num_mixtures": 10,
    "num_classes": 0,
    "fast_sampling": True,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The validated model config (see the module docstring for the keys)."""

  image_shape: tuple[int, int, int]
  architecture: str
  likelihood: str
  binarize: str
  num_filters: int
  num_layers: int
  kernel_size: int
  first_kernel_size: int
  num_output_filters: int
  num_resnet: int
  dropout: float
  num_mixtures: int
  num_classes: int
  fast_sampling: bool

  @property
  def per_channel(self) -> bool:
    """Whether the likelihood factors over channels (vs whole pixels)."""
    return self.likelihood != "logistic_mixture"

  @property
  def num_groups(self) -> int:
    """Colour groups the network orders inside a pixel."""
    return self.image_shape[2] if self.per_channel else 1

  @property
  def num_outputs(self) -> int:
    """Network outputs per group."""
    if self.likelihood == "bernoulli":
      return 1
    if self.likelihood == "categorical":
      return NUM_BINS
    return losses.mixture_num_params(self.image_shape[2], self.num_mixtures)


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` for this family with every key at its default."""
  config = ml_collections.ConfigDict(dict(DEFAULTS))
  config.family = "pixelcnn"
  config.image_shape = (28, 28, 1)
  return config


def parse_config(model_config: ml_collections.ConfigDict) -> ModelSpec:
  """Reads and validates ``config.model``; raises ValueError naming the key."""
  values = {k: model_config.get(k, v) for k, v in DEFAULTS.items()}
  shape = tuple(int(s) for s in model_config.get("image_shape", ()))
  spec = ModelSpec(image_shape=shape, **values)

  def need(cond, message):
    if not cond:
      raise ValueError(f"Invalid config.model for the pixelcnn family: "
                       f"{message}")

  need(len(shape) == 3 and min(shape) >= 1,
       f"image_shape={shape} must be (H, W, C) with positive sizes.")
  need(spec.architecture in ARCHITECTURES,
       f"architecture={spec.architecture!r}, expected one of {ARCHITECTURES}.")
  need(spec.likelihood in LIKELIHOODS,
       f"likelihood={spec.likelihood!r}, expected one of {LIKELIHOODS}.")
  need(spec.binarize in BINARIZE,
       f"binarize={spec.binarize!r}, expected one of {BINARIZE}.")
  need(spec.binarize == "none" or spec.likelihood == "bernoulli",
       f"binarize={spec.binarize!r} needs likelihood='bernoulli' (the"
       f" {spec.likelihood!r} likelihood models 8-bit data: use"
       " binarize='none').")
  need(spec.num_filters >= spec.num_groups,
       f"num_filters={spec.num_filters} must be >= the {spec.num_groups}"
       " colour groups.")
  for key in ("num_filters", "num_output_filters", "num_mixtures"):
    need(getattr(spec, key) >= 1, f"{key}={getattr(spec, key)} must be >= 1.")
  for key in ("num_layers", "num_resnet"):
    need(getattr(spec, key) >= 1, f"{key}={getattr(spec, key)} must be >= 1.")
  for key in ("kernel_size", "first_kernel_size"):
    need(getattr(spec, key) >= 1 and getattr(spec, key) % 2 == 1,
         f"{key}={getattr(spec, key)} must be a positive odd number.")
  need(0.0 <= spec.dropout < 1.0, f"dropout={spec.dropout} must be in [0, 1).")
  need(spec.num_classes >= 0, f"num_classes={spec.num_classes} must be >= 0.")
  if spec.architecture == "pixelcnnpp":
    need(shape[0] % 4 == 0 and shape[1] % 4 == 0,
         f"image_shape={shape}: pixelcnnpp halves H and W twice, so both must"
         " be divisible by 4.")
  return spec


def build_network(spec: ModelSpec):
  """The Flax module for ``spec.architecture``."""
  common = dict(num_outputs=spec.num_outputs, num_groups=spec.num_groups,
                num_filters=spec.num_filters, num_classes=spec.num_classes)
  if spec.architecture == "pixelcnn":
    return PixelCNN(num_layers=spec.num_layers, kernel_size=spec.kernel_size,
                    first_kernel_size=spec.first_kernel_size,
                    num_output_filters=spec.num_output_filters, **common)
  if spec.architecture == "gated_pixelcnn":
    return GatedPixelCNN(num_layers=spec.num_layers,
                         kernel_size=spec.kernel_size,
                         first_kernel_size=spec.first_kernel_size,
                         num_output_filters=spec.num_output_filters, **common)
  return PixelCNNPlusPlus(num_resnet=spec.num_resnet, dropout=spec.dropout,
                          **common)


def rbg_key(key: Array) -> Array:
  """A key of the "rbg" PRNG (XLA's RngBitGenerator) seeded from ``key``.

  Used for parameter initialisation and dropout: the networks have ~100
  parameter arrays and dozens of dropout layers, and XLA compiles one
  threefry circuit per draw (tens of seconds on a CPU for PixelCNN++),
  whereas RngBitGenerator draws compile in a fraction of that. The stream
  is deterministic for a given key and backend.
  """
  return jax.random.wrap_key_data(
      jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def receptive_rows(spec: ModelSpec) -> Optional[int]:
  """How many rows, ending at row r, the network's outputs at row r read.

  PixelCNN: the k1 x k1 input layer reaches k1 // 2 rows up and each masked
  k x k layer k // 2 more. Gated PixelCNN: the vertical stack reaches
  1 + k1 // 2 rows up in its first layer and k // 2 more per layer. None for
  PixelCNN++, whose U-Net sees the whole image.
  """
  k1, k = spec.first_kernel_size // 2, spec.kernel_size // 2
  if spec.architecture == "pixelcnn":
    return 1 + k1 + spec.num_layers * k
  if spec.architecture == "gated_pixelcnn":
    return 2 + k1 + (spec.num_layers - 1) * k
  return None


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the autoregressive family for ``config.model``."""
  spec = parse_config(model_config)
  net = build_network(spec)
  height, width, channels = spec.image_shape
  num_dims = height * width * channels
  conditional = spec.num_classes > 0
  rows_needed = receptive_rows(spec)
  window = (rows_needed if spec.fast_sampling and rows_needed is not None and
            rows_needed < height else None)

  def prepare(batch, key):
    """Network input in [-1, 1] and the discrete targets, [B, H, W, C]."""
    image = batch["image"]
    if tuple(image.shape[1:]) != spec.image_shape:
      raise ValueError(
          f"pixelcnn family: batch['image'] has shape {image.shape}, expected"
          f" [B, {height}, {width}, {channels}] (config.model.image_shape).")
    if spec.likelihood == "bernoulli":
      targets = losses.binarize_images(image, spec.binarize, key)
      return 2.0 * targets - 1.0, targets
    targets = image.astype(jnp.int32)
    return losses.scale_to_symmetric(targets, NUM_BINS), targets

  def labels(batch):
    return batch["label"] if conditional else None

  def log_prob_from_outputs(outputs, x, targets):
    """Per-example log p(x) [B] from network outputs [B, H, W, G * K]."""
    b = outputs.shape[0]
    if spec.likelihood == "bernoulli":
      logits = outputs.reshape(b, height, width, channels)
      per_dim = losses.bernoulli_log_prob(logits, targets)
    elif spec.likelihood == "categorical":
      logits = outputs.reshape(b, height, width, channels, NUM_BINS)
      per_dim = losses.categorical_log_prob(logits, targets)
    else:
      per_dim = losses.discretized_logistic_mixture_log_prob(
          x, outputs, spec.num_mixtures, NUM_BINS)  # [B, H, W]
    return losses.sum_except_batch(per_dim)

  def log_prob(params, batch, key, train):
    key_binarize, key_dropout = jax.random.split(key)
    x, targets = prepare(batch, key_binarize)
    rngs = {"dropout": rbg_key(key_dropout)} if train else None
    outputs = net.apply({"params": params}, x, labels(batch), train=train,
                        rngs=rngs)
    return log_prob_from_outputs(outputs, x, targets)

  def init(key, batch):
    x, _ = prepare(batch, key)
    variables = net.init(rbg_key(key), x, labels(batch), train=False)
    return variables["params"]

  def loss(params, batch, key, step):
    del step  # Unused: no schedule inside the model.
    nll = -log_prob(params, batch, key, train=True)  # [B]
    bpd = losses.bits_per_dim(nll, num_dims)
    return jnp.mean(nll), {"nll_nats": jnp.mean(nll), "bpd": jnp.mean(bpd)}

  def evaluate(params, batch, key):
    nll = -log_prob(params, batch, key, train=False)
    return {"nll_nats": nll, "bpd": losses.bits_per_dim(nll, num_dims)}

  def sample(params, key, num):
    label = (jnp.arange(num, dtype=jnp.int32) % spec.num_classes
             if conditional else None)

    def outputs_at(canvas, row, col):
      """The network's outputs for pixel (row, col): [num, G * K]."""
      if window is None:
        out = net.apply({"params": params}, canvas, label, train=False)
        return out[:, row, col]
      # Row `row` depends only on the `window` rows ending at it (see
      # `receptive_rows`), so run the net on those alone: the result is the
      # same, at window / H of the cost.
      top = jnp.maximum(row - window + 1, 0)
      rows = jax.lax.dynamic_slice_in_dim(canvas, top, window, axis=1)
      out = net.apply({"params": params}, rows, label, train=False)
      return out[:, row - top, col]

    canvas = jnp.zeros((num, height, width, channels), jnp.float32)
    if spec.per_channel:
      def body(t, canvas):
        row, rest = jnp.divmod(t, width * channels)
        col, ch = jnp.divmod(rest, channels)
        out = outputs_at(canvas, row, col).reshape(num, channels, -1)
        params_c = jnp.take(out, ch, axis=1)  # [num, K]
        step_key = jax.random.fold_in(key, t)
        if spec.likelihood == "bernoulli":
          value = 2.0 * jax.random.bernoulli(
              step_key, jax.nn.sigmoid(params_c[:, 0])) - 1.0
        else:
          level = jax.random.categorical(step_key, params_c, axis=-1)
          value = losses.scale_to_symmetric(level, NUM_BINS)
        return canvas.at[:, row, col, ch].set(value.astype(jnp.float32))

      canvas = jax.lax.fori_loop(0, num_dims, body, canvas)
    else:
      def body(t, canvas):
        row, col = jnp.divmod(t, width)
        pixel = losses.sample_discretized_logistic_mixture(
            jax.random.fold_in(key, t), outputs_at(canvas, row, col),
            channels, spec.num_mixtures, NUM_BINS)  # [num, C]
        return canvas.at[:, row, col, :].set(pixel)

      canvas = jax.lax.fori_loop(0, height * width, body, canvas)
    return (canvas + 1.0) / 2.0

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample)
