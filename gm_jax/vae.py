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

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses
from gm_jax.family import Family

Array = jax.Array
Encoder = Callable[[Array], tuple[Array, Array]]
LogLikelihood = Callable[[Array, Array], Array]

ARCHITECTURES = ("conv", "mlp")
LIKELIHOODS = ("bernoulli", "discretized_logistic", "discretized_gaussian")
BINARIZATIONS = losses.BINARIZATIONS


# ----------------------------------------------------------------------------
# Pure bounds.


def reparameterize(key: Array, mean: Array, log_std: Array) -> Array:
  """z = mean + exp(log_std) * eps with eps ~ N(0, I) drawn from ``key``."""
  eps = jax.random.normal(key, mean.shape, mean.dtype)
  return mean + jnp.exp(log_std) * eps


def elbo(key: Array, x: Array, encode: Encoder, log_likelihood: LogLikelihood,
         beta: float | Array = 1.0) -> dict[str, Array]:
  """The evidence lower bound with one reparameterised sample, per example.

  ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x), with the
  expectation estimated from one z = mean + sigma * eps and the KL exact.

  Args:
    key: PRNG key for eps.
    x: [B, ...] data in the form ``encode`` and ``log_likelihood`` take.
    encode: x -> (mean, log_std), each [B, Z].
    log_likelihood: (x, z) -> [B] log p(x | z).
    beta: weight of the KL in ``objective`` (beta-VAE, KL warm-up).

  Returns:
    dict of [B] arrays: "elbo", "objective" (= log_likelihood - beta * kl,
    the quantity to maximise), "log_likelihood" and "kl".
  """
  mean, log_std = encode(x)
  if mean.shape != log_std.shape or mean.ndim != 2:
    raise ValueError(
        "encode(x) must return (mean, log_std) of the same shape [B, Z]; got"
        f" {mean.shape} and {log_std.shape}.")
  z = reparameterize(key, mean, log_std)
  log_px = log_likelihood(x, z)
  if log_px.shape != mean.shape[:1]:
    raise ValueError("log_likelihood(x, z) must return [B]; got shape"
                     f" {log_px.shape} for B={mean.shape[0]}.")
  kl = jnp.sum(losses.standard_normal_kl(mean, log_std), axis=-1)
  return {"elbo": log_px - kl, "objective": log_px - beta * kl,
          "log_likelihood": log_px, "kl": kl}


