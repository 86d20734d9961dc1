"""Variational autoencoders: ELBO and importance-weighted bounds, and a family.

The bounds are pure, per-example functions of any encoder and decoder:

* ``encode(x) -> (mean, log_std)``, each [B, Z], parameterises the Gaussian
  q(z | x);
* ``log_likelihood(x, z) -> [B]`` is log p(x | z) of the data under the
  decoder (use the element-wise likelihoods of ``gm_jax.losses`` summed with
  ``sum_except_batch``).

The prior is N(0, I). ``make(model_config)`` builds the family: a
convolutional or MLP encoder/decoder, a Bernoulli decoder for binary data or a
discretized logistic / Gaussian decoder for 8-bit data, trained on the ELBO
(with optional beta and KL warm-up) and evaluated with the IWAE bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses, schema
from gm_jax.convolutions import Conv, SubPixelConvTranspose
from gm_jax.family import Family

Array = jax.Array
Encoder = Callable[[Array], tuple[Array, Array]]
LogLikelihood = Callable[[Array, Array], Array]

ARCHITECTURES = ("conv", "mlp")
LIKELIHOODS = ("bernoulli", "discretized_logistic", "discretized_gaussian")


# ----------------------------------------------------------------------------
# Pure bounds.


def reparameterize(mean: Array, log_std: Array, key: Array) -> Array:
  """z = mean + exp(log_std) * eps with eps ~ N(0, I) drawn from ``key``.

  ``mean`` and ``log_std`` broadcast; z has their broadcast shape.
  """
  mean, log_std = jnp.broadcast_arrays(mean, log_std)
  eps = jax.random.normal(key, mean.shape, mean.dtype)
  return mean + jnp.exp(log_std) * eps


# On CPU, a bound's decoder sees at most this many rows (samples x images)
# per call: YNNPACK's convolutions ran several times slower per FLOP on
# 10,000 rows than on 1,000 (the conv VAE's IWAE with k = 1000 on 100
# images: 14.3 s in chunks of 100 samples, 8.2 s in chunks of 10;
# benchmarks/README.md). With XLA's own convolution kernels (the defaults:
# train.cpu_convolutions="eigen", and "xla" for evaluation, where bounds
# run) the groups neither gain nor lose (5.9-6.3 s either way under
# "eigen", 2026-11-29), and they keep the decoder's working set small.
# Accelerators take every sample of a chunk at once.
CPU_DECODER_ROWS = 1024


def map_samples(fn: Callable[[Array], Array], z: Array) -> Array:
  """``jax.vmap(fn)(z)`` over the samples of z [num, B, ...]; on CPU in
  groups of at most ``CPU_DECODER_ROWS // B`` samples (``lax.map`` with a
  batch size), the same values computed in smaller calls."""
  num, batch = z.shape[:2]
  if jax.default_backend() == "cpu" and num * batch > CPU_DECODER_ROWS:
    return jax.lax.map(fn, z, batch_size=max(1, CPU_DECODER_ROWS // batch))
  return jax.vmap(fn)(z)


class LatentModel(NamedTuple):
  """A latent-variable model p(x, z) with its proposal q(z | x), as the
  bounds below see it.

  encode: x -> the statistics of q(. | x) that do not depend on the draws
    (computed once per x, whatever the number of samples).
  log_weights: (encoded, x, key, num) -> (log_px, log_ratio), each
    [num, B]: for num reparameterised draws z_i ~ q(z | x),
    log p(x | z_i) and log p(z_i) - log q(z_i | x). log w_i is their sum.
  kl: optional encoded -> [B] KL(q(z | x) || p(z)) in closed form; the ELBO
    then uses it in place of the Monte Carlo mean of -log_ratio (same
    expectation, less variance).
  """
  encode: Callable[[Array], Any]
  log_weights: Callable[[Any, Array, Array, int], tuple[Array, Array]]
  kl: Optional[Callable[[Any], Array]] = None


def _check_gaussian(mean: Array, log_std: Array) -> None:
  if mean.shape != log_std.shape or mean.ndim != 2:
    raise ValueError(
        "encode(x) must return (mean, log_std) of the same shape [B, Z]; got"
        f" {mean.shape} and {log_std.shape}.")


def gaussian_latent_model(encode: Encoder,
                          log_likelihood: LogLikelihood) -> LatentModel:
  """One Gaussian latent layer: q(z | x) = N(mean(x), exp(log_std(x))^2),
  p(z) = N(0, I), p(x | z) from ``log_likelihood``."""

  def encode_checked(x):
    mean, log_std = encode(x)
    _check_gaussian(mean, log_std)
    return mean, log_std

  def log_weights(encoded, x, key, num):
    mean, log_std = encoded
    eps = jax.random.normal(key, (num,) + mean.shape, mean.dtype)
    z = mean + jnp.exp(log_std) * eps  # [num, B, Z]
    log_q = jnp.sum(losses.gaussian_log_prob(z, mean, log_std), axis=-1)
    log_prior = jnp.sum(losses.gaussian_log_prob(z, 0.0, 0.0), axis=-1)
    if num == 1:  # the same program as a plain one-sample call
      log_px = log_likelihood(x, z[0])[None]
    else:
      log_px = map_samples(lambda zi: log_likelihood(x, zi), z)  # [num, B]
    if log_px.shape != log_q.shape:
      raise ValueError("log_likelihood(x, z) must return [B]; got shape"
                       f" {log_px.shape[1:]} for B={mean.shape[0]}.")
    return log_px, log_prior - log_q

  return LatentModel(encode_checked, log_weights,
                     kl=lambda encoded: losses.gaussian_kl(*encoded))


def multi_sample_elbo(model: LatentModel, x: Array, key: Array,
                      num_samples: int = 1,
                      beta: float | Array = 1.0) -> dict[str, Array]:
  """The evidence lower bound estimated with k reparameterised samples.

  ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x), with the
  expectation the mean over k draws and the KL in closed form where
  ``model.kl`` gives it (else the mean of log q - log p over the same
  draws). Its expectation is the ELBO whatever k; k only lowers the
  variance (the "VAE with k samples" of Burda et al.).

  Returns:
    dict of [B] arrays: "elbo", "objective" (= log_likelihood - beta * kl,
    the quantity to maximise), "log_likelihood" and "kl".
  """
  encoded = model.encode(x)
  log_px, log_ratio = model.log_weights(encoded, x, key, num_samples)
  log_px = jnp.mean(log_px, axis=0)
  kl = model.kl(encoded) if model.kl is not None else -jnp.mean(log_ratio,
                                                                axis=0)
  return {"elbo": log_px - kl, "objective": log_px - beta * kl,
          "log_likelihood": log_px, "kl": kl}


def elbo(encode: Encoder, log_likelihood: LogLikelihood, x: Array, key: Array,
         beta: float | Array = 1.0) -> dict[str, Array]:
  """The evidence lower bound with one reparameterised sample, per example.

  ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x), with the
  expectation estimated from one z = mean + sigma * eps and the KL exact
  (``multi_sample_elbo`` of ``gaussian_latent_model`` with k = 1).

  Args:
    encode: x -> (mean, log_std), each [B, Z].
    log_likelihood: (x, z) -> [B] log p(x | z).
    x: [B, ...] data in the form ``encode`` and ``log_likelihood`` take.
    key: PRNG key for eps.
    beta: weight of the KL in ``objective`` (beta-VAE, KL warm-up).

  Returns:
    dict of [B] arrays: "elbo", "objective" (= log_likelihood - beta * kl,
    the quantity to maximise), "log_likelihood" and "kl".
  """
  return multi_sample_elbo(gaussian_latent_model(encode, log_likelihood), x,
                           key, 1, beta)


def importance_weighted_bound(model: LatentModel, x: Array, key: Array,
                              num_samples: int,
                              chunk_size: int | None = None) -> Array:
  """The importance-weighted bound (Burda et al., 2016) with k samples.

  L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x), which
  increases with k towards log p(x) (L_1 is the ELBO). Differentiable: its
  reparameterised gradient is the IWAE training gradient, the sum of the
  per-sample gradients weighted by the normalised weights. The k samples
  are processed ``chunk_size`` at a time with a running logsumexp, so
  memory is that of ``chunk_size`` decoder passes whatever k is.

  Args:
    model: the model and proposal (``LatentModel``).
    x: [B, ...] data.
    key: PRNG key.
    num_samples: k >= 1.
    chunk_size: samples per decoder pass; must divide k (default: k).

  Returns:
    [B] the bound in nats (higher is better; -L_k estimates the NLL).
  """
  chunk_size = num_samples if chunk_size is None else min(chunk_size,
                                                           num_samples)
  if num_samples < 1 or num_samples % chunk_size:
    raise ValueError(
        f"iwae_bound: num_samples={num_samples} must be a positive multiple of"
        f" chunk_size={chunk_size}.")
  encoded = model.encode(x)
  num_chunks = num_samples // chunk_size

  def log_weights(chunk_key):
    log_px, log_ratio = model.log_weights(encoded, x, chunk_key, chunk_size)
    return log_px + log_ratio  # [c, B]

  def body(running, chunk_key):
    chunk = jax.nn.logsumexp(log_weights(chunk_key), axis=0)
    return jnp.logaddexp(running, chunk), None

  keys = jax.random.split(key, num_chunks)
  batch = jax.tree.leaves(encoded)[0].shape[0]
  init = jnp.full((batch,), -jnp.inf, jnp.float32)
  total, _ = jax.lax.scan(body, init, keys)
  return total - math.log(num_samples)


def iwae_bound(encode: Encoder, log_likelihood: LogLikelihood, x: Array,
               key: Array, num_samples: int,
               chunk_size: int | None = None) -> Array:
  """``importance_weighted_bound`` of one Gaussian latent layer
  (``gaussian_latent_model(encode, log_likelihood)``): [B] L_k in nats."""
  return importance_weighted_bound(
      gaussian_latent_model(encode, log_likelihood), x, key, num_samples,
      chunk_size)


# ----------------------------------------------------------------------------
# Networks.


class ConvEncoder(nn.Module):
  """Strided convolutions then a dense layer to (mean, log_std)."""
  latent_dim: int
  channels: Sequence[int] = (32, 64)
  hidden: int = 256
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] in [-1, 1]
    k = self.kernel_size
    for ch in self.channels:
      x = nn.swish(Conv(ch, (k, k), strides=(2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.swish(nn.Dense(self.hidden)(x))
    out = nn.Dense(2 * self.latent_dim)(x)
    mean, log_std = jnp.split(out, 2, axis=-1)
    return mean, jnp.clip(log_std, -10.0, 5.0)


class ConvDecoder(nn.Module):
  """Dense to a coarse feature map, then stride-2 transposed convolutions:
  to the channels of the encoder in reverse and a 3x3 convolution to the
  outputs (head "conv"), or with the last transposed convolution giving
  the outputs itself (head "transpose", the DCGAN-style mirror)."""
  image_shape: tuple[int, int, int]
  out_channels: int
  channels: Sequence[int] = (32, 64)
  hidden: int = 256
  kernel_size: int = 3
  head: str = "conv"

  @nn.compact
  def __call__(self, z):  # [B, Z]
    h, w, _ = self.image_shape
    factor = 2 ** len(self.channels)
    top = self.channels[-1]
    x = nn.swish(nn.Dense(self.hidden)(z))
    x = nn.swish(nn.Dense((h // factor) * (w // factor) * top)(x))
    x = x.reshape(z.shape[0], h // factor, w // factor, top)
    outs = list(reversed(self.channels))
    if self.head == "transpose":
      outs = outs[1:] + [self.out_channels]
    k = self.kernel_size
    for i, ch in enumerate(outs):
      # nn.ConvTranspose's function, parameters and names, computed as a
      # sub-pixel convolution (several times faster to differentiate on CPU).
      x = SubPixelConvTranspose(ch, (k, k), strides=(2, 2),
                                name=f"ConvTranspose_{i}")(x)
      if self.head == "conv" or i < len(outs) - 1:
        x = nn.swish(x)
    if self.head == "transpose":
      return x  # [B, H, W, out]
    return Conv(self.out_channels, (3, 3))(x)  # [B, H, W, out]


class MLPEncoder(nn.Module):
  """The IWAE paper's encoder: tanh hidden layers on the flattened image."""
  latent_dim: int
  hidden_sizes: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for size in self.hidden_sizes:
      x = nn.tanh(nn.Dense(size)(x))
    mean = nn.Dense(self.latent_dim)(x)
    log_std = nn.Dense(self.latent_dim)(x)
    return mean, jnp.clip(log_std, -10.0, 5.0)


