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
import numpy as np

from gm_jax import trees
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
              actnorm_data_init: bool, scan: bool = False) -> bj.Coupling:
  return bj.Coupling(kind=coupling, mask=mask, parity=parity,
                     scale_fn=scale_fn, width=width,
                     num_res_blocks=num_res_blocks, conditioner=conditioner,
                     actnorm_data_init=actnorm_data_init,
                     spline_bins=spline_bins, spline_bound=spline_bound,
                     scan_res_blocks=scan)


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
              conditioner: str = "plain", constants: Optional[dict] = None,
              scan: bool = False) -> bj.Chain:
  """One Glow step: actnorm, invertible 1x1 conv (or a fixed permutation),
  channel-mask coupling. ``index`` seeds the fixed parts, unless
  ``constants`` (``glow_step_constants``' dict, possibly traced) gives them.
  ``scan``: the coupling's residual blocks as one scan."""
  if permutation in bj.CONV_PARAMETERIZATIONS:
    mixer = bj.Invertible1x1Conv(parameterization=permutation, seed=index,
                                 factors=constants)
  else:
    mixer = bj.ChannelPermutation(
        kind=permutation, seed=index,
        permutation=None if constants is None else constants["perm"])
  return bj.Chain([
      bj.ActNorm(data_init=actnorm_data_init),
      mixer,
      _coupling("channel", 0, coupling, scale_fn, width, num_res_blocks,
                spline_bins, spline_bound, conditioner, actnorm_data_init,
                scan),
  ])


def glow_step_constants(index: int, permutation: str,
                        num_channels: int) -> dict:
  """The fixed arrays that ``index`` seeds in a Glow step (numpy)."""
  if permutation in bj.CONV_PARAMETERIZATIONS:
    factors = bj.Invertible1x1Conv.seeded_factors(permutation, index,
                                                  num_channels)
    if permutation == "lu":
      del factors["rotation"]  # Only its factors are used.
    return factors
  return {"perm": bj.ChannelPermutation.seeded(permutation, index,
                                               num_channels)}


class _GlowStepOf(nn.Module):
  """One Glow step built from its constants, the body of ``GlowSteps``'
  scan: (carry, constants, labels) -> (carry, None), carry = (h, log_det).
  """

  step_args: tuple
  inverse: bool = False

  @nn.compact
  def __call__(self, carry, constants, labels):
    step = glow_step(0, *self.step_args, constants=constants, scan=True)
    h, log_det = carry
    method = step.inverse_and_log_det if self.inverse else (
        step.forward_and_log_det)
    h, step_log_det = bj._run(method, step, h, labels)
    return (h, log_det + step_log_det), None


