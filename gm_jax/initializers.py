"""Parameter initialisers shared by the families and the quality models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def fan_avg_uniform(scale: float = 1.0):
  """variance_scaling(scale, "fan_avg", "uniform") for conv / dense kernels.

  U(-l, l) with l = sqrt(3 scale / ((fan_in + fan_out) / 2)), fans counted as
  in flax (receptive field times the last two axes). The numbers are drawn as
  a flat vector and reshaped: with partitionable threefry, XLA:CPU compiles
  a draw of a 4-D shape several times slower than the same flat draw, which
  dominated the compile time of whole-model inits.
  """
  def init(key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in = (shape[-2] if len(shape) > 1 else 1) * receptive
    fan_out = shape[-1] * receptive
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    flat = jax.random.uniform(key, (math.prod(shape),), jnp.float32, -limit,
                              limit)
    return flat.reshape(shape).astype(dtype)
  return init