class MLPDecoder(nn.Module):
  image_shape: tuple[int, int, int]
  out_channels: int
  hidden_sizes: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, z):
    x = z
    for size in reversed(self.hidden_sizes):
      x = nn.tanh(nn.Dense(size)(x))
    h, w, _ = self.image_shape
    x = nn.Dense(h * w * self.out_channels)(x)
    return x.reshape(z.shape[0], h, w, self.out_channels)


class VAE(nn.Module):
  """Encoder and decoder in one module; ``decode`` gives raw outputs.

  With ``stochastic_layers`` = 2 (MLP only, the IWAE paper's second model)
  the latent is a pair (h1, h2): q(h1 | x) q(h2 | h1) and
  p(h2) p(h1 | h2) p(x | h1), h1 of ``bottom_latent_dim`` units and h2 of
  ``latent_dim``, with ``top_hidden_sizes`` tanh layers between them.
  ``encode`` / ``decode`` are always the layer next to the data.
  """
  image_shape: tuple[int, int, int]
  latent_dim: int
  architecture: str
  likelihood: str
  conv_channels: Sequence[int]
  hidden_sizes: Sequence[int]
  dense_size: int
  conv_kernel_size: int = 3
  decoder_head: str = "conv"
  stochastic_layers: int = 1
  bottom_latent_dim: int = 0
  top_hidden_sizes: Sequence[int] = ()

  def setup(self):
    c = self.image_shape[-1]
    out = c if self.likelihood == "bernoulli" else 2 * c
    if self.architecture == "conv":
      self.encoder = ConvEncoder(self.latent_dim, self.conv_channels,
                                 self.dense_size, self.conv_kernel_size)
      self.decoder = ConvDecoder(self.image_shape, out, self.conv_channels,
                                 self.dense_size, self.conv_kernel_size,
                                 self.decoder_head)
      return
    bottom = (self.latent_dim if self.stochastic_layers == 1
              else self.bottom_latent_dim)
    self.encoder = MLPEncoder(bottom, self.hidden_sizes)
    self.decoder = MLPDecoder(self.image_shape, out, self.hidden_sizes)
    if self.stochastic_layers == 2:
      # q(h2 | h1) and p(h1 | h2): Gaussian MLPs of the same form.
      self.top_encoder = MLPEncoder(self.latent_dim, self.top_hidden_sizes)
      self.top_decoder = MLPEncoder(bottom,
                                    tuple(reversed(self.top_hidden_sizes)))

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def encode_top(self, h1):
    return self.top_encoder(h1)

  def decode_top(self, h2):
    return self.top_decoder(h2)

  def __call__(self, x, z):
    outs = (self.encode(x), self.decode(z))
    if self.stochastic_layers == 2:
      outs += (self.encode_top(z), self.decode_top(
          jnp.zeros(z.shape[:1] + (self.latent_dim,), z.dtype)))
    return outs


