"""Variational dequantization (Flow++, Ho et al., 2019, Section 3.1).

Uniform dequantization trains the flow's density p on y = x + u with
u ~ U[0, 1)^D and reports E_u[-log p(x + u)], an upper bound on -log P(x),
where P(x) = integral over [0, 1)^D of p(x + u) du is the probability the
flow gives the bin of the integer image x. The bound is loose wherever p
is not flat inside a bin. Variational dequantization draws u from a learned
conditional density q(u | x) on the unit cube instead:

  log P(x) = log E_q[p(x + u) / q(u | x)] >= E_q[log p(x + u) - log q(u | x)]

(Jensen), with equality when q(u | x) = p(x + u) / P(x). Both p and q are
trained on this bound; with q uniform it is the uniform bound.

Here q(u | x) is itself a flow, u = sigmoid(h(e; x)), from a logistic base
e ~ Logistic(0, 1)^D through ``num_steps`` affine checkerboard couplings
whose conditioners also see features of x:

  log q(u | x) = log p_logistic(e) - log|det dh/de| - sum log sigmoid'(h).

The logistic base is chosen because sigmoid(e) of a logistic e is uniform
on (0, 1): with the couplings at the identity (their output layers start at
zero) q is exactly the uniform distribution and log q = 0, so a model starts
from the uniform bound and the two coincide there, which a test checks.

``VariationalDequantize`` is the data-side bijector of a flow with
``dequantization="variational"``: its forward returns x + u and, as its
"log-det", -log q(u | x), so the ``Chain``'s total
log N(z) + sum of log-dets is the bound's integrand log p(x + u) - log q(u | x)
without any change to the rest of the flow. Its inverse is the floor (as for
``UniformDequantize``).
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.convolutions import Conv
from gm_jax.flows.bijectors import (
  Bijector,
  ConvNet,
  bounded_log_scale,
  checkerboard_mask,
)
from gm_jax.losses import PIXEL_VALUES, sum_except_batch

Array = jax.Array

DEQUANTIZATIONS = ("uniform", "variational")


def logistic_log_prob(e: Array) -> Array:
  """log of the standard logistic density, log sigmoid(e) + log sigmoid(-e),
  element-wise (also the log-derivative of sigmoid at e)."""
  return jax.nn.log_sigmoid(e) + jax.nn.log_sigmoid(-e)


class ConditionalCoupling(nn.Module):
  """An affine checkerboard coupling of e [B, H, W, C] whose conditioner
  also sees a context [B, H, W, F].

  Pixels with (row + col + parity) even are kept; the others become
  e * s + t with (t, log s) = NN(kept pixels, context) (log s bounded as
  Glow's sigmoid scale, see ``bijectors.bounded_log_scale``). The Jacobian is
  triangular, log-det = sum of log s over the changed pixels. The
  conditioner's output layer starts at zero, so the coupling starts as the
  identity. Only the direction that samples q is needed.
  """

  parity: int = 0
  width: int = 32
  num_res_blocks: int = 1

  @nn.compact
  def __call__(self, e: Array, context: Array) -> Tuple[Array, Array]:
    channels = e.shape[-1]
    keep = jnp.asarray(checkerboard_mask(e.shape[1], e.shape[2],
                                         self.parity))
    raw = ConvNet(2 * channels, self.width, self.num_res_blocks,
                  name="conditioner")(
                      jnp.concatenate([e * keep, context], axis=-1))
    raw = raw.reshape(raw.shape[:-1] + (channels, 2))
    shift = raw[..., 0]
    log_scale = bounded_log_scale(raw[..., 1], "sigmoid")
    changed = e * jnp.exp(log_scale) + shift
    return (keep * e + (1.0 - keep) * changed,
            sum_except_batch((1.0 - keep) * log_scale))


class VariationalDequantize(Bijector):
  """y = x + u with u ~ q(u | x), a conditional flow on the unit cube.

  The forward's log-det is -log q(u | x) [B] (see the module docstring), so
  a ``Chain`` starting with it sums the variational dequantization bound's
  integrand. Draws its base noise from the rng stream ``"dequantize"``.

  Attributes:
    num_bins: the levels of x (the inverse clips to 0..num_bins - 1).
    num_steps: couplings of q's flow (alternating checkerboard parities).
    width: channels of the context net and of the couplings' conditioners.
    num_res_blocks: residual blocks of each conditioner (0: Glow's 3-conv
      net).
  """

  num_bins: int = PIXEL_VALUES
  num_steps: int = 4
  width: int = 32
  num_res_blocks: int = 1

  @nn.compact
  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    if not self.has_rng("dequantize"):
      raise ValueError(
          "VariationalDequantize draws its noise from the rng stream"
          " 'dequantize': pass a key (flow_log_prob(..., key=key), or"
          " rngs={'dequantize': key} to apply / init).")
    x = x.astype(jnp.float32)
    e = jax.random.logistic(self.make_rng("dequantize"), x.shape,
                            jnp.float32)
    log_q = sum_except_batch(logistic_log_prob(e))
    # Features of the image the noise dequantizes, x scaled to [-0.5, 0.5].
    scaled = x / max(self.num_bins - 1, 1) - 0.5
    context = Conv(self.width, (3, 3), name="context_in")(scaled)
    context = Conv(self.width, (3, 3), name="context_out")(nn.relu(context))
    context = nn.relu(context)
    h = e
    for i in range(self.num_steps):
      h, log_det = ConditionalCoupling(
          parity=i % 2, width=self.width, num_res_blocks=self.num_res_blocks,
          name=f"coupling_{i}")(h, context)
      log_q = log_q - log_det
    u = jax.nn.sigmoid(h)
    log_q = log_q - sum_except_batch(logistic_log_prob(h))
    return x + u, -log_q

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    x = jnp.clip(jnp.floor(y), 0, self.num_bins - 1)
    return x, jnp.zeros((y.shape[0],), jnp.float32)
