"""Multi-scale flow architectures: RealNVP (Dinh et al., 2017) and Glow
(Kingma & Dhariwal, 2018), built from the bijectors in ``bijectors.py`` and ``priors.py``.

Both are a ``MultiScaleFlow``: a list of stages, each optionally squeezing
first, then a chain of steps, then optionally a ``GaussianSplit`` that
factors out half the channels, and optionally a ``GaussianTopPrior`` on the
final tensor. The whole map x [B, H, W, C] -> z [B, D] is one bijection
onto a standard normal (the split and top priors are folded in as whitening
transforms), so log p(x) = log N(z; 0, I) + log|det dz/dx|.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.flows import bijectors as bj
from gm_jax.flows import priors

Array = jax.Array
Shape = Tuple[int, int, int]


class MultiScaleFlow(bj.Bijector):
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
    top_prior: a ``GaussianTopPrior`` on the final tensor (learned and/or
      class-conditional), or None for a standard normal. Class labels given
      to either direction go to it.
  """

  image_shape: Shape
  stages: Sequence[nn.Module]
  squeeze_before: Sequence[bool]
  splits: Sequence[Optional[nn.Module]]
  split_after: Sequence[bool]
  top_prior: Optional[nn.Module] = None
  takes_labels = True

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

  def forward_and_log_det(self, x: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
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
    if self.top_prior is not None:
      h, prior_log_det = self.top_prior.forward_and_log_det(h, labels)
      log_det = log_det + prior_log_det
    pieces.append(h.reshape(batch, -1))
    return jnp.concatenate(pieces, axis=-1), log_det

  def inverse_and_log_det(self, z: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    batch = z.shape[0]
    shapes = self.latent_shapes()
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = [z[:, offsets[i]:offsets[i + 1]].reshape((batch,) + shapes[i])
              for i in range(len(shapes))]
    log_det = jnp.zeros((batch,), jnp.float32)
    h = pieces.pop()
    if self.top_prior is not None:
      h, log_det = self.top_prior.inverse_and_log_det(h, labels)
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


def _coupling(mask: str, parity: int, coupling: str, scale_fn: str,
              width: int, num_res_blocks: int, spline_bins: int,
              spline_bound: float, conditioner: str,
              actnorm_data_init: bool) -> bj.Coupling:
  return bj.Coupling(kind=coupling, mask=mask, parity=parity,
                     scale_fn=scale_fn, width=width,
                     num_res_blocks=num_res_blocks, conditioner=conditioner,
                     actnorm_data_init=actnorm_data_init,
                     spline_bins=spline_bins, spline_bound=spline_bound)


def _top_prior(learned_top_prior: bool, num_classes: int,
               classifier: bool) -> Optional[priors.GaussianTopPrior]:
  """The prior of the final tensor, or None for a standard normal."""
  if not (learned_top_prior or num_classes > 0):
    return None
  return priors.GaussianTopPrior(learned=learned_top_prior,
                             num_classes=num_classes, classifier=classifier)


def glow_step(index: int, width: int, coupling: str, scale_fn: str,
              permutation: str, num_res_blocks: int = 0, spline_bins: int = 8,
              spline_bound: float = 3.0, actnorm_data_init: bool = True,
              conditioner: str = "plain") -> bj.Chain:
  """One Glow step: actnorm, invertible 1x1 conv (or a fixed permutation),
  channel-mask coupling. ``index`` seeds the fixed parts."""
  if permutation in bj.CONV_PARAMETERIZATIONS:
    mixer = bj.Invertible1x1Conv(parameterization=permutation, seed=index)
  else:
    mixer = bj.ChannelPermutation(kind=permutation, seed=index)
  return bj.Chain([
      bj.ActNorm(data_init=actnorm_data_init),
      mixer,
      _coupling("channel", 0, coupling, scale_fn, width, num_res_blocks,
                spline_bins, spline_bound, conditioner, actnorm_data_init),
  ])


def build_glow(image_shape: Shape, num_levels: int, steps_per_level: int,
               width: int, coupling: str = "affine",
               scale_fn: str = "sigmoid", permutation: str = "lu",
               learned_split_prior: bool = True,
               num_res_blocks: int = 0, spline_bins: int = 8,
               spline_bound: float = 3.0,
               actnorm_data_init: bool = True, conditioner: str = "plain",
               learned_top_prior: bool = False, num_classes: int = 0,
               classifier: bool = False) -> MultiScaleFlow:
  """Glow: L levels of (squeeze, K x [actnorm, 1x1 conv, coupling], split),
  the last level without the split. Needs H, W divisible by 2^L.

  Args:
    image_shape: (H, W, C) of the input.
    num_levels: L.
    steps_per_level: K.
    width: channels of the coupling conditioners.
    coupling, scale_fn, num_res_blocks, spline_bins, spline_bound: the
      couplings (see ``bijectors.Coupling``).
    permutation: "lu" or "plain" (invertible 1x1 convolutions), "shuffle"
      or "reverse" (fixed permutations).
    learned_split_prior: factor out with a ``GaussianSplit`` (a learned
      conditional prior) rather than under a standard normal.
    actnorm_data_init: initialise every actnorm from the statistics of the
      init batch (Glow), or as the identity.
    conditioner: "plain" or "glow", the couplings' conditioners and the
      split priors' convs (see ``bijectors.ConvNet``).
    learned_top_prior, num_classes, classifier: the prior of the final
      tensor (see ``priors.GaussianTopPrior``); a standard normal when
      neither learned nor class-conditional.
  """
  stages, splits = [], []
  for level in range(num_levels):
    stages.append(bj.Chain([
        glow_step(level * steps_per_level + k, width, coupling, scale_fn,
                  permutation, num_res_blocks, spline_bins, spline_bound,
                  actnorm_data_init, conditioner)
        for k in range(steps_per_level)]))
    last = level == num_levels - 1
    splits.append(None if last or not learned_split_prior
                  else priors.GaussianSplit(conditioner))
  return MultiScaleFlow(
      image_shape=tuple(image_shape), stages=stages,
      squeeze_before=[True] * num_levels, splits=splits,
      split_after=[level < num_levels - 1 for level in range(num_levels)],
      top_prior=_top_prior(learned_top_prior, num_classes, classifier))


def _realnvp_couplings(num: int, mask: str, actnorm: bool,
                       actnorm_data_init: bool, **coupling_args) -> bj.Chain:
  """``num`` couplings with alternating parity, each followed by actnorm
  (RealNVP's batch norm, as a data-initialised affine)."""
  layers = []
  for k in range(num):
    layers.append(_coupling(mask, k % 2, actnorm_data_init=actnorm_data_init,
                            **coupling_args))
    if actnorm:
      layers.append(bj.ActNorm(data_init=actnorm_data_init))
  return bj.Chain(layers)


def build_realnvp(image_shape: Shape, num_levels: int, steps_per_level: int,
                  width: int, num_res_blocks: int = 2,
                  coupling: str = "affine", scale_fn: str = "tanh",
                  actnorm: bool = True,
                  learned_split_prior: bool = False, spline_bins: int = 8,
                  spline_bound: float = 3.0,
                  actnorm_data_init: bool = True, conditioner: str = "plain",
                  learned_top_prior: bool = False, num_classes: int = 0,
                  classifier: bool = False) -> MultiScaleFlow:
  """RealNVP's multi-scale architecture.

  Each of the first L - 1 scales: ``steps_per_level`` checkerboard
  couplings, squeeze, ``steps_per_level`` channel couplings, then factor out
  half the channels. The last scale: ``steps_per_level + 1`` checkerboard
  couplings (the paper's 3, 3 and 4). Needs H, W divisible by 2^(L - 1).
  The arguments are those of ``build_glow`` (but ``permutation``), and
  ``actnorm``: an actnorm after every coupling.
  """
  def couplings(num, mask):
    return _realnvp_couplings(
        num, mask, actnorm, actnorm_data_init, coupling=coupling,
        scale_fn=scale_fn, width=width, num_res_blocks=num_res_blocks,
        spline_bins=spline_bins, spline_bound=spline_bound,
        conditioner=conditioner)

  stages, squeeze_before, splits, split_after = [], [], [], []
  for _ in range(num_levels - 1):
    stages.append(couplings(steps_per_level, "checkerboard"))
    squeeze_before.append(False)
    splits.append(None)
    split_after.append(False)
    stages.append(couplings(steps_per_level, "channel"))
    squeeze_before.append(True)
    splits.append(priors.GaussianSplit(conditioner) if learned_split_prior
                  else None)
    split_after.append(True)
  stages.append(couplings(steps_per_level + 1, "checkerboard"))
  squeeze_before.append(False)
  splits.append(None)
  split_after.append(False)
  return MultiScaleFlow(
      image_shape=tuple(image_shape), stages=stages,
      squeeze_before=squeeze_before, splits=splits, split_after=split_after,
      top_prior=_top_prior(learned_top_prior, num_classes, classifier))