# ----------------------------------------------------------------------------
# The family.


def _decoder_log_likelihood(likelihood: str, target: Array,
                            out: Array) -> Array:
  """log p(x | z) per example from the decoder's raw output [B, H, W, *]."""
  if likelihood == "bernoulli":
    return losses.sum_except_batch(losses.bernoulli_log_prob(target, out))
  mean, log_scale = jnp.split(out, 2, axis=-1)
  log_scale = jnp.maximum(log_scale, -7.0)
  if likelihood == "discretized_logistic":
    log_p = losses.discretized_logistic_log_prob(target, mean, log_scale)
  else:
    log_p = losses.discretized_gaussian_log_prob(target, mean, log_scale)
  return losses.sum_except_batch(log_p)


def _decoder_mean(likelihood: str, out: Array) -> Array:
  """The decoder's mean image in [0, 1]."""
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(out)
  mean, _ = jnp.split(out, 2, axis=-1)
  return (jnp.clip(mean, -1.0, 1.0) + 1.0) / 2.0


def _decoder_sample(likelihood: str, key: Array, out: Array) -> Array:
  """A draw from p(x | z) as an image in [0, 1]."""
  if likelihood == "bernoulli":
    return jax.random.bernoulli(key, jax.nn.sigmoid(out)).astype(jnp.float32)
  mean, log_scale = jnp.split(out, 2, axis=-1)
  log_scale = jnp.maximum(log_scale, -7.0)
  if likelihood == "discretized_logistic":
    noise = jax.random.logistic(key, mean.shape)
  else:
    noise = jax.random.normal(key, mean.shape)
  x = jnp.clip(mean + jnp.exp(log_scale) * noise, -1.0, 1.0)
  max_level = losses.PIXEL_VALUES - 1
  return jnp.round((x + 1.0) * (max_level / 2)) / max_level


