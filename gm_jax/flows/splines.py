"""Monotonic rational-quadratic splines (Durkan et al., 2019, "Neural Spline
Flows") as a pure element-wise bijection with linear tails.

On [-bound, bound] the map is a monotonic piecewise rational-quadratic
function through K + 1 knots (x_k, y_k) with positive derivatives d_k at the
knots; outside it is the identity (the boundary derivatives are 1, so the
map is C^1). In bin k, with xi = (x - x_k) / w_k and s_k = h_k / w_k:

  y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + g_k xi (1 - xi)),
  dy/dx = s_k^2 (d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2)
          / (s_k + g_k xi (1 - xi))^2,      g_k = d_{k+1} + d_k - 2 s_k,

and the inverse solves the quadratic a xi^2 + b xi + c = 0 in its stable
form xi = 2c / (-b - sqrt(b^2 - 4ac)). The log-det is the sum of
log dy/dx (a diagonal Jacobian). All-zero raw parameters give equal bins and
unit derivatives: the identity.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def spline_num_params(num_bins: int) -> int:
  """Raw parameters per element: K widths, K heights, K - 1 inner
  derivatives."""
  return 3 * num_bins - 1


def _knots(raw: Array, bound: float, min_size: float) -> Tuple[Array, Array]:
  """Softmax bin sizes [..., K] (each >= min_size of the range) -> knot
  positions [..., K + 1] from -bound to bound and bin sizes [..., K]."""
  num_bins = raw.shape[-1]
  sizes = jax.nn.softmax(raw, axis=-1)
  sizes = min_size + (1.0 - min_size * num_bins) * sizes
  knots = jnp.cumsum(sizes, axis=-1)
  knots = jnp.concatenate([jnp.zeros_like(knots[..., :1]), knots], axis=-1)
  knots = 2.0 * bound * knots - bound
  # Pin the ends exactly (the cumulative sum may miss them by rounding).
  knots = knots.at[..., 0].set(-bound).at[..., -1].set(bound)
  return knots, knots[..., 1:] - knots[..., :-1]


def _gather(values: Array, index: Array) -> Array:
  return jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]


def rational_quadratic_spline(x: Array, raw_params: Array, bound: float = 3.0,
                              inverse: bool = False) -> Tuple[Array, Array]:
  """Applies the spline (or its inverse) element-wise.

  Args:
    x: [...] inputs (outputs of the forward map when ``inverse``).
    raw_params: [..., 3K - 1] unconstrained parameters per element: K bin
      widths, K bin heights, K - 1 inner knot derivatives (softplus-ed so
      that 0 gives derivative 1).
    bound: the spline acts on [-bound, bound]; the identity outside.
    inverse: apply the inverse map.

  Returns:
    (y [...], log|dy/dx| [...]) element-wise; for the inverse the log-det is
    that of the inverse map, i.e. -log|dy/dx| at the preimage.
  """
  num_params = raw_params.shape[-1]
  if num_params % 3 != 2:
    raise ValueError(
        "rational_quadratic_spline: the last axis of raw_params must be"
        f" 3K - 1 for K bins, got {num_params}.")
  num_bins = (num_params + 1) // 3
  raw_widths = raw_params[..., :num_bins]
  raw_heights = raw_params[..., num_bins:2 * num_bins]
  raw_derivatives = raw_params[..., 2 * num_bins:]

  x_knots, widths = _knots(raw_widths, bound, MIN_BIN_WIDTH)
  y_knots, heights = _knots(raw_heights, bound, MIN_BIN_HEIGHT)
  # softplus(raw + c) + MIN_DERIVATIVE = 1 at raw = 0; boundary
  # derivatives 1 to match the identity tails.
  shift = math.log(math.expm1(1.0 - MIN_DERIVATIVE))
  inner = MIN_DERIVATIVE + jax.nn.softplus(raw_derivatives + shift)
  ones = jnp.ones_like(inner[..., :1])
  derivatives = jnp.concatenate([ones, inner, ones], axis=-1)

  inside = (x >= -bound) & (x <= bound)
  # A safe in-range value outside (the tails are the identity); not clip,
  # whose derivative at the boundary would be split between the branches.
  x_in = jnp.where(inside, x, 0.0)
  knots = y_knots if inverse else x_knots
  # The bin: the number of inner knots at or below the input.
  index = jnp.sum(x_in[..., None] >= knots[..., 1:-1], axis=-1)
  x_k, w_k = _gather(x_knots, index), _gather(widths, index)
  y_k, h_k = _gather(y_knots, index), _gather(heights, index)
  d_k = _gather(derivatives, index)
  d_k1 = _gather(derivatives, index + 1)
  s_k = h_k / w_k
  g_k = d_k1 + d_k - 2.0 * s_k

  if inverse:
    dy = x_in - y_k
    a = h_k * (s_k - d_k) + dy * g_k
    b = h_k * d_k - dy * g_k
    c = -s_k * dy
    discriminant = jnp.maximum(b * b - 4.0 * a * c, 0.0)
    xi = (2.0 * c) / (-b - jnp.sqrt(discriminant))
    out = xi * w_k + x_k
  else:
    xi = (x_in - x_k) / w_k
    xi_1m = xi * (1.0 - xi)
    out = y_k + h_k * (s_k * xi * xi + d_k * xi_1m) / (s_k + g_k * xi_1m)

  xi_1m = xi * (1.0 - xi)
  denominator = s_k + g_k * xi_1m
  log_derivative = (2.0 * jnp.log(s_k) + jnp.log(
      d_k1 * xi * xi + 2.0 * s_k * xi_1m + d_k * (1.0 - xi)**2) -
                    2.0 * jnp.log(denominator))
  if inverse:
    log_derivative = -log_derivative
  return (jnp.where(inside, out, x), jnp.where(inside, log_derivative, 0.0))