class GlowSteps(bj.Bijector):
  """A level's K Glow steps as one ``flax.linen.scan``.

  The same function as ``bj.Chain([glow_step(first + k, *step_args) for k
  in range(K)])`` (tested), with every parameter stacked on a leading axis
  of K under "steps" instead of K separate subtrees. XLA compiles one step
  instead of K, and the optimizer updates a few stacked arrays instead of
  K times as many small ones: the two costs that made ``glow_cifar10``'s
  train step take minutes to compile. The seeded constants of each step
  (its 1x1 convolution's permutation and signs, or its channel
  permutation) are scanned alongside. Data-dependent initialisation runs
  step by step, as unrolled.
  """

  step_args: tuple
  first: int
  num_steps: int
  permutation: str
  takes_labels = True

  def _scan(self, x: Array, labels: Optional[Array], inverse: bool
            ) -> Tuple[Array, Array]:
    constants = trees.stack(
        [glow_step_constants(self.first + k, self.permutation, x.shape[-1])
         for k in range(self.num_steps)], np.stack)
    steps = nn.scan(_GlowStepOf, variable_axes={"params": 0},
                    split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                    length=self.num_steps, reverse=inverse)
    carry = (x, jnp.zeros((x.shape[0],), jnp.promote_types(x.dtype,
                                                          jnp.float32)))
    (h, log_det), _ = steps(self.step_args, inverse, name="steps")(
        carry, constants, labels)
    return h, log_det

  @nn.compact
  def forward_and_log_det(self, x: Array, labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    return self._scan(x, labels, inverse=False)

  @nn.compact
  def inverse_and_log_det(self, y: Array, labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    return self._scan(y, labels, inverse=True)


def build_glow(image_shape: Shape, num_levels: int, steps_per_level: int,
               width: int, coupling: str = "affine",
               scale_fn: str = "sigmoid", permutation: str = "lu",
               learned_split_prior: bool = True,
               num_res_blocks: int = 0, spline_bins: int = 8,
               spline_bound: float = 3.0,
               actnorm_data_init: bool = True, conditioner: str = "plain",
               learned_top_prior: bool = False, num_classes: int = 0,
               classifier: bool = False, scan: bool = False
               ) -> MultiScaleFlow:
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
    scan: each level's K steps as one scan with stacked parameters
      (``GlowSteps``), and the conditioners' residual blocks likewise: the
      same function, another parameter tree, compiled in a fraction of the
      time. False (the default) unrolls them.
  """
  stages, splits = [], []
  step_args = (width, coupling, scale_fn, permutation, num_res_blocks,
               spline_bins, spline_bound, actnorm_data_init, conditioner)
  for level in range(num_levels):
    first = level * steps_per_level
    if scan:
      stages.append(GlowSteps(step_args, first, steps_per_level,
                              permutation))
    else:
      stages.append(bj.Chain([glow_step(first + k, *step_args)
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
                       actnorm_data_init: bool, scan: bool = False,
                       **coupling_args) -> bj.Chain:
  """``num`` couplings with alternating parity, each followed by actnorm
  (RealNVP's batch norm, as a data-initialised affine); ``scan``: their
  conditioners' residual blocks as scans."""
  layers = []
  for k in range(num):
    layers.append(_coupling(mask, k % 2, actnorm_data_init=actnorm_data_init,
                            scan=scan, **coupling_args))
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
                  classifier: bool = False, scan: bool = False
                  ) -> MultiScaleFlow:
  """RealNVP's multi-scale architecture.

  Each of the first L - 1 scales: ``steps_per_level`` checkerboard
  couplings, squeeze, ``steps_per_level`` channel couplings, then factor out
  half the channels. The last scale: ``steps_per_level + 1`` checkerboard
  couplings (the paper's 3, 3 and 4). Needs H, W divisible by 2^(L - 1).
  The arguments are those of ``build_glow`` (but ``permutation``), and
  ``actnorm``: an actnorm after every coupling. ``scan`` scans each
  conditioner's residual blocks (the couplings alternate masks, so they
  stay unrolled).
  """
  def couplings(num, mask):
    return _realnvp_couplings(
        num, mask, actnorm, actnorm_data_init, coupling=coupling,
        scale_fn=scale_fn, width=width, num_res_blocks=num_res_blocks,
        spline_bins=spline_bins, spline_bound=spline_bound,
        conditioner=conditioner, scan=scan)

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


def _scanned_conditioner(unrolled: dict, num_res_blocks: int,
                         conditioner: str) -> dict:
  """A ``ConvNet``'s parameters, unrolled layout -> ``scan_res_blocks``."""
  if num_res_blocks == 0:
    return dict(unrolled)  # Nothing is scanned.
  n = num_res_blocks
  out = {k: v for k, v in unrolled.items()
         if not k.startswith(("Conv_", "ActNorm_"))}  # ZeroConv_0 stays.
  names = ["Conv"] if conditioner == "plain" else ["Conv", "ActNorm"]
  for name in names:
    out[f"{name}_0"] = unrolled[f"{name}_0"]
    if f"{name}_{1 + 2 * n}" in unrolled:  # The plain output conv.
      out[f"{name}_1"] = unrolled[f"{name}_{1 + 2 * n}"]
  out["res_blocks"] = {
      f"{name}_{j}": trees.stack([unrolled[f"{name}_{1 + 2 * b + j}"]
                             for b in range(n)])
      for name in names for j in (0, 1)}
  return out


def _scanned_coupling(unrolled: dict, num_res_blocks: int,
                      conditioner: str) -> dict:
  out = dict(unrolled)
  out["conditioner"] = _scanned_conditioner(
      unrolled["conditioner"], num_res_blocks, conditioner)
  return out


def scanned_params(params: dict, architecture: str, num_res_blocks: int,
                   conditioner: str) -> dict:
  """The parameters of a ``MultiScaleFlow`` built with ``scan=False``, laid
  out as the same flow built with ``scan=True`` (the same function: tested
  against each other). Use it to move an unrolled checkpoint's parameters
  to the scanned model (optimizer state is laid out the same way and needs
  the same mapping)."""
  out = {}
  for name, tree in params.items():
    if not name.startswith("stages_"):
      out[name] = tree
      continue
    layers = [tree[f"layers_{k}"] for k in range(len(tree))]
    if architecture == "realnvp":
      out[name] = {
          f"layers_{k}": (_scanned_coupling(layer, num_res_blocks,
                                            conditioner)
                          if "conditioner" in layer else layer)
          for k, layer in enumerate(layers)}
      continue
    step = {"ActNorm_0": trees.stack([s["layers_0"] for s in layers]),
            "Coupling_0": trees.stack([
                _scanned_coupling(s["layers_2"], num_res_blocks, conditioner)
                for s in layers])}
    if "layers_1" in layers[0]:  # An invertible 1x1 conv (not a permutation).
      step["Invertible1x1Conv_0"] = trees.stack(
          [s["layers_1"] for s in layers])
    out[name] = {"steps": step}
  return out
