"""Multi-scale flow architectures: RealNVP (Dinh et al., 2017) and Glow
(Kingma & Dhariwal, 2018), built from the bijectors in ``bijectors.py``.

Both are a ``MultiScaleFlow``: a list of stages, each optionally squeezing
first, then a chain of steps, then optionally a ``GaussianSplit`` that
factors out half the channels. The whole map x [B, H, W, C] -> z [B, D]
is one bijection onto a standard normal (the split priors are folded in as
whitening transforms), so log p(x) = log N(z; 0, I) + log|det dz/dx|.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.flows import bijectors as bj

Array = jax.Array
Shape = Tuple[int, int, int]


class MultiScaleFlow(nn.Module):
  """Stages of (squeeze?, steps, split?) from an image to a flat latent.

  Forward: for each stage, squeeze if ``squeeze_before[i]``, run
  ``stages[i]``, and if ``splits[i]`` is a bijector apply it and factor out
  the second half of the channels as part of z. The remaining tensor after
  the last stage is the rest of z. z concatenates the factored-out pieces
  (flattened, earliest first) and the final tensor: [B, H * W * C].

  Attributes:
    image_shape: (H, W, C) of the input, to undo the flattening in the
      inverse.
    stages: one bijector per stage (usually a ``bj.Chain``).
    squeeze_before: per stage, whether to squeeze 2x2 first.
    splits: per stage, a ``GaussianSplit`` (learned prior), or None for no
      split.
    split_after: per stage, whether half the channels are factored out
      (with a split bijector or, if ``splits[i]`` is None, a standard normal
      prior on them).
  """

  image_shape: Shape
  stages: Sequence[nn.Module]
  squeeze_before: Sequence[bool]
  splits: Sequence[Optional[nn.Module]]
  split_after: Sequence[bool]

  def latent_shapes(self) -> List[Shape]:
    """The shapes of the pieces of z, in order (factored-out ones, then the
    final tensor)."""
    h, w, c = self.image_shape
    shapes = []
    for squeeze, split in zip(self.squeeze_before, self.split_after, strict=True):
      if squeeze:
        h, w, c = h // 2, w // 2, 4 * c
      if split:
        shapes.append((h, w, c - c // 2))
        c = c // 2
    shapes.append((h, w, c))
    return shapes

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    batch = x.shape[0]
    log_det = jnp.zeros((batch,), jnp.float32)
    pieces = []
    h = x
    for i, stage in enumerate(self.stages):
      if self.squeeze_before[i]:
        h = bj.squeeze2x2(h)
      h, stage_log_det = stage.forward_and_log_det(h)
      log_det = log_det + stage_log_det
      if self.split_after[i]:
        if self.splits[i] is not None:
          h, split_log_det = self.splits[i].forward_and_log_det(h)
          log_det = log_det + split_log_det
        half = h.shape[-1] // 2
        pieces.append(h[..., half:].reshape(batch, -1))
        h = h[..., :half]
    pieces.append(h.reshape(batch, -1))
    return jnp.concatenate(pieces, axis=-1), log_det

  def inverse_and_log_det(self, z: Array) -> Tuple[Array, Array]:
    batch = z.shape[0]
    shapes = self.latent_shapes()
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = [z[:, offsets[i]:offsets[i + 1]].reshape((batch,) + shapes[i])
              for i in range(len(shapes))]
    log_det = jnp.zeros((batch,), jnp.float32)
    h = pieces.pop()
    for i in reversed(range(len(self.stages))):
      if self.split_after[i]:
        h = jnp.concatenate([h, pieces.pop()], axis=-1)
        if self.splits[i] is not None:
          h, split_log_det = self.splits[i].inverse_and_log_det(h)
          log_det = log_det + split_log_det
      h, stage_log_det = self.stages[i].inverse_and_log_det(h)
      log_det = log_det + stage_log_det
      if self.squeeze_before[i]:
        h = bj.unsqueeze2x2(h)
    return h, log_det


def glow_step(index: int, channels_hidden: int, coupling: str, scale_fn: str,
              permutation: str, num_res_blocks: int = 0, num_bins: int = 8,
              spline_bound: float = 3.0) -> bj.Chain:
  """One Glow step: actnorm, invertible 1x1 conv (or a fixed permutation),
  channel-mask coupling. ``index`` seeds the fixed parts."""
  if permutation in bj.CONV_PARAMETERIZATIONS:
    mixer = bj.Invertible1x1Conv(parameterization=permutation, seed=index)
  else:
    mixer = bj.ChannelPermutation(kind=permutation, seed=index)
  return bj.Chain([
      bj.ActNorm(),
      mixer,
      bj.Coupling(kind=coupling, mask="channel", parity=0, scale_fn=scale_fn,
                  hidden_channels=channels_hidden,
                  num_res_blocks=num_res_blocks, num_bins=num_bins,
                  spline_bound=spline_bound),
  ])


def build_glow(image_shape: Shape, num_levels: int, num_steps: int,
               hidden_channels: int, coupling: str = "affine",
               scale_fn: str = "sigmoid", permutation: str = "lu",
               learned_split_prior: bool = True,
               num_res_blocks: int = 0, num_bins: int = 8,
               spline_bound: float = 3.0) -> MultiScaleFlow:
  """Glow: L levels of (squeeze, K x [actnorm, 1x1 conv, coupling], split),
  the last level without the split. Needs H, W divisible by 2^L."""
  stages, splits = [], []
  for level in range(num_levels):
    stages.append(bj.Chain([
        glow_step(level * num_steps + k, hidden_channels, coupling, scale_fn,
                  permutation, num_res_blocks, num_bins, spline_bound)
        for k in range(num_steps)]))
    last = level == num_levels - 1
    splits.append(None if last or not learned_split_prior
                  else bj.GaussianSplit())
  return MultiScaleFlow(
      image_shape=tuple(image_shape), stages=stages,
      squeeze_before=[True] * num_levels, splits=splits,
      split_after=[level < num_levels - 1 for level in range(num_levels)])


def _realnvp_couplings(num: int, mask: str, hidden_channels: int,
                       num_res_blocks: int, coupling: str, scale_fn: str,
                       actnorm: bool, num_bins: int,
                       spline_bound: float) -> bj.Chain:
  """``num`` couplings with alternating parity, each followed by actnorm
  (RealNVP's batch norm, as a data-initialised affine)."""
  layers = []
  for k in range(num):
    layers.append(bj.Coupling(kind=coupling, mask=mask, parity=k % 2,
                              scale_fn=scale_fn,
                              hidden_channels=hidden_channels,
                              num_res_blocks=num_res_blocks,
                              num_bins=num_bins, spline_bound=spline_bound))
    if actnorm:
      layers.append(bj.ActNorm())
  return bj.Chain(layers)


def build_realnvp(image_shape: Shape, num_levels: int, num_steps: int,
                  hidden_channels: int, num_res_blocks: int = 2,
                  coupling: str = "affine", scale_fn: str = "tanh",
                  actnorm: bool = True,
                  learned_split_prior: bool = False, num_bins: int = 8,
                  spline_bound: float = 3.0) -> MultiScaleFlow:
  """RealNVP's multi-scale architecture.

  Each of the first L - 1 scales: ``num_steps`` checkerboard couplings,
  squeeze, ``num_steps`` channel couplings, then factor out half the
  channels. The last scale: ``num_steps + 1`` checkerboard couplings (the
  paper's 3, 3 and 4). Needs H, W divisible by 2^(L - 1).
  """
  stages, squeeze_before, splits, split_after = [], [], [], []
  for _ in range(num_levels - 1):
    stages.append(_realnvp_couplings(num_steps, "checkerboard",
                                     hidden_channels, num_res_blocks,
                                     coupling, scale_fn, actnorm, num_bins,
                                     spline_bound))
    squeeze_before.append(False)
    splits.append(None)
    split_after.append(False)
    stages.append(_realnvp_couplings(num_steps, "channel", hidden_channels,
                                     num_res_blocks, coupling, scale_fn,
                                     actnorm, num_bins, spline_bound))
    squeeze_before.append(True)
    splits.append(bj.GaussianSplit() if learned_split_prior else None)
    split_after.append(True)
  stages.append(_realnvp_couplings(num_steps + 1, "checkerboard",
                                   hidden_channels, num_res_blocks, coupling,
                                   scale_fn, actnorm, num_bins, spline_bound))
  squeeze_before.append(False)
  splits.append(None)
  split_after.append(False)
  return MultiScaleFlow(image_shape=tuple(image_shape), stages=stages,
                        squeeze_before=squeeze_before, splits=splits,
                        split_after=split_after)
