"""Likelihood math shared by the families, as pure per-element functions.

Every function here is pure: arrays in, arrays out, no reduction over the
batch. Element-wise functions return arrays of their inputs' broadcast shape;
sum them over the non-batch axes with ``sum_except_batch`` to get a
per-example log-likelihood. Conventions:

* 8-bit data with ``num_bins`` levels k = 0..num_bins-1 is scaled to
  ``x = 2 k / (num_bins - 1) - 1`` in [-1, 1], so neighbouring levels are
  ``2 / (num_bins - 1)`` apart and each level owns a bin of that width (the
  two edge bins extend to -inf and +inf). ``scale_to_symmetric`` does it.
* Log-probabilities are natural logs (nats); ``bits_per_dim`` converts.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
from jax.scipy import special

Array = jax.Array

LN2 = math.log(2.0)


def _check_same_shape(name: str, **arrays: Array) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"{name}: inputs must have the same shape, got {shapes}.")


def sum_except_batch(x: Array) -> Array:
  """Sums over every axis but the first: [B, ...] -> [B]."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def bits_per_dim(nll_nats: Array, num_dims: int) -> Array:
  """Converts a per-example NLL in nats to bits per dimension.

  bpd = nll / (num_dims * ln 2), with num_dims = H * W * C for images.
  """
  if num_dims <= 0:
    raise ValueError(f"bits_per_dim: num_dims must be positive, got {num_dims}.")
  return nll_nats / (num_dims * LN2)


def scale_to_symmetric(x_int: Array, num_bins: int = 256) -> Array:
  """Maps integer levels {0..num_bins-1} to float32 in [-1, 1]."""
  return x_int.astype(jnp.float32) * (2.0 / (num_bins - 1)) - 1.0


def uniform_dequantize(key: Array, x_int: Array, num_bins: int = 256) -> Array:
  """Uniform dequantization: (k + u) / num_bins with u ~ U[0, 1), in [0, 1).

  The density of the result lower-bounds the probability mass of k times
  num_bins^D, so -log p_model(y) + D log(num_bins) bounds the discrete NLL.
  """
  u = jax.random.uniform(key, x_int.shape, dtype=jnp.float32)
  return (x_int.astype(jnp.float32) + u) / num_bins


BINARIZATIONS = ("none", "threshold", "dynamic")


def binarize_images(image: Array, mode: str,
                    key: Array | None = None) -> Array:
  """uint8 images -> float32 {0, 1} of the same shape, for binary models.

  Args:
    image: uint8 images (0..255, or already {0, 1} for mode "none").
    mode: "none" (taken as is, e.g. tfds binarized_mnist), "threshold"
      (pixel > 127) or "dynamic" (a Bernoulli(pixel / 255) draw from ``key``,
      a fresh binarization every step).
    key: PRNG key, needed for "dynamic".
  """
  if mode == "none":
    return image.astype(jnp.float32)
  if mode == "threshold":
    return (image > 127).astype(jnp.float32)
  if mode == "dynamic":
    if key is None:
      raise ValueError("binarize_images: mode 'dynamic' needs a key.")
    probs = image.astype(jnp.float32) / 255.0
    return jax.random.bernoulli(key, probs).astype(jnp.float32)
  raise ValueError(f"binarize_images: mode={mode!r}, expected one of"
                   f" {BINARIZATIONS}.")


# ----------------------------------------------------------------------------
# Bernoulli and categorical.


def bernoulli_log_prob(logits: Array, x: Array) -> Array:
  """log Bernoulli(x | sigmoid(logits)), element-wise, for x in {0, 1}.

  Computed as x * log sigmoid(l) + (1 - x) * log sigmoid(-l), stable for
  any finite logits.
  """
  _check_same_shape("bernoulli_log_prob", logits=logits, x=x)
  x = x.astype(logits.dtype)
  return x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits)