DECODER_HEADS = ("conv", "transpose")
OBJECTIVES = ("elbo", "iwae")
# evaluate()'s per-example posterior means, [B, Z] per latent layer, under
# names starting with this; evaluation reports how many units are active
# (their variance over the data above 0.01, Burda et al.'s criterion).
ACTIVE_UNITS_PREFIX = "active_units"


@dataclasses.dataclass(frozen=True)
class VAEConfig(schema.ModelConfig):
  """``config.model`` of the VAE family.

  Attributes:
    image_shape: (H, W, C) of the data (see ``schema.ModelConfig``).
    architecture: "conv" (strided convolutions) or "mlp" (the IWAE paper's
      tanh MLP on the flattened image).
    latent_dim: Z, the size of the Gaussian latent.
    conv_channels: channels of each stride-2 layer of the conv encoder (the
      decoder mirrors them); H and W must be divisible by 2^len.
    dense_size: width of the conv net's dense layer.
    conv_kernel_size: k of the conv net's k x k (transposed) convolutions.
    decoder_head: "conv": the decoder's transposed convolutions mirror the
      encoder's channels and a 3x3 convolution gives the outputs;
      "transpose": the last transposed convolution gives them (the DCGAN-
      style mirror, e.g. the PyTorch peer's VAE with conv_kernel_size 4).
    hidden_sizes: widths of the MLP's hidden layers.
    stochastic_layers: 1, or 2 for the IWAE paper's two-layer MLP model
      (h1 of ``bottom_latent_dim`` units, h2 of ``latent_dim``; see ``VAE``).
    bottom_latent_dim: units of h1 with two stochastic layers.
    top_hidden_sizes: tanh layers between h1 and h2 (both directions).
    likelihood: "bernoulli" (binary data), "discretized_logistic" or
      "discretized_gaussian" (8-bit data).
    binarize: how the Bernoulli likelihood's targets are made from bytes:
      "none" (already {0, 1}), "threshold" (pixel > 127) or "dynamic" (a
      fresh Bernoulli(pixel / 255) draw every step); "none" for 8-bit data.
    beta: weight of the KL in the training objective.
    kl_warmup_steps: the KL weight ramps linearly from 0 to beta over these
      steps (0: no warm-up).
    objective: the training objective, "elbo" (the mean over
      ``train_samples`` draws, KL in closed form where there is one) or
      "iwae" (the importance-weighted bound L_k with k = ``train_samples``).
    train_samples: k of the training objective.
    iwae_samples: k of the IWAE bound that ``evaluate`` reports as the NLL.
    iwae_chunk: samples per decoder pass of that bound; divides iwae_samples.
    sample_mean: samples show the decoder's mean rather than a pixel draw.
  """

  architecture: str = schema.choice("conv", ARCHITECTURES)
  latent_dim: int = 32
  conv_channels: tuple[int, ...] = (32, 64)
  dense_size: int = 256
  conv_kernel_size: int = 3
  decoder_head: str = schema.choice("conv", DECODER_HEADS)
  hidden_sizes: tuple[int, ...] = (200, 200)
  stochastic_layers: int = 1
  bottom_latent_dim: int = 100
  top_hidden_sizes: tuple[int, ...] = (100, 100)
  likelihood: str = schema.choice("bernoulli", LIKELIHOODS)
  binarize: str = schema.binarization("dynamic")
  beta: float = 1.0
  kl_warmup_steps: int = 0
  objective: str = schema.choice("elbo", OBJECTIVES)
  train_samples: int = 1
  iwae_samples: int = 100
  iwae_chunk: int = 50
  sample_mean: bool = True

  def validate(self):
    schema.require_binarization(self.binarize, self.likelihood)
    schema.require(self.latent_dim >= 1, "latent_dim", self.latent_dim,
                   "must be >= 1")
    schema.require(self.stochastic_layers in (1, 2), "stochastic_layers",
                   self.stochastic_layers, "must be 1 or 2")
    schema.require(
        self.stochastic_layers == 1 or self.architecture == "mlp",
        "stochastic_layers", self.stochastic_layers,
        "2 needs architecture='mlp' (the IWAE paper's model)")
    schema.require(self.bottom_latent_dim >= 1, "bottom_latent_dim",
                   self.bottom_latent_dim, "must be >= 1")
    schema.require(self.train_samples >= 1, "train_samples",
                   self.train_samples, "must be >= 1")
    schema.require(
        self.objective == "elbo" or (self.beta == 1.0 and
                                     self.kl_warmup_steps == 0),
        "objective", self.objective,
        "'iwae' trains the bound itself: it needs beta=1 and"
        " kl_warmup_steps=0")
    schema.require(self.conv_kernel_size >= 1, "conv_kernel_size",
                   self.conv_kernel_size, "must be >= 1")
    factor = 2 ** len(self.conv_channels)
    schema.require(
        self.architecture != "conv" or not (self.image_shape[0] % factor or
                                            self.image_shape[1] % factor),
        "image_shape", self.image_shape,
        f"must have H and W divisible by {factor} for the conv VAE's"
        f" {len(self.conv_channels)} stride-2 layers")
    schema.require(
        self.iwae_samples >= 1 and self.iwae_chunk >= 1 and
        self.iwae_samples % min(self.iwae_chunk, self.iwae_samples) == 0,
        "iwae_samples", self.iwae_samples,
        f"must be a positive multiple of config.model.iwae_chunk="
        f"{self.iwae_chunk}")


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` of the VAE family with every key at its default."""
  return schema.default_config(VAEConfig, family="vae")


def iwae_paper_recipe(config: ml_collections.ConfigDict,
                      train_examples: int, batch_size: int = 20) -> None:
  """Burda et al.'s (2016) MNIST model and training, in place: the MLP with
  two tanh layers of 200 and 50 latent units, a Bernoulli decoder, the
  k = 5000 test bound; Adam (eps 1e-4), 3^i epochs at 1e-3 * 10^(-i/7) for
  i = 0..7 (3,280 epochs), raw parameters evaluated."""
  steps_per_epoch = train_examples // batch_size
  config.model = default_model_config()
  config.model.image_shape = (28, 28, 1)
  config.model.architecture = "mlp"
  config.model.hidden_sizes = (200, 200)
  config.model.latent_dim = 50
  config.model.likelihood = "bernoulli"
  config.model.iwae_samples = 5000
  config.model.iwae_chunk = 100
  config.optim.learning_rate = 1e-3
  config.optim.eps = 1e-4
  # Stage i (3^i epochs) runs at 1e-3 * 10^(-i/7): the rate drops by
  # 10^(-1/7) at the end of each stage.
  config.optim.schedule = "piecewise"
  config.optim.piecewise_boundaries = tuple(
      steps_per_epoch * sum(3**j for j in range(i + 1)) for i in range(7))
  config.optim.piecewise_factor = 10 ** (-1 / 7)
  config.optim.ema_decay = 0.0
  config.train.num_steps = sum(3**i for i in range(8)) * steps_per_epoch
  config.train.batch_size = batch_size
  config.train.eval_batch_size = 100
  config.train.log_every = 5_000
  config.ckpt.every_steps = 50_000


def _elbo_terms(out: dict[str, Array]) -> dict[str, Array]:
  """The ELBO's terms under the metric names that training and evaluation
  share (so their curves overlay): per example, in nats."""
  return {"neg_elbo_nats": -out["elbo"], "kl_nats": out["kl"],
          "recon_nll_nats": -out["log_likelihood"]}


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the VAE family from ``config.model`` (see ``VAEConfig``)."""
  cfg = schema.parse(VAEConfig, model_config)
  image_shape = cfg.image_shape
  model = VAE(image_shape=image_shape, latent_dim=cfg.latent_dim,
              architecture=cfg.architecture, likelihood=cfg.likelihood,
              conv_channels=cfg.conv_channels,
              hidden_sizes=cfg.hidden_sizes, dense_size=cfg.dense_size,
              conv_kernel_size=cfg.conv_kernel_size,
              decoder_head=cfg.decoder_head,
              stochastic_layers=cfg.stochastic_layers,
              bottom_latent_dim=cfg.bottom_latent_dim,
              top_hidden_sizes=cfg.top_hidden_sizes)
  two_layers = cfg.stochastic_layers == 2
  bottom_dim = cfg.bottom_latent_dim if two_layers else cfg.latent_dim
  likelihood = cfg.likelihood
  binary = likelihood == "bernoulli"
  num_dims = math.prod(image_shape)
  iwae_samples, iwae_chunk = cfg.iwae_samples, cfg.iwae_chunk
  beta, warmup = cfg.beta, cfg.kl_warmup_steps
  binarize_mode, sample_mean = cfg.binarize, cfg.sample_mean

  def prepare(image, key):
    """uint8 -> the likelihood's target: {0, 1} or [-1, 1]."""
    if binary:
      return losses.binarize_images(image, binarize_mode, key)
    return losses.scale_to_symmetric(image)

  def bound_fns(params):
    """The encoder and decoder as the callables the pure bounds take."""
    def encode(target):
      x = 2.0 * target - 1.0 if binary else target  # encoder input in [-1, 1]
      return model.apply({"params": params}, x, method=VAE.encode)

    def log_likelihood(target, z):
      out = model.apply({"params": params}, z, method=VAE.decode)
      return _decoder_log_likelihood(likelihood, target, out)
    return encode, log_likelihood

  def top_layer(params, method, h):
    """q(h2 | h1) or p(h1 | h2) for [..., B, Z] draws: (mean, log_std)."""
    flat = h.reshape((-1, h.shape[-1]))
    mean, log_std = model.apply({"params": params}, flat, method=method)
    return (mean.reshape(h.shape[:-1] + mean.shape[-1:]),
            log_std.reshape(h.shape[:-1] + log_std.shape[-1:]))

  def latent_model(params) -> LatentModel:
    """The model and its proposal as the pure bounds take them."""
    single = gaussian_latent_model(*bound_fns(params))
    if not two_layers:
      return single
    _, log_likelihood = bound_fns(params)

    def log_weights(encoded, target, key, num):
      mean1, log_std1 = encoded
      key1, key2 = jax.random.split(key)
      h1 = mean1 + jnp.exp(log_std1) * jax.random.normal(
          key1, (num,) + mean1.shape)  # [num, B, Z1]
      log_q1 = jnp.sum(losses.gaussian_log_prob(h1, mean1, log_std1), -1)
      mean2, log_std2 = top_layer(params, VAE.encode_top, h1)
      h2 = reparameterize(mean2, log_std2, key2)  # [num, B, Z2]
      log_q2 = jnp.sum(losses.gaussian_log_prob(h2, mean2, log_std2), -1)
      prior_mean1, prior_log_std1 = top_layer(params, VAE.decode_top, h2)
      log_p1 = jnp.sum(
          losses.gaussian_log_prob(h1, prior_mean1, prior_log_std1), -1)
      log_p2 = jnp.sum(losses.gaussian_log_prob(h2, 0.0, 0.0), -1)
      log_px = map_samples(lambda h: log_likelihood(target, h), h1)
      return log_px, log_p1 + log_p2 - log_q1 - log_q2

    return LatentModel(single.encode, log_weights)

  def init(key, batch):
    target = prepare(batch["image"], key)
    z = jnp.zeros((target.shape[0], bottom_dim), jnp.float32)
    return model.init(key, target, z)["params"]

  def loss(params, batch, key, step):
    bin_key, z_key = jax.random.split(key)
    target = prepare(batch["image"], bin_key)
    weight = beta
    if warmup > 0:
      weight = beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
    latent = latent_model(params)
    if cfg.objective == "iwae":
      bound = importance_weighted_bound(latent, target, z_key,
                                        cfg.train_samples)
      objective = -jnp.mean(bound)
      # The ELBO's terms for the curves, from one more draw.
      out = multi_sample_elbo(latent, target, jax.random.fold_in(z_key, 1))
    else:
      out = multi_sample_elbo(latent, target, z_key, cfg.train_samples,
                              weight)
      objective = -jnp.mean(out["objective"])
    metrics = {name: jnp.mean(value)
               for name, value in _elbo_terms(out).items()}
    if cfg.objective == "iwae":
      metrics["neg_iwae_train_nats"] = objective
    metrics["kl_weight"] = jnp.asarray(weight, jnp.float32)
    return objective, metrics

  def evaluate(params, batch, key):
    bin_key, elbo_key, iwae_key = jax.random.split(key, 3)
    target = prepare(batch["image"], bin_key)
    latent = latent_model(params)
    bound = multi_sample_elbo(latent, target, elbo_key)
    nll = -importance_weighted_bound(latent, target, iwae_key, iwae_samples,
                                     iwae_chunk)
    return {"nll_nats": nll, "bpd": losses.bits_per_dim(nll, num_dims),
            **_elbo_terms(bound), **posterior_means(params, latent, target,
                                                    key)}

  def posterior_means(params, latent, target, key):
    """E_q[u | x] of every latent unit, [B, Z] per layer, for the active-
    units count (``ACTIVE_UNITS_PREFIX``): exact for the layer next to the
    data; h2's is the mean of E[h2 | h1] over 32 draws of h1 ~ q(h1 | x)."""
    mean1, log_std1 = latent.encode(target)
    if not two_layers:
      return {ACTIVE_UNITS_PREFIX: mean1}
    h1 = mean1 + jnp.exp(log_std1) * jax.random.normal(
        jax.random.fold_in(key, 7), (32,) + mean1.shape)
    mean2, _ = top_layer(params, VAE.encode_top, h1)
    return {f"{ACTIVE_UNITS_PREFIX}_h1": mean1,
            f"{ACTIVE_UNITS_PREFIX}_h2": jnp.mean(mean2, axis=0)}

  def decode_images(params, z, key):
    out = model.apply({"params": params}, z, method=VAE.decode)
    if sample_mean:
      return _decoder_mean(likelihood, out)
    return _decoder_sample(likelihood, key, out)

  def sample(params, key, num):
    z_key, x_key = jax.random.split(key)
    z = jax.random.normal(z_key, (num, cfg.latent_dim))
    if two_layers:  # h2 ~ N(0, I), then h1 ~ p(h1 | h2)
      mean1, log_std1 = top_layer(params, VAE.decode_top, z)
      z = reparameterize(mean1, log_std1, jax.random.fold_in(z_key, 1))
    return decode_images(params, z, x_key)

  def visualize(params, batch, key):
    """"reconstruction" [2, n, H, W, C]: the first n <= 8 test images in
    row 0 and their reconstructions (decoded posterior means) in row 1;
    "interpolation" [n // 2, 8, H, W, C]: row p decodes 8 evenly spaced
    points from the posterior mean of image 2p to that of image 2p + 1."""
    target = prepare(batch["image"][:8], key)
    encode, _ = bound_fns(params)
    mean, _ = encode(target)
    recon = decode_images(params, mean, key)
    originals = target if binary else (target + 1.0) / 2.0
    reconstruction = jnp.stack([originals, recon])
    paths, steps = mean.shape[0] // 2, 8
    weights = jnp.linspace(0.0, 1.0, steps)[None, :, None]
    starts = mean[0:2 * paths:2, None]
    ends = mean[1:2 * paths:2, None]
    z = (1.0 - weights) * starts + weights * ends  # [paths, steps, Z]
    interpolation = decode_images(params, z.reshape(paths * steps, -1), key)
    interpolation = interpolation.reshape((paths, steps) + image_shape)
    return {"reconstruction": reconstruction, "interpolation": interpolation}

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize)