def iwae_bound(key: Array, x: Array, encode: Encoder,
               log_likelihood: LogLikelihood, num_samples: int,
               chunk_size: int | None = None) -> Array:
  """The importance-weighted bound (Burda et al., 2016) with k samples.

  L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x), which
  increases with k towards log p(x) (L_1 is the ELBO). The k samples are
  processed ``chunk_size`` at a time with a running logsumexp, so memory is
  that of ``chunk_size`` decoder passes whatever k is.

  Args:
    key: PRNG key.
    x: [B, ...] data.
    encode, log_likelihood: as in ``elbo``.
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
  mean, log_std = encode(x)
  num_chunks = num_samples // chunk_size

  def log_weights(chunk_key):
    eps = jax.random.normal(chunk_key, (chunk_size,) + mean.shape, mean.dtype)
    z = mean + jnp.exp(log_std) * eps  # [c, B, Z]
    log_q = jnp.sum(losses.gaussian_log_prob(z, mean, log_std), axis=-1)
    log_prior = jnp.sum(losses.gaussian_log_prob(z, 0.0, 0.0), axis=-1)
    log_px = jax.vmap(lambda zi: log_likelihood(x, zi))(z)  # [c, B]
    return log_px + log_prior - log_q

  def body(running, chunk_key):
    chunk = jax.nn.logsumexp(log_weights(chunk_key), axis=0)
    return jnp.logaddexp(running, chunk), None

  keys = jax.random.split(key, num_chunks)
  init = jnp.full(mean.shape[:1], -jnp.inf, mean.dtype)
  total, _ = jax.lax.scan(body, init, keys)
  return total - math.log(num_samples)


# ----------------------------------------------------------------------------
# Networks.


class ConvEncoder(nn.Module):
  """Strided convolutions then a dense layer to (mean, log_std)."""
  latent_dim: int
  channels: Sequence[int] = (32, 64)
  hidden: int = 256

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] in [-1, 1]
    for ch in self.channels:
      x = nn.swish(nn.Conv(ch, (3, 3), strides=(2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.swish(nn.Dense(self.hidden)(x))
    out = nn.Dense(2 * self.latent_dim)(x)
    mean, log_std = jnp.split(out, 2, axis=-1)
    return mean, jnp.clip(log_std, -10.0, 5.0)


class ConvDecoder(nn.Module):
  """Dense to a coarse feature map, then transposed convolutions."""
  image_shape: tuple[int, int, int]
  out_channels: int
  channels: Sequence[int] = (32, 64)
  hidden: int = 256

  @nn.compact
  def __call__(self, z):  # [B, Z]
    h, w, _ = self.image_shape
    factor = 2 ** len(self.channels)
    top = self.channels[-1]
    x = nn.swish(nn.Dense(self.hidden)(z))
    x = nn.swish(nn.Dense((h // factor) * (w // factor) * top)(x))
    x = x.reshape(z.shape[0], h // factor, w // factor, top)
    for ch in reversed(self.channels):
      x = nn.swish(nn.ConvTranspose(ch, (3, 3), strides=(2, 2))(x))
    return nn.Conv(self.out_channels, (3, 3))(x)  # [B, H, W, out]


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
  """Encoder and decoder in one module; ``decode`` gives raw outputs."""
  image_shape: tuple[int, int, int]
  latent_dim: int
  architecture: str
  likelihood: str
  conv_channels: Sequence[int]
  hidden_sizes: Sequence[int]
  dense_size: int

  def setup(self):
    c = self.image_shape[-1]
    out = c if self.likelihood == "bernoulli" else 2 * c
    if self.architecture == "conv":
      self.encoder = ConvEncoder(self.latent_dim, self.conv_channels,
                                 self.dense_size)
      self.decoder = ConvDecoder(self.image_shape, out, self.conv_channels,
                                 self.dense_size)
    else:
      self.encoder = MLPEncoder(self.latent_dim, self.hidden_sizes)
      self.decoder = MLPDecoder(self.image_shape, out, self.hidden_sizes)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x, z):
    return self.encode(x), self.decode(z)


# ----------------------------------------------------------------------------
# The family.


def _decoder_log_likelihood(likelihood: str, target: Array,
                            out: Array) -> Array:
  """log p(x | z) per example from the decoder's raw output [B, H, W, *]."""
  if likelihood == "bernoulli":
    return losses.sum_except_batch(losses.bernoulli_log_prob(out, target))
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
  return jnp.round((x + 1.0) * 127.5) / 255.0


