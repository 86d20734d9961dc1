"""The VDM noise-prediction network: a U-Net without resampling.

Every block works at the input's full resolution (Kingma et al., 2021,
Appendix B): the input z_t, with Fourier features of it appended on the
channels, goes through conv_in, ``num_blocks`` ResNet blocks (their outputs
kept as skips), a middle of ResNet block, self-attention and ResNet block,
then ``num_blocks`` + 1 ResNet blocks that each take the matching skip
concatenated on the channels, and GroupNorm, swish and a zero-initialised
conv_out. The output is added to z_t: at t near 1, z_t is nearly pure noise,
so the untrained network already predicts eps well there.

The network is conditioned on gamma(t) rather than t: gamma is mapped
linearly to u in [0, 1] by the configured range (gamma_min, gamma_max), and
the sinusoidal embedding of 1000 u goes through a two-layer MLP (swish
between) of width 4 * width into every ResNet block. The blocks are those of the DDPM
U-Net (``gm_jax.diffusion.layers``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax import trees
from gm_jax.convolutions import Conv
from gm_jax.diffusion import layers

Array = jax.Array


def fourier_features(z: Array, exponents: Sequence[int]) -> Array:
  """sin and cos of 2 pi 2^n z for each exponent n, per channel.

  The period of the feature of exponent n is 2^-n in the units of z; 8-bit
  levels scaled to [-1, 1] are 2/255, about 2^-7, apart, so exponents near 7
  make the network sensitive to the finest detail of the data, which
  matters for likelihood (the paper's Sec. 3.3).

  Args:
    z: [B, H, W, C].
    exponents: the n's (empty: no features).

  Returns:
    [B, H, W, 2 C len(exponents)]: all sines, then all cosines.
  """
  if not exponents:
    return z[..., :0]
  freqs = 2.0 * math.pi * 2.0 ** jnp.asarray(exponents, jnp.float32)  # [F]
  angles = (z[..., None] * freqs).reshape(z.shape[:-1] + (-1,))  # [.., C F]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _ResnetStep(nn.Module):
  """One ResNet block as the body of ``ScoreNet``'s scans: (h, skip, emb)
  -> (out, out), or (out, None) without ``emit``; the block reads h, or
  [h, skip] on the channels. Its parameters sit under "block", stacked over
  the scanned blocks."""

  width: int
  dropout: float
  num_groups: int
  train: bool
  emit: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, skip: Optional[Array], emb: Array
               ) -> tuple[Array, Optional[Array]]:
    if skip is not None:
      h = jnp.concatenate([h, skip], -1)
    out = layers.ResnetBlock(self.width, self.dropout, self.num_groups,
                             dtype=self.dtype, name="block")(
                                 h, emb, train=self.train)
    return out, (out if self.emit else None)


class ScoreNet(nn.Module):
  """Predicts eps from (z_t, gamma_t) at full resolution.

  Attributes:
    width: channels of every block.
    num_blocks: ResNet blocks before the middle (one more after it).
    num_groups: GroupNorm groups; must divide width.
    num_heads: heads of the middle self-attention.
    dropout: dropout rate in the ResNet blocks (training only).
    fourier_exponents: exponents n of ``fourier_features``; () for none.
    gamma_range: (gamma_min, gamma_max) mapped to [0, 1] for the time
      embedding.
    scan_blocks: the num_blocks blocks before the middle as one
      ``nn.scan`` and the num_blocks + 1 after it as another, their
      parameters stacked under "down_blocks" / "up_blocks" (unrolled:
      "down_block{i}", "up_block{i}"). The same function (tested), compiled
      as two blocks instead of 2 num_blocks + 1; ``scanned_params`` and
      ``unrolled_params`` move parameters between the layouts.
    dtype: computation dtype (bfloat16 computes in bfloat16 with float32
      parameters, as the DDPM U-Net's option). The Fourier features are
      computed in float32 before the cast, the attention's softmax stays
      float32 (``layers.AttentionBlock``), and the output is float32.
  """

  width: int = 128
  num_blocks: int = 32
  num_groups: int = 32
  num_heads: int = 1
  dropout: float = 0.1
  fourier_exponents: Sequence[int] = (6, 7)
  gamma_range: tuple[float, float] = (-13.3, 5.0)
  scan_blocks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, gamma_t: Array, *,
               train: bool = False) -> Array:
    """Args: z [B, H, W, C]; gamma_t [B]; train enables dropout (needs the
    "dropout" rng). Returns eps_hat [B, H, W, C] float32."""
    if gamma_t.shape != z.shape[:1]:
      raise ValueError(f"ScoreNet: gamma_t must be [B] = {z.shape[:1]}, got"
                       f" {gamma_t.shape}.")
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, kernel_init=layers.default_init, dtype=self.dtype, name=name)
    resblock = lambda name: layers.ResnetBlock(  # noqa: E731
        self.width, self.dropout, self.num_groups, dtype=self.dtype,
        name=name)

    low, high = self.gamma_range
    u = (gamma_t - low) / (high - low)  # [B], ~[0, 1]
    emb = layers.sinusoidal_embedding(1000.0 * u, self.width)
    emb = nn.swish(dense(4 * self.width, "cond_dense0")(
        emb.astype(self.dtype)))
    # [B, 4 width]; each ResNet block applies swish before its projection.
    emb = dense(4 * self.width, "cond_dense1")(emb)

    h = jnp.concatenate([z, fourier_features(z, self.fourier_exponents)],
                        axis=-1)
    h = Conv(self.width, (3, 3), padding="SAME",
             kernel_init=layers.default_init, dtype=self.dtype,
             name="conv_in")(h.astype(self.dtype))
    if self.scan_blocks:
      def blocks(name, length, emit):
        return nn.scan(
            _ResnetStep, variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast), length=length)(
                self.width, self.dropout, self.num_groups, train, emit,
                self.dtype, name=name)
      entry = h
      h, outputs = blocks("down_blocks", self.num_blocks, True)(h, None, emb)
      skips = jnp.concatenate([entry[None], outputs])  # [num_blocks + 1, ...]
    else:
      skips = [h]
      for i in range(self.num_blocks):
        h = resblock(f"down_block{i}")(h, emb, train=train)
        skips.append(h)
    h = resblock("mid_block1")(h, emb, train=train)
    h = layers.AttentionBlock(self.num_heads, self.num_groups,
                              dtype=self.dtype, name="mid_attn")(h)
    h = resblock("mid_block2")(h, emb, train=train)
    if self.scan_blocks:
      h, _ = blocks("up_blocks", self.num_blocks + 1, False)(
          h, skips[::-1], emb)
    else:
      for i in range(self.num_blocks + 1):
        h = resblock(f"up_block{i}")(jnp.concatenate([h, skips.pop()], -1),
                                     emb, train=train)
    h = nn.swish(nn.GroupNorm(self.num_groups, dtype=self.dtype,
                              name="norm_out")(h))
    h = Conv(z.shape[-1], (3, 3), padding="SAME",
             kernel_init=layers.zero_init, dtype=self.dtype,
             name="conv_out")(h)
    return z + h.astype(jnp.float32)


def scanned_params(params: dict, num_blocks: int) -> dict:
  """A ``ScoreNet``'s parameters, unrolled layout -> ``scan_blocks``.
  Optimizer state maps the same way."""
  out = {k: v for k, v in params.items()
         if not k.startswith(("down_block", "up_block"))}
  for name, count in (("down_block", num_blocks),
                      ("up_block", num_blocks + 1)):
    out[name + "s"] = {"block": trees.stack(
        [params[f"{name}{i}"] for i in range(count)])}
  return out


def unrolled_params(params: dict, num_blocks: int) -> dict:
  """The inverse of ``scanned_params``."""
  out = {k: v for k, v in params.items()
         if k not in ("down_blocks", "up_blocks")}
  for name, count in (("down_block", num_blocks),
                      ("up_block", num_blocks + 1)):
    for i in range(count):
      out[f"{name}{i}"] = trees.index(params[name + "s"]["block"], i)
  return out
