"""The U-Net's Flax blocks: time embeddings, ResNet blocks, attention.

The blocks of the DDPM U-Net (Ho et al., 2020):

* ``sinusoidal_embedding``: the Transformer position encoding of a scalar
  (a diffusion timestep).
* ``ResnetBlock``: GroupNorm -> swish -> conv -> (+ projected conditioning)
  -> GroupNorm -> swish -> dropout -> conv, plus a (1x1) shortcut.
* ``AttentionBlock``: GroupNorm then multi-head self-attention over all
  spatial positions, with a residual connection.
* ``Downsample`` / ``Upsample``: factor-2 resampling, strided conv or average
  pooling down, nearest-neighbour (+ conv) up.

Every module takes ``dtype`` (the computation dtype, e.g. bfloat16) and keeps
its parameters in float32; normalisation statistics and softmaxes are
computed in float32 whatever the computation dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.convolutions import Conv, dot_general
from gm_jax.initializers import fan_avg_uniform  # noqa: F401  (re-export)

Array = jax.Array
Dtype = Any
# The computation dtypes a config may name (``model.dtype`` of the DDPM and
# VDM families); parameters stay float32 under either.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}



# DDPM initialises with variance_scaling(1, fan_avg, uniform) throughout and
# with (near-)zero weights for the last layer of every residual branch, so
# each block starts as the identity.
default_init = fan_avg_uniform(1.0)
zero_init = nn.initializers.zeros


def sinusoidal_embedding(t: Array, dim: int,
                         max_period: float = 10_000.0) -> Array:
  """Sinusoidal embedding of scalars, as in DDPM / the Transformer.

  emb[i] = sin(t * w_i), emb[half + i] = cos(t * w_i) for i < half = dim // 2,
  with frequencies w_i = max_period^(-i / (half - 1)) from 1 down to
  1 / max_period. An odd ``dim`` gets one trailing zero.

  Args:
    t: [B] timesteps (integer or float).
    dim: embedding size, at least 2.
    max_period: the longest wavelength.

  Returns:
    [B, dim] float32 embeddings.
  """
  if t.ndim != 1:
    raise ValueError(f"sinusoidal_embedding: t must be [B], got {t.shape}.")
  if dim < 2:
    raise ValueError(f"sinusoidal_embedding: dim must be >= 2, got {dim}.")
  half = dim // 2
  scale = math.log(max_period) / max(half - 1, 1)
  freqs = jnp.exp(-scale * jnp.arange(half, dtype=jnp.float32))  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _check_groups(num_groups: int, channels: int, where: str) -> None:
  if channels % num_groups:
    raise ValueError(
        f"{where}: num_groups={num_groups} must divide the channel count"
        f" {channels}.")


class ResnetBlock(nn.Module):
  """DDPM residual block with an optional conditioning vector.

  h = conv1(swish(GN(x))) + Dense(swish(emb))[:, None, None]
  h = conv2(dropout(swish(GN(h))))            (conv2 starts at zero)
  out = shortcut(x) + h, with a 1x1 (or 3x3) conv shortcut when the
  channel count changes.

  Attributes:
    out_channels: output channels; None keeps the input's.
    dropout: dropout rate applied before the second conv when training.
    num_groups: GroupNorm groups; must divide both channel counts.
    conv_shortcut: use a 3x3 conv (instead of 1x1) on a channel change.
    dtype: computation dtype (parameters stay float32).
  """

  out_channels: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = 32
  conv_shortcut: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Optional[Array] = None, *,
               train: bool = False) -> Array:
    """Args: x [B, H, W, C]; emb [B, E] or None; train enables dropout
    (then needs the "dropout" rng). Returns [B, H, W, out_channels]."""
    in_ch = x.shape[-1]
    out_ch = self.out_channels or in_ch
    _check_groups(self.num_groups, in_ch, "ResnetBlock input")
    _check_groups(self.num_groups, out_ch, "ResnetBlock output")
    conv = lambda n, k, init, name: Conv(  # noqa: E731
        n, (k, k), padding="SAME", kernel_init=init, dtype=self.dtype,
        name=name)
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x)
    h = conv(out_ch, 3, default_init, "conv1")(nn.swish(h))
    if emb is not None:
      proj = nn.Dense(out_ch, kernel_init=default_init, dtype=self.dtype,
                      name="emb_proj")(nn.swish(emb))  # [B, out_ch]
      h = h + proj[:, None, None, :]
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = conv(out_ch, 3, zero_init, "conv2")(h)
    if in_ch != out_ch:
      x = conv(out_ch, 3 if self.conv_shortcut else 1, default_init,
               "shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions with a residual connection.

  out = x + proj(softmax(q k^T / sqrt(d)) v), q, k, v = 1x1 projections of
  GN(x), split into ``num_heads`` heads of d = C / num_heads channels; the
  output projection starts at zero.

  Attributes:
    num_heads: heads; must divide the channel count (DDPM uses 1).
    num_groups: GroupNorm groups.
    dtype: computation dtype (logits and softmax run in float32).
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Args: x [B, H, W, C]. Returns [B, H, W, C]."""
    b, hgt, wid, ch = x.shape
    _check_groups(self.num_groups, ch, "AttentionBlock")
    if ch % self.num_heads:
      raise ValueError(f"AttentionBlock: num_heads={self.num_heads} must"
                       f" divide the channel count {ch}.")
    head_dim = ch // self.num_heads
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, ch)  # [B, N, C]
    dense = lambda name, init=default_init: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), kernel_init=init, dtype=self.dtype,
        dot_general=dot_general, name=name)
    q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)  # [B, N, heads, d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    out = nn.DenseGeneral(ch, axis=(-2, -1), kernel_init=zero_init,
                          dtype=self.dtype, dot_general=dot_general,
                          name="proj_out")(out)  # [B, N, C]
    return x + out.reshape(b, hgt, wid, ch)


class Downsample(nn.Module):
  """Halves H and W: a stride-2 3x3 conv, or 2x2 average pooling.

  Attributes:
    with_conv: use the learned strided conv (DDPM's choice).
    dtype: computation dtype.
  """

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Args: x [B, H, W, C] with even H, W. Returns [B, H/2, W/2, C]."""
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"Downsample: H and W must be even, got {x.shape}.")
    if self.with_conv:
      return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="SAME",
                     kernel_init=default_init, dtype=self.dtype,
                     name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv.

  Attributes:
    with_conv: follow the repetition with a learned conv (DDPM's choice).
    dtype: computation dtype.
  """

  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Args: x [B, H, W, C]. Returns [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = Conv(x.shape[-1], (3, 3), padding="SAME",
                  kernel_init=default_init, dtype=self.dtype, name="conv")(x)
    return x
