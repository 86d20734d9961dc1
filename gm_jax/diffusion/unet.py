"""The DDPM U-Net (Ho et al., 2020, Appendix B) in Flax.

conv_in -> for each level (channels width * width_mult[i]): num_res_blocks ResNet
blocks (+ self-attention where the resolution is in attn_resolutions), then
a strided-conv downsample except at the last level -> middle (ResNet,
attention, ResNet) -> the mirror image going up, with num_res_blocks + 1
blocks per level, each taking the matching skip activation concatenated on
the channels, and nearest + conv upsampling -> GroupNorm, swish, conv_out
(zero-initialised). The timestep enters every ResNet block through a
sinusoidal embedding of size width and a two-layer MLP of width 4 width.

With width 128, width_mult (1, 2, 2, 2), 2 blocks and attention at 16x16 on 32x32x3
images this has 35.75M parameters, the paper's 35.7M CIFAR-10 model.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.convolutions import Conv
from gm_jax.diffusion import layers

Array = jax.Array


class UNet(nn.Module):
  """DDPM's noise-prediction U-Net.

  Attributes:
    width: base channel count.
    width_mult: per-level channel multipliers; len(width_mult) - 1
      downsamplings.
    num_res_blocks: ResNet blocks per level on the way down.
    attn_resolutions: spatial sizes (H) at which to add self-attention.
    dropout: dropout rate in the ResNet blocks (training only).
    num_groups: GroupNorm groups (32 in DDPM); must divide every width.
    num_heads: attention heads (1 in DDPM).
    resample_with_conv: learned convs in the down/up-sampling.
    out_channels: output channels; None matches the input.
    num_classes: > 0 adds a learned class embedding (index num_classes is
      the "no label" token used for classifier-free guidance).
    dtype: computation dtype ("bfloat16" compute keeps float32 params).
  """

  width: int = 128
  width_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  num_heads: int = 1
  resample_with_conv: bool = True
  out_channels: Optional[int] = None
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Optional[Array] = None, *,
               train: bool = False) -> Array:
    """Predicts the noise.

    Args:
      x: [B, H, W, C] noisy images.
      t: [B] timesteps (int32 indices, or floats).
      y: [B] int32 labels in 0..num_classes (num_classes = unconditional);
        only used when num_classes > 0, where None means all unconditional.
      train: enables dropout (needs the "dropout" rng).

    Returns:
      [B, H, W, out_channels] float32.
    """
    num_levels = len(self.width_mult)
    factor = 2 ** (num_levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"UNet: image size {x.shape[1:3]} must be divisible by 2^(levels-1)"
          f" = {factor} for width_mult={tuple(self.width_mult)}.")
    resblock = lambda out_ch, name: layers.ResnetBlock(  # noqa: E731
        out_ch, self.dropout, self.num_groups, dtype=self.dtype, name=name)
    attn = lambda name: layers.AttentionBlock(  # noqa: E731
        self.num_heads, self.num_groups, dtype=self.dtype, name=name)
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, kernel_init=layers.default_init, dtype=self.dtype, name=name)

    emb = layers.sinusoidal_embedding(t, self.width)  # [B, width]
    emb = dense(4 * self.width, "temb_dense0")(emb.astype(self.dtype))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full(t.shape, self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, 4 * self.width,
                           dtype=self.dtype, name="label_emb")(y)
    emb = dense(4 * self.width, "temb_dense1")(nn.swish(emb))  # [B, 4 width]

    h = Conv(self.width, (3, 3), padding="SAME",
                kernel_init=layers.default_init, dtype=self.dtype,
                name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.width_mult):
      for block in range(self.num_res_blocks):
        h = resblock(self.width * mult, f"down{level}_block{block}")(
            h, emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"down{level}_attn{block}")(h)
        skips.append(h)
      if level != num_levels - 1:
        h = layers.Downsample(self.resample_with_conv, dtype=self.dtype,
                              name=f"down{level}_downsample")(h)
        skips.append(h)

    h = resblock(None, "mid_block1")(h, emb, train=train)
    h = attn("mid_attn")(h)
    h = resblock(None, "mid_block2")(h, emb, train=train)

    for level in reversed(range(num_levels)):
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resblock(self.width * self.width_mult[level], f"up{level}_block{block}")(
            h, emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"up{level}_attn{block}")(h)
      if level != 0:
        h = layers.Upsample(self.resample_with_conv, dtype=self.dtype,
                            name=f"up{level}_upsample")(h)

    h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype,
                              name="norm_out")(h))
    h = Conv(self.out_channels or x.shape[-1], (3, 3), padding="SAME",
                kernel_init=layers.zero_init, dtype=self.dtype,
                name="conv_out")(h)
    return h.astype(jnp.float32)


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree (works on ShapeDtypeStructs)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
