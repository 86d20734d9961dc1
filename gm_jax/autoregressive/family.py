"""The autoregressive family: PixelCNN, Gated PixelCNN and PixelCNN++.

p(x) = prod_i prod_c p(x_{i,c} | x_{<i}, x_{i,<c}) over pixels i in raster
order and channels c in R -> G -> B order, trained by exact maximum
likelihood. ``make(model_config)`` returns the ``Family``; ``PixelCNNConfig``
declares the keys of ``config.model``.

Sampling runs the network once per pixel (per-pixel mixture) or once per
channel of each pixel (per-channel likelihoods) inside ``lax.fori_loop``.
With ``fast_sampling`` (the default), every architecture caches its
convolutions' inputs and computes each step at the one pixel being sampled:
PixelCNN every layer at that pixel; Gated PixelCNN its vertical stack once
per image row and its horizontal stack at the pixel; PixelCNN++ its u
stream once per image row (the row at each of its three resolutions) and
its ul stream at the pixel (and at the coarse pixels that contain it), with
only the channel-masked head run again for a colour pixel's later channels.
The whole sample then costs about one pass over the image instead of one
per pixel, with the same numbers (tested step by step and sample by
sample). ``fast_sampling=False`` keeps the full pass per step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses, schema
from gm_jax.autoregressive import layers
from gm_jax.autoregressive.networks import (
  GatedPixelCNN,
  PixelCNN,
  PixelCNNPlusPlus,
  pixelcnnpp_cached_step,
  pixelcnnpp_unrolled_params,
)
from gm_jax.family import Family

Array = jax.Array

ARCHITECTURES = ("pixelcnn", "gated_pixelcnn", "pixelcnnpp")
LIKELIHOODS = ("bernoulli", "categorical", "logistic_mixture")


@dataclasses.dataclass(frozen=True)
class PixelCNNConfig(schema.ModelConfig):
  """``config.model`` of the autoregressive family.

  Attributes:
    image_shape: (H, W, C) of the data (see ``schema.ModelConfig``).
    architecture: "pixelcnn", "gated_pixelcnn" or "pixelcnnpp".
    likelihood: "bernoulli" (binary data), "categorical" (a 256-way softmax
      per channel) or "logistic_mixture" (PixelCNN++'s discretized logistic
      mixture over whole pixels, with coupled RGB means).
    binarize: "none", "threshold" (pixel > 127) or "dynamic" (a fresh
      Bernoulli(pixel / 255) draw per step); anything but "none" needs the
      bernoulli likelihood, and "none" with it expects {0, 1} data (e.g.
      tfds binarized_mnist).
    width: hidden channels (PixelCNN: h, with a residual stream of 2h).
    num_layers: residual blocks (pixelcnn) or gated layers (gated_pixelcnn).
    kernel_size: the hidden masked kernel (pixelcnn, gated_pixelcnn).
    first_kernel_size: the first, type-A kernel (pixelcnn, gated_pixelcnn).
    num_output_filters: width of the 1x1 output layers (pixelcnn,
      gated_pixelcnn).
    num_resnet: gated resnet blocks per stage (pixelcnnpp).
    dropout: dropout rate (pixelcnnpp).
    weight_norm: weight normalisation with data-dependent initialisation
      in every layer of the U-Net (pixelcnnpp, as in the paper); ``init``
      then sets the scales from the batch it is given.
    num_mixtures: logistic mixture components.
    num_classes: 0 for an unconditional model; else the model is conditioned
      on batch["label"] and samples cycle through the labels 0..n-1.
    fast_sampling: cached sampling (all three architectures), about one
      pixel of every layer per step; exact: the same samples as full passes.
    scan_layers: (pixelcnnpp) each stage's gated resnet blocks as one
      ``flax.linen.scan`` with stacked parameters: the same function and
      parameter count, compiled once per stage instead of once per block.
      Sampling maps the parameters to the unrolled layout
      (``pixelcnnpp_unrolled_params``) and runs the unrolled network.
  """

  architecture: str = schema.choice("pixelcnn", ARCHITECTURES)
  likelihood: str = schema.choice("bernoulli", LIKELIHOODS)
  binarize: str = schema.binarization("threshold")
  width: int = 64
  num_layers: int = 7
  kernel_size: int = 3
  first_kernel_size: int = 7
  num_output_filters: int = 256
  num_resnet: int = 5
  dropout: float = 0.0
  weight_norm: bool = False
  num_mixtures: int = 10
  num_classes: int = 0
  fast_sampling: bool = True
  scan_layers: bool = False

  def validate(self):
    schema.require_binarization(self.binarize, self.likelihood)
    schema.require(self.width >= self.num_groups, "width", self.width,
                   f"must be >= the {self.num_groups} colour groups")
    for key in ("width", "num_output_filters", "num_mixtures", "num_layers",
                "num_resnet"):
      value = getattr(self, key)
      schema.require(value >= 1, key, value, "must be >= 1")
    for key in ("kernel_size", "first_kernel_size"):
      value = getattr(self, key)
      schema.require(value >= 1 and value % 2 == 1, key, value,
                     "must be a positive odd number")
    schema.require(0.0 <= self.dropout < 1.0, "dropout", self.dropout,
                   "must be in [0, 1)")
    schema.require(not self.weight_norm or self.architecture == "pixelcnnpp",
                   "weight_norm", self.weight_norm,
                   "is implemented for architecture 'pixelcnnpp' only")
    schema.require(not self.scan_layers or self.architecture == "pixelcnnpp",
                   "scan_layers", self.scan_layers,
                   "is implemented for architecture 'pixelcnnpp' only")
    schema.require(self.num_classes >= 0, "num_classes", self.num_classes,
                   "must be >= 0")
    schema.require(
        self.architecture != "pixelcnnpp" or (
            self.image_shape[0] % 4 == 0 and self.image_shape[1] % 4 == 0),
        "image_shape", self.image_shape,
        "must have H and W divisible by 4: pixelcnnpp halves them twice")

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
      return losses.PIXEL_VALUES
    return losses.mixture_num_params(self.image_shape[2], self.num_mixtures)


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` of the autoregressive family with every key at its
  default."""
  return schema.default_config(PixelCNNConfig, family="pixelcnn")