def _validate(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  image_shape = tuple(int(s) for s in cfg.image_shape)
  if cfg.architecture not in ARCHITECTURES:
    raise ValueError(f"config.model.architecture={cfg.architecture!r}; the VAE"
                     f" supports {ARCHITECTURES}.")
  if cfg.likelihood not in LIKELIHOODS:
    raise ValueError(f"config.model.likelihood={cfg.likelihood!r}; the VAE"
                     f" supports {LIKELIHOODS}.")
  if cfg.binarize not in BINARIZATIONS:
    raise ValueError(f"config.model.binarize={cfg.binarize!r}; expected one of"
                     f" {BINARIZATIONS}.")
  if cfg.likelihood != "bernoulli" and cfg.binarize != "none":
    raise ValueError(
        f"config.model.binarize={cfg.binarize!r} needs the bernoulli"
        f" likelihood; {cfg.likelihood!r} models 8-bit data (use"
        " binarize='none').")
  factor = 2 ** len(cfg.conv_channels)
  if cfg.architecture == "conv" and (image_shape[0] % factor or
                                     image_shape[1] % factor):
    raise ValueError(
        f"The conv VAE with {len(cfg.conv_channels)} stride-2 layers needs H"
        f" and W divisible by {factor}; config.model.image_shape is"
        f" {image_shape}.")
  if cfg.iwae_samples < 1 or cfg.iwae_samples % min(cfg.iwae_chunk,
                                                    cfg.iwae_samples):
    raise ValueError(
        f"config.model.iwae_samples={cfg.iwae_samples} must be a positive"
        f" multiple of config.model.iwae_chunk={cfg.iwae_chunk}.")
  return image_shape


def default_model_config() -> ml_collections.ConfigDict:
  """Every key the VAE family reads, with defaults."""
  cfg = ml_collections.ConfigDict()
  cfg.family = "vae"
  cfg.image_shape = (28, 28, 1)
  cfg.architecture = "conv"  # conv | mlp
  cfg.latent_dim = 32
  cfg.conv_channels = (32, 64)
  cfg.dense_size = 256
  cfg.hidden_sizes = (200, 200)  # mlp
  cfg.likelihood = "bernoulli"  # bernoulli | discretized_logistic | ..._gaussian
  cfg.binarize = "dynamic"  # none | threshold | dynamic
  cfg.beta = 1.0
  cfg.kl_warmup_steps = 0  # KL weight ramps linearly from 0 to beta
  cfg.iwae_samples = 100  # k of the IWAE bound reported as the NLL
  cfg.iwae_chunk = 50
  cfg.sample_mean = True  # samples show the decoder mean, not a pixel draw
  return cfg


def make(cfg: ml_collections.ConfigDict) -> Family:
  """Builds the VAE family from ``config.model`` (see default_model_config)."""
  image_shape = _validate(cfg)
  model = VAE(image_shape=image_shape, latent_dim=cfg.latent_dim,
              architecture=cfg.architecture, likelihood=cfg.likelihood,
              conv_channels=tuple(cfg.conv_channels),
              hidden_sizes=tuple(cfg.hidden_sizes), dense_size=cfg.dense_size)
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

  def init(key, batch):
    target = prepare(batch["image"], key)
    z = jnp.zeros((target.shape[0], cfg.latent_dim), jnp.float32)
    return model.init(key, target, z)["params"]

  def loss(params, batch, key, step):
    bin_key, z_key = jax.random.split(key)
    target = prepare(batch["image"], bin_key)
    weight = beta
    if warmup > 0:
      weight = beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
    out = elbo(z_key, target, *bound_fns(params), weight)
    objective = -jnp.mean(out["objective"])
    metrics = {"neg_elbo": -jnp.mean(out["elbo"]),
               "kl": jnp.mean(out["kl"]),
               "recon_nll": -jnp.mean(out["log_likelihood"]),
               "kl_weight": jnp.asarray(weight, jnp.float32)}
    return objective, metrics

  def evaluate(params, batch, key):
    bin_key, elbo_key, iwae_key = jax.random.split(key, 3)
    target = prepare(batch["image"], bin_key)
    encode, log_likelihood = bound_fns(params)
    bound = elbo(elbo_key, target, encode, log_likelihood)
    nll = -iwae_bound(iwae_key, target, encode, log_likelihood, iwae_samples,
                      iwae_chunk)
    return {"nll_nats": nll, "bpd": losses.bits_per_dim(nll, num_dims),
            "neg_elbo_nats": -bound["elbo"], "kl": bound["kl"]}

  def decode_images(params, z, key):
    out = model.apply({"params": params}, z, method=VAE.decode)
    if sample_mean:
      return _decoder_mean(likelihood, out)
    return _decoder_sample(likelihood, key, out)

  def sample(params, key, num):
    z_key, x_key = jax.random.split(key)
    z = jax.random.normal(z_key, (num, cfg.latent_dim))
    return decode_images(params, z, x_key)

  def visualize(params, batch, key):
    """Reconstructions (input above its reconstruction) and interpolations
    between the posterior means of pairs of test images."""
    target = prepare(batch["image"][:8], key)
    encode, _ = bound_fns(params)
    mean, _ = encode(target)
    recon = decode_images(params, mean, key)
    originals = target if binary else (target + 1.0) / 2.0
    pairs = jnp.stack([originals, recon], axis=1).reshape(
        (-1,) + image_shape)
    weights = jnp.linspace(0.0, 1.0, 8)[:, None]
    rows = []
    for i in range(0, min(8, mean.shape[0]) - 1, 2):
      rows.append((1 - weights) * mean[i] + weights * mean[i + 1])
    interpolation = decode_images(params, jnp.concatenate(rows, 0), key)
    return {"reconstruction": pairs, "interpolation": interpolation}

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize)
