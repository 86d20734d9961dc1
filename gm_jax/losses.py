"""Likelihood math shared by the families, as pure per-element functions.

Every function here is pure: arrays in, arrays out, no reduction over the
batch. Element-wise functions broadcast their inputs and return arrays of
the broadcast shape; sum them over the non-batch axes with
``sum_except_batch`` to get a per-example log-likelihood (``gaussian_kl``
does that sum itself and returns [B]). Conventions:

* Arguments come in one order: the data ``x`` first, then the
  distribution's parameters, then a PRNG ``key`` where one is needed, then
  options (``num_bins``, ...). Whatever can be derived from the shapes is
  (e.g. the mixture size from the parameters' last axis).
* 8-bit data with ``num_bins`` levels k = 0..num_bins-1 is scaled to
  ``x = 2 k / (num_bins - 1) - 1`` in [-1, 1], so neighbouring levels are
  ``2 / (num_bins - 1)`` apart and each level owns a bin of that width (the
  two edge bins extend to -inf and +inf). ``scale_to_symmetric`` does it.
* Log-probabilities are natural logs (nats); ``bits_per_dim`` converts.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.scipy import special

Array = jax.Array

LN2 = math.log(2.0)

# Levels of 8-bit data: the default ``num_bins`` of every function here and
# the number the families use for pixel values.
PIXEL_VALUES = 256


def _broadcast_shape(name: str, **shapes: tuple[int, ...]) -> tuple[int, ...]:
  """The broadcast of the named shapes; a ValueError naming them if there is
  none."""
  try:
    return jnp.broadcast_shapes(*shapes.values())
  except ValueError:
    raise ValueError(
        f"{name}: input shapes do not broadcast: {shapes}.") from None


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


def scale_to_symmetric(x_int: Array, num_bins: int = PIXEL_VALUES) -> Array:
  """Maps integer levels {0..num_bins-1} to float32 in [-1, 1]."""
  return x_int.astype(jnp.float32) * (2.0 / (num_bins - 1)) - 1.0


def uniform_dequantize(x_int: Array, key: Array,
                       num_bins: int = PIXEL_VALUES) -> Array:
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
  max_level = PIXEL_VALUES - 1
  if mode == "none":
    return image.astype(jnp.float32)
  if mode == "threshold":
    return (image > max_level // 2).astype(jnp.float32)
  if mode == "dynamic":
    if key is None:
      raise ValueError("binarize_images: mode 'dynamic' needs a key.")
    probs = image.astype(jnp.float32) / float(max_level)
    return jax.random.bernoulli(key, probs).astype(jnp.float32)
  raise ValueError(f"binarize_images: mode={mode!r}, expected one of"
                   f" {BINARIZATIONS}.")


# ----------------------------------------------------------------------------
# Bernoulli and categorical.


def bernoulli_log_prob(x: Array, logits: Array) -> Array:
  """log Bernoulli(x | sigmoid(logits)), element-wise, for x in {0, 1}.

  Computed as x * log sigmoid(l) + (1 - x) * log sigmoid(-l), stable for
  any finite logits.

  Args:
    x: data in {0, 1} (any dtype).
    logits: log-odds, broadcastable with x.

  Returns:
    log-probabilities of the broadcast shape, in the logits' float dtype.
  """
  _broadcast_shape("bernoulli_log_prob", x=jnp.shape(x),
                   logits=jnp.shape(logits))
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    logits = logits.astype(jnp.float32)
  x = jnp.asarray(x).astype(logits.dtype)
  return x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits)


def categorical_log_prob(x: Array, logits: Array) -> Array:
  """log softmax(logits)[x], element-wise.

  Args:
    x: [...] integer classes in {0..K-1}.
    logits: [..., K] unnormalised log-probabilities; their leading shape
      broadcasts with x's.

  Returns:
    log-probabilities of the broadcast leading shape.
  """
  x, logits = jnp.asarray(x), jnp.asarray(logits)
  if logits.ndim < 1:
    raise ValueError("categorical_log_prob: logits must be [..., K], got a"
                     " scalar.")
  shape = _broadcast_shape("categorical_log_prob", x=x.shape,
                           logits_without_k=logits.shape[:-1])
  log_probs = jnp.broadcast_to(jax.nn.log_softmax(logits, axis=-1),
                               shape + logits.shape[-1:])
  index = jnp.broadcast_to(x, shape).astype(jnp.int32)[..., None]
  return jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]


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
  """KL(N(mean, exp(log_std)^2) || N(0, 1)), element-wise (broadcasting).

  KL = 0.5 * (mean^2 + exp(2 log_std) - 1) - log_std.
  """
  _broadcast_shape("standard_normal_kl", mean=jnp.shape(mean),
                   log_std=jnp.shape(log_std))
  return 0.5 * (jnp.square(mean) + jnp.exp(2.0 * log_std) - 1.0) - log_std


def gaussian_kl(mean_q: Array, log_std_q: Array,
                mean_p: Array | float | None = None,
                log_std_p: Array | float | None = None) -> Array:
  """KL(q || p) per example between diagonal Gaussians, in nats.

  KL = sum_i [log s_p - log s_q + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2]
  over every axis but the first, with s = exp(log_std). p defaults to the
  standard normal N(0, I) (then the sum is of ``standard_normal_kl``).

  Args:
    mean_q, log_std_q: q's parameters, e.g. an encoder's [B, Z].
    mean_p, log_std_p: p's parameters, or None (both) for N(0, I).
      All four broadcast; the broadcast shape must be [B, ...].

  Returns:
    [B] the KL of each example, summed over the non-batch axes.
  """
  if (mean_p is None) != (log_std_p is None):
    raise ValueError("gaussian_kl: give both mean_p and log_std_p, or"
                     " neither (for the standard normal).")
  if mean_p is None:
    shape = _broadcast_shape("gaussian_kl", mean_q=jnp.shape(mean_q),
                             log_std_q=jnp.shape(log_std_q))
    kl = standard_normal_kl(mean_q, log_std_q)
  else:
    shape = _broadcast_shape(
        "gaussian_kl", mean_q=jnp.shape(mean_q), log_std_q=jnp.shape(log_std_q),
        mean_p=jnp.shape(mean_p), log_std_p=jnp.shape(log_std_p))
    kl = normal_kl(mean_q, 2.0 * jnp.asarray(log_std_q), mean_p,
                   2.0 * jnp.asarray(log_std_p))
  if len(shape) < 1:
    raise ValueError("gaussian_kl: the parameters' broadcast shape must be"
                     " [B, ...], got a scalar.")
  return sum_except_batch(jnp.broadcast_to(kl, shape))


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
                                  num_bins: int = PIXEL_VALUES) -> Array:
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
  return _discretized_log_prob(x, mean, log_scale, num_bins,
                               jax.nn.log_sigmoid, _log_sigmoid_diff)


def discretized_gaussian_log_prob(x: Array, mean: Array, log_std: Array,
                                  num_bins: int = PIXEL_VALUES) -> Array:
  """log P(x) under a Gaussian discretized to num_bins levels, element-wise.

  The DDPM decoder p(x_0 | x_1): P(k) = Phi((x + h - mean) / std) -
  Phi((x - h - mean) / std), h = 1 / (num_bins - 1), with open edge bins so
  that the levels' probabilities sum to one. Same conventions as
  ``discretized_logistic_log_prob``.
  """
  return _discretized_log_prob(x, mean, log_std, num_bins, special.log_ndtr,
                               _log_ndtr_diff)


def _discretized_log_prob(x, mean, log_scale, num_bins, log_cdf,
                          log_cdf_diff):
  """log P(bin of x) for a symmetric location-scale distribution with the
  standardised log-CDF ``log_cdf`` (and a stable ``log_cdf_diff(a, b)`` =
  log(CDF(a) - CDF(b))), with open edge bins."""
  half_bin = 1.0 / (num_bins - 1)
  inv_scale = jnp.exp(-log_scale)
  centered = x - mean
  upper = inv_scale * (centered + half_bin)
  lower = inv_scale * (centered - half_bin)
  interior = log_cdf_diff(upper, lower)
  # log(1 - CDF(lower)) = log CDF(-lower) by symmetry.
  return jnp.where(x < -1.0 + half_bin, log_cdf(upper),
                   jnp.where(x > 1.0 - half_bin, log_cdf(-lower), interior))


# ----------------------------------------------------------------------------
# PixelCNN++'s discretized logistic mixture with coupled colour means.


def mixture_num_params(num_channels: int, num_mixtures: int) -> int:
  """Channels of network output that parameterise one pixel's mixture.

  Per component: 1 logit, num_channels means, num_channels log-scales and
  num_channels * (num_channels - 1) / 2 coupling coefficients (3 for RGB).
  """
  num_coeffs = num_channels * (num_channels - 1) // 2
  return num_mixtures * (1 + 2 * num_channels + num_coeffs)


def mixture_num_components(num_params: int, num_channels: int,
                           num_mixtures: Optional[int] = None) -> int:
  """The number of components M that ``num_params`` outputs per pixel hold.

  The inverse of ``mixture_num_params``.

  Args:
    num_params: P, the parameters' last axis.
    num_channels: C.
    num_mixtures: if given, the M the caller expects (checked).

  Raises:
    ValueError: P is not a multiple of one component's parameters over C
      channels, or differs from ``mixture_num_params(C, num_mixtures)``.
  """
  per_component = mixture_num_params(num_channels, 1)
  if num_mixtures is not None:
    expected = mixture_num_params(num_channels, num_mixtures)
    if num_params != expected:
      raise ValueError(
          f"Discretized logistic mixture with {num_mixtures} components over"
          f" {num_channels} channels needs {expected} parameters in the last"
          f" axis, got {num_params}.")
  if num_params < per_component or num_params % per_component:
    raise ValueError(
        f"Discretized logistic mixture over {num_channels} channels needs a"
        f" positive multiple of {per_component} parameters in the last axis"
        f" ({per_component} per component), got {num_params}.")
  return num_params // per_component


def _split_mixture_params(
    params: Array, num_channels: int,
    num_mixtures: Optional[int]) -> Tuple[Array, Array, Array, Array]:
  """[..., P] -> logits [..., M], means, log_scales [..., C, M], coeffs [..., K, M]."""
  m = mixture_num_components(params.shape[-1], num_channels, num_mixtures)
  c = num_channels
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


def discretized_logistic_mixture_log_prob(
    x: Array, params: Array, num_mixtures: Optional[int] = None,
    num_bins: int = PIXEL_VALUES) -> Array:
  """Per-pixel log P(x) under PixelCNN++'s discretized logistic mixture.

  p(x) = sum_m pi_m prod_c DiscLogistic(x_c | mu_{m,c}(x_<c), s_{m,c}), with
  mu_{m,G} = mu + a x_R and mu_{m,B} = mu + b x_R + c x_G (Salimans et al.,
  2017), coefficients squashed by tanh and log-scales clipped below at -7.

  Args:
    x: [..., C] pixels scaled to [-1, 1].
    params: [..., P] raw network outputs, P = mixture_num_params(C, M); the
      leading shapes of x and params broadcast.
    num_mixtures: optional check: M, which P and C determine anyway.
    num_bins: levels per channel.

  Returns:
    log-probabilities of whole pixels, in nats, of the broadcast leading
    shape.
  """
  num_channels = x.shape[-1]
  lead = _broadcast_shape("discretized_logistic_mixture_log_prob",
                          x_without_c=x.shape[:-1],
                          params_without_p=params.shape[:-1])
  x = jnp.broadcast_to(x, lead + x.shape[-1:])
  params = jnp.broadcast_to(params, lead + params.shape[-1:])
  logits, means, log_scales, coeffs = _split_mixture_params(
      params, num_channels, num_mixtures)
  means = _coupled_means(means, coeffs, x)
  per_channel = discretized_logistic_log_prob(x[..., None], means, log_scales,
                                              num_bins)  # [..., C, M]
  log_mix = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(log_mix + jnp.sum(per_channel, axis=-2), axis=-1)


def sample_discretized_logistic_mixture(
    params: Array, key: Array, num_channels: int,
    num_mixtures: Optional[int] = None,
    num_bins: int = PIXEL_VALUES) -> Array:
  """Draws whole pixels from ``discretized_logistic_mixture_log_prob``.

  Picks a component per pixel, then samples the channels in order, each from
  its logistic with the coupled mean, rounded to the nearest level (which is
  exactly a draw from the discretized distribution).

  Args:
    params: [..., P] raw network outputs.
    key: PRNG key.
    num_channels: C, the channels of a pixel.
    num_mixtures, num_bins: as in the log-prob (M is derived from P and C).

  Returns:
    [..., C] float32 samples on the grid of levels in [-1, 1].
  """
  logits, means, log_scales, coeffs = _split_mixture_params(
      params, num_channels, num_mixtures)
  key_mix, key_logistic = jax.random.split(key)
  component = jax.random.categorical(key_mix, logits, axis=-1)  # [...]
  one_hot = jax.nn.one_hot(component, logits.shape[-1], dtype=params.dtype)
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