def categorical_log_prob(logits: Array, x: Array) -> Array:
  """log softmax(logits)[x], element-wise.

  Args:
    logits: [..., K] unnormalised log-probabilities.
    x: [...] integer classes in {0..K-1}.

  Returns:
    [...] log-probabilities.
  """
  if logits.shape[:-1] != x.shape:
    raise ValueError(
        "categorical_log_prob: logits must be x.shape + (K,), got logits"
        f" {logits.shape} and x {x.shape}.")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(
      log_probs, x[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------
# Gaussians.


def gaussian_log_prob(x: Array, mean: Array, log_std: Array) -> Array:
  """log N(x | mean, exp(log_std)^2), element-wise."""
  z = (x - mean) * jnp.exp(-log_std)
  return -0.5 * (z * z + math.log(2 * math.pi)) - log_std


def normal_kl(mean1: Array, log_var1: Array, mean2: Array,
              log_var2: Array) -> Array:
  """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), element-wise.

  KL = 0.5 * (log_var2 - log_var1 + (exp(log_var1) + (mean1 - mean2)^2)
  / exp(log_var2) - 1).
  """
  return 0.5 * (log_var2 - log_var1 - 1.0 + jnp.exp(log_var1 - log_var2) +
                jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def standard_normal_kl(mean: Array, log_std: Array) -> Array:
  """KL(N(mean, exp(log_std)^2) || N(0, 1)), element-wise.

  KL = 0.5 * (mean^2 + exp(2 log_std) - 1) - log_std.
  """
  _check_same_shape("standard_normal_kl", mean=mean, log_std=log_std)
  return 0.5 * (jnp.square(mean) + jnp.exp(2.0 * log_std) - 1.0) - log_std


# ----------------------------------------------------------------------------
# Discretized continuous distributions over num_bins levels in [-1, 1].


def _log_sigmoid_diff(a: Array, b: Array) -> Array:
  """log(sigmoid(a) - sigmoid(b)) for a > b, without cancellation.

  Uses sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)).
  """
  return jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b) + jnp.log(
      -jnp.expm1(b - a))


def _log_ndtr_diff(a: Array, b: Array) -> Array:
  """log(Phi(a) - Phi(b)) for a > b, reflecting to the left tail for accuracy."""
  flip = (a + b) > 0
  a, b = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
  log_a = special.log_ndtr(a)
  log_b = special.log_ndtr(b)
  return log_a + jnp.log(-jnp.expm1(jnp.minimum(log_b - log_a, -1e-30)))


def discretized_logistic_log_prob(x: Array, mean: Array, log_scale: Array,
                                  num_bins: int = 256) -> Array:
  """log P(x) under a logistic discretized to num_bins levels, element-wise.

  P(k) = sigmoid((x + h - mean) / s) - sigmoid((x - h - mean) / s) with
  half-bin h = 1 / (num_bins - 1), s = exp(log_scale); the lowest level takes
  all mass below its upper edge and the highest all mass above its lower
  edge, so the probabilities of the num_bins levels sum to exactly one.

  Args:
    x: data scaled to [-1, 1] (see ``scale_to_symmetric``).
    mean: location, broadcastable to x.
    log_scale: log of the logistic scale, broadcastable to x.
    num_bins: number of levels.

  Returns:
    log-probabilities of x's shape, in nats.
  """
  half_bin = 1.0 / (num_bins - 1)
  inv_scale = jnp.exp(-log_scale)
  centered = x - mean
  upper = inv_scale * (centered + half_bin)
  lower = inv_scale * (centered - half_bin)
  interior = _log_sigmoid_diff(upper, lower)
  return jnp.where(x < -1.0 + half_bin, jax.nn.log_sigmoid(upper),
                   jnp.where(x > 1.0 - half_bin, jax.nn.log_sigmoid(-lower),
                             interior))


def discretized_gaussian_log_prob(x: Array, mean: Array, log_std: Array,
                                  num_bins: int = 256) -> Array:
  """log P(x) under a Gaussian discretized to num_bins levels, element-wise.

  The DDPM decoder p(x_0 | x_1): P(k) = Phi((x + h - mean) / std) -
  Phi((x - h - mean) / std), h = 1 / (num_bins - 1), with open edge bins so
  that the levels' probabilities sum to one. Same conventions as
  ``discretized_logistic_log_prob``.
  """
  half_bin = 1.0 / (num_bins - 1)
  inv_std = jnp.exp(-log_std)
  centered = x - mean
  upper = inv_std * (centered + half_bin)
  lower = inv_std * (centered - half_bin)
  interior = _log_ndtr_diff(upper, lower)
  return jnp.where(x < -1.0 + half_bin, special.log_ndtr(upper),
                   jnp.where(x > 1.0 - half_bin, special.log_ndtr(-lower),
                             interior))


# ----------------------------------------------------------------------------
# PixelCNN++'s discretized logistic mixture with coupled colour means.


def mixture_num_params(num_channels: int, num_mixtures: int) -> int:
  """Channels of network output that parameterise one pixel's mixture.

  Per component: 1 logit, num_channels means, num_channels log-scales and
  num_channels * (num_channels - 1) / 2 coupling coefficients (3 for RGB).
  """
  num_coeffs = num_channels * (num_channels - 1) // 2
  return num_mixtures * (1 + 2 * num_channels + num_coeffs)


def _split_mixture_params(
    params: Array, num_channels: int,
    num_mixtures: int) -> Tuple[Array, Array, Array, Array]:
  """[..., P] -> logits [..., M], means, log_scales [..., C, M], coeffs [..., K, M]."""
  expected = mixture_num_params(num_channels, num_mixtures)
  if params.shape[-1] != expected:
    raise ValueError(
        f"Discretized logistic mixture with {num_mixtures} components over"
        f" {num_channels} channels needs {expected} parameters in the last"
        f" axis, got {params.shape[-1]}.")
  m, c = num_mixtures, num_channels
  k = c * (c - 1) // 2
  lead = params.shape[:-1]
  logits = params[..., :m]
  means = params[..., m:m + c * m].reshape(lead + (c, m))
  log_scales = params[..., m + c * m:m + 2 * c * m].reshape(lead + (c, m))
  coeffs = jnp.tanh(params[..., m + 2 * c * m:].reshape(lead + (k, m)))
  return logits, means, jnp.maximum(log_scales, -7.0), coeffs


def _coupled_means(means: Array, coeffs: Array, x: Array) -> Array:
  """Adds the autoregressive colour terms: channel j's mean += sum_i<j c * x_i.

  Args:
    means: [..., C, M]. coeffs: [..., K, M] with K = C (C - 1) / 2, ordered
      (1,0), (2,0), (2,1), ... (G on R, B on R, B on G for RGB).
    x: [..., C] the pixel's values, used only for earlier channels.
  """
  c = means.shape[-2]
  rows = [means[..., 0, :]]
  index = 0
  for j in range(1, c):
    mean_j = means[..., j, :]
    for i in range(j):
      mean_j = mean_j + coeffs[..., index, :] * x[..., i:i + 1]
      index += 1
    rows.append(mean_j)
  return jnp.stack(rows, axis=-2)


def discretized_logistic_mixture_log_prob(x: Array, params: Array,
                                          num_mixtures: int,
                                          num_bins: int = 256) -> Array:
  """Per-pixel log P(x) under PixelCNN++'s discretized logistic mixture.

  p(x) = sum_m pi_m prod_c DiscLogistic(x_c | mu_{m,c}(x_<c), s_{m,c}), with
  mu_{m,G} = mu + a x_R and mu_{m,B} = mu + b x_R + c x_G (Salimans et al.,
  2017), coefficients squashed by tanh and log-scales clipped below at -7.

  Args:
    x: [..., C] pixels scaled to [-1, 1].
    params: [..., mixture_num_params(C, num_mixtures)] raw network outputs.
    num_mixtures: number of components M.
    num_bins: levels per channel.

  Returns:
    [...] log-probabilities of whole pixels, in nats.
  """
  num_channels = x.shape[-1]
  if params.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        "discretized_logistic_mixture_log_prob: params must share x's leading"
        f" shape, got x {x.shape} and params {params.shape}.")
  logits, means, log_scales, coeffs = _split_mixture_params(
      params, num_channels, num_mixtures)
  means = _coupled_means(means, coeffs, x)
  per_channel = discretized_logistic_log_prob(x[..., None], means, log_scales,
                                              num_bins)  # [..., C, M]
  log_mix = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(log_mix + jnp.sum(per_channel, axis=-2), axis=-1)


def sample_discretized_logistic_mixture(key: Array, params: Array,
                                        num_channels: int, num_mixtures: int,
                                        num_bins: int = 256) -> Array:
  """Draws whole pixels from ``discretized_logistic_mixture_log_prob``.

  Picks a component per pixel, then samples the channels in order, each from
  its logistic with the coupled mean, rounded to the nearest level (which is
  exactly a draw from the discretized distribution).

  Args:
    key: PRNG key.
    params: [..., P] raw network outputs.
    num_channels, num_mixtures, num_bins: as in the log-prob.

  Returns:
    [..., C] float32 samples on the grid of levels in [-1, 1].
  """
  logits, means, log_scales, coeffs = _split_mixture_params(
      params, num_channels, num_mixtures)
  key_mix, key_logistic = jax.random.split(key)
  component = jax.random.categorical(key_mix, logits, axis=-1)  # [...]
  one_hot = jax.nn.one_hot(component, num_mixtures, dtype=params.dtype)
  u = jax.random.uniform(
      key_logistic, params.shape[:-1] + (num_channels,),
      minval=1e-5, maxval=1.0 - 1e-5)
  noise = jnp.log(u) - jnp.log1p(-u)  # standard logistic
  step = 2.0 / (num_bins - 1)
  values = []
  for c in range(num_channels):
    mean_c = jnp.sum(means[..., c, :] * one_hot, axis=-1)
    index = c * (c - 1) // 2
    for i in range(c):
      mean_c = mean_c + jnp.sum(coeffs[..., index + i, :] * one_hot,
                                axis=-1) * values[i]
    scale_c = jnp.exp(jnp.sum(log_scales[..., c, :] * one_hot, axis=-1))
    raw = mean_c + scale_c * noise[..., c]
    quantized = jnp.clip(jnp.round((raw + 1.0) / step), 0, num_bins - 1)
    values.append(quantized * step - 1.0)
  return jnp.stack(values, axis=-1)