def build_network(spec: PixelCNNConfig, scan: Optional[bool] = None
                  ) -> nn.Module:
  """The Flax module for ``spec.architecture``; ``scan`` overrides
  ``spec.scan_layers``."""
  common = dict(num_outputs=spec.num_outputs, num_groups=spec.num_groups,
                width=spec.width, num_classes=spec.num_classes)
  if spec.architecture == "pixelcnn":
    return PixelCNN(num_layers=spec.num_layers, kernel_size=spec.kernel_size,
                    first_kernel_size=spec.first_kernel_size,
                    num_output_filters=spec.num_output_filters, **common)
  if spec.architecture == "gated_pixelcnn":
    return GatedPixelCNN(num_layers=spec.num_layers,
                         kernel_size=spec.kernel_size,
                         first_kernel_size=spec.first_kernel_size,
                         num_output_filters=spec.num_output_filters, **common)
  return PixelCNNPlusPlus(
      num_resnet=spec.num_resnet, dropout=spec.dropout,
      weight_norm=spec.weight_norm,
      scan_blocks=spec.scan_layers if scan is None else scan, **common)


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


def receptive_rows(spec: PixelCNNConfig) -> Optional[int]:
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
  spec = schema.parse(PixelCNNConfig, model_config)
  net = build_network(spec)
  height, width, channels = spec.image_shape
  num_dims = height * width * channels
  levels = losses.PIXEL_VALUES
  conditional = spec.num_classes > 0
  # The networks' convolutions can cache their inputs: each pixel then
  # costs one position of every layer (see their ``position`` argument).
  cached = spec.fast_sampling

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
    return losses.scale_to_symmetric(targets, levels), targets

  def labels(batch):
    return batch["label"] if conditional else None

  def log_prob_from_outputs(outputs, x, targets):
    """Per-example log p(x) [B] from network outputs [B, H, W, G * K]."""
    b = outputs.shape[0]
    if spec.likelihood == "bernoulli":
      logits = outputs.reshape(b, height, width, channels)
      per_dim = losses.bernoulli_log_prob(targets, logits)
    elif spec.likelihood == "categorical":
      logits = outputs.reshape(b, height, width, channels, levels)
      per_dim = losses.categorical_log_prob(targets, logits)
    else:
      per_dim = losses.discretized_logistic_mixture_log_prob(
          x, outputs, spec.num_mixtures, levels)  # [B, H, W]
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

  # Sampling runs the unrolled network: the cached sampler addresses each
  # block's caches by name.
  sample_net = build_network(spec, scan=False) if spec.scan_layers else net

  def sample(params, key, num):
    label = (jnp.arange(num, dtype=jnp.int32) % spec.num_classes
             if conditional else None)
    if spec.scan_layers:
      params = pixelcnnpp_unrolled_params(params, spec.num_resnet)

    def outputs_at(canvas, cache, row, col, ch=0):
      """The network's outputs for pixel (row, col), [num, G * K], and the
      updated layer caches (at channel ``ch`` of the pixel: the canvas
      holds its channels < ch)."""
      if cached:
        # The first layer reads the canvas around the pixel; the deeper
        # ones get this pixel's features and keep their earlier inputs.
        position = layers.Position(row, col, height, width)

        def run(cache, **stack):
          variables = {"params": params}
          if cache is not None:
            variables["cache"] = cache
          out, variables = sample_net.apply(
              variables, canvas, label, train=False, position=position,
              mutable=["cache"], **stack)
          return out, variables["cache"]
        if spec.architecture == "pixelcnnpp":
          # Stage by stage, each coarse one when due; the later channels
          # of a colour pixel rerun only the channel-masked head.
          out, cache = pixelcnnpp_cached_step(
              lambda c, stack, stage: run(c, stack=stack, stage=stage),
              cache, row, col, ch,
              channel_head=spec.per_channel and channels > 1)
          return out[:, 0, 0], cache
        if spec.architecture == "gated_pixelcnn":
          # The vertical stack's row, once per image row (rows < r only).
          vertical = lambda c: run(c, stack="vertical")[1]  # noqa: E731
          if cache is None:
            cache = vertical(None)
          else:
            cache = jax.lax.cond((col == 0) & (ch == 0), vertical,
                                 lambda c: c, cache)
        out, cache = run(cache)
        return out[:, 0, 0], cache
      out = sample_net.apply({"params": params}, canvas, label, train=False)
      return out[:, row, col], cache

    canvas = jnp.zeros((num, height, width, channels), jnp.float32)
    cache = {}
    if cached:  # The caches' shapes, from one step; they start at zero.
      _, cache = outputs_at(canvas, None, 0, 0)
      cache = jax.tree.map(jnp.zeros_like, cache)
    if spec.per_channel:
      def body(t, carry):
        canvas, cache = carry
        row, rest = jnp.divmod(t, width * channels)
        col, ch = jnp.divmod(rest, channels)
        out, cache = outputs_at(canvas, cache, row, col, ch)
        params_c = jnp.take(out.reshape(num, channels, -1), ch, axis=1)
        step_key = jax.random.fold_in(key, t)
        if spec.likelihood == "bernoulli":
          value = 2.0 * jax.random.bernoulli(
              step_key, jax.nn.sigmoid(params_c[:, 0])) - 1.0
        else:
          level = jax.random.categorical(step_key, params_c, axis=-1)
          value = losses.scale_to_symmetric(level, levels)
        return canvas.at[:, row, col, ch].set(value.astype(jnp.float32)), cache

      canvas, _ = jax.lax.fori_loop(0, num_dims, body, (canvas, cache))
    else:
      def body(t, carry):
        canvas, cache = carry
        row, col = jnp.divmod(t, width)
        out, cache = outputs_at(canvas, cache, row, col)
        pixel = losses.sample_discretized_logistic_mixture(
            out, jax.random.fold_in(key, t), channels, spec.num_mixtures,
            levels)  # [num, C]
        return canvas.at[:, row, col, :].set(pixel), cache

      canvas, _ = jax.lax.fori_loop(0, height * width, body, (canvas, cache))
    return (canvas + 1.0) / 2.0

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample)
