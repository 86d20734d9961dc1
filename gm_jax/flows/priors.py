"""The learned Gaussian priors of the multi-scale flows, as bijectors.

Glow models the factored-out halves and the final latent with Gaussians
whose means and log-scales are learned: ``GaussianSplit`` conditions a
factored-out half on the half that goes on, ``GaussianTopPrior`` gives the
final tensor a learned and/or class-conditional prior. Each is written as
the whitening bijection h -> (h - mu) / sigma (log-det -sum log sigma), so
that the whole model stays one bijection onto N(0, I) and a standard normal
on the output gives exactly log N(h; mu, sigma^2). Both start as the
identity: their parameters come out of zero-initialised layers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.flows.bijectors import (
  Bijector,
  ZeroConv,
  ZeroDense,
  zero_output_layer,
)
from gm_jax.losses import sum_except_batch

Array = jax.Array


class GaussianSplit(Bijector):
  """Glow's split with a learned conditional prior, as a bijector.

  Splits the channels into h1 = x[..., :C//2] (kept, goes on to the next
  level) and h2 = x[..., C//2:] (factored out) and whitens h2 under the
  prior N(mu(h1), sigma(h1)^2) predicted by a zero-initialised 3x3 conv:
  y = [h1, (h2 - mu) / sigma], log-det = -sum log sigma. A standard normal
  on y then gives log N(h2; mu, sigma^2) for the factored-out half, exactly
  Glow's split prior, while the whole model stays one bijection onto a
  standard normal. ``conditioner``: the zero-initialised conv is plain
  (``"plain"``) or Glow's ``ZeroConv`` with a learned scale (``"glow"``, as
  openai/glow's ``split2d_prior``).
  """

  conditioner: str = "plain"

  @nn.compact
  def _mean_and_log_std(self, h1: Array, num_out: int) -> Tuple[Array, Array]:
    h = zero_output_layer(self.conditioner, 2 * num_out, name="prior")(h1)
    return h[..., :num_out], h[..., num_out:]

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    half = x.shape[-1] // 2
    h1, h2 = x[..., :half], x[..., half:]
    mean, log_std = self._mean_and_log_std(h1, h2.shape[-1])
    eps = (h2 - mean) * jnp.exp(-log_std)
    return (jnp.concatenate([h1, eps], axis=-1),
            -sum_except_batch(log_std))

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    half = y.shape[-1] // 2
    h1, eps = y[..., :half], y[..., half:]
    mean, log_std = self._mean_and_log_std(h1, eps.shape[-1])
    h2 = eps * jnp.exp(log_std) + mean
    return (jnp.concatenate([h1, h2], axis=-1),
            sum_except_batch(log_std))


class GaussianTopPrior(Bijector):
  """Glow's prior of the final latent, learned and/or class-conditional, as
  a whitening bijector.

  The final tensor h [B, H, W, C] of the multi-scale flow has the prior
  N(mu, diag(sigma^2)) with [mu, log sigma] = a(H, W) + b(y) [.., 2C]:

  * ``learned`` (openai/glow's ``learntop``): a = ZeroConv(constant input),
    a zero-initialised 3x3 conv (with Glow's learned output scale) of an
    all-ones [1, H, W, 1] image. The zero padding at the border makes the
    response depend on the distance to the border: a per-channel constant
    plus border terms, the function class of openai/glow's conv of a zero
    input with its border-indicator channel, with every parameter live.
  * ``num_classes`` > 0 (``ycond``): b = ZeroDense(one_hot(y)), a
    zero-initialised linear layer, the same at every position.

  Forward: eps = (h - mu) / sigma, log-det = -sum log sigma, so a standard
  normal on eps gives log N(h; mu, sigma^2). All of it starts at zero: at
  initialisation the prior is exactly N(0, I) (the map is the identity).

  With ``classifier`` the forward direction also computes Glow's auxiliary
  class logits [B, num_classes], a ``ZeroDense`` of h averaged over space
  (zero, i.e. uniform, at initialisation), and sows them as
  ("intermediates", "class_logits"); read them with
  ``apply(..., mutable=["intermediates"])``.
  """

  learned: bool = True
  num_classes: int = 0
  classifier: bool = False
  takes_labels = True

  @nn.compact
  def _prior(self, h: Array, labels: Optional[Array],
             with_logits: bool) -> Tuple[Array, Array, Optional[Array]]:
    """mu, log sigma (each broadcastable to h [B, H, W, C]) and, if
    ``with_logits``, the class logits [B, num_classes] (else None)."""
    _, height, width, c = h.shape
    stats = jnp.zeros((1, 1, 1, 2 * c), jnp.float32)
    if self.learned:
      constant = jnp.ones((1, height, width, 1), jnp.float32)
      stats = stats + ZeroConv(2 * c, name="prior")(constant)  # [1, H, W, 2C]
    if self.num_classes > 0:
      if labels is None:
        raise ValueError(
            f"A class-conditional prior ({self.num_classes} classes) needs"
            " the labels: pass labels=[B] int32.")
      one_hot = jax.nn.one_hot(labels, self.num_classes)  # [B, K]
      class_stats = ZeroDense(2 * c, name="class_prior")(one_hot)  # [B, 2C]
      stats = stats + class_stats[:, None, None, :]
    logits = None
    if with_logits:
      pooled = jnp.mean(h, axis=(1, 2))  # [B, C]
      logits = ZeroDense(self.num_classes, name="classifier")(pooled)
    return stats[..., :c], stats[..., c:], logits

  def forward_and_log_det(self, x: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    if self.classifier and self.num_classes < 2:
      raise ValueError("GaussianTopPrior(classifier=True) needs num_classes"
                       f" >= 2, got {self.num_classes}.")
    mean, log_std, logits = self._prior(x, labels, self.classifier)
    if logits is not None:
      self.sow("intermediates", "class_logits", logits)
    eps = (x - mean) * jnp.exp(-log_std)
    log_std = jnp.broadcast_to(log_std, x.shape)
    return eps, -sum_except_batch(log_std)

  def inverse_and_log_det(self, y: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    mean, log_std, _ = self._prior(y, labels, False)
    x = y * jnp.exp(log_std) + mean
    log_std = jnp.broadcast_to(log_std, y.shape)
    return x, sum_except_batch(log_std)
