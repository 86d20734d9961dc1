"""The normalizing-flow family: RealNVP and Glow trained by exact likelihood.

The 8-bit images are first reduced to ``num_bits`` bits, x in {0, ...,
2^n - 1} (floor(x / 2^(8 - n)); nothing happens at n = 8). An image of
these integer levels is mapped by one bijection to z ~ N(0, I): uniform
dequantization (x + u), the scale to [0, 1) (or to [-0.5, 0.5)), optionally
RealNVP's logit transform, then the multi-scale flow. With log-dets summed
along the chain, log p(x + u) = log N(z; 0, I) + sum log|det|, in level
units, so -log p(x + u) bounds the NLL of the n-bit data (each bin has unit
volume in level units, 1 / 2^n after the scale) and the scale's
-D log 2^n is the bits/dim accounting.

With ``dequantization="variational"`` the uniform u is replaced by a draw
from a learned conditional flow q(u | x) (Flow++; see
``flows.dequantization``) trained jointly, and the reported nll_nats / bpd
are the variational bound -E_q[log p(x + u) - log q(u | x)], also an upper
bound on the NLL of the discrete data; ``evaluate`` reports the same
model's uniform-dequantization figure beside it (uniform_nll_nats,
uniform_bpd).

With ``num_classes`` > 0 the prior of the final latent is class-conditional
and, with ``class_loss_weight`` > 0, Glow's auxiliary classifier on the
top latent adds weight * (its cross-entropy in bits) to the training
objective; that term is reported on its own ("class_bits",
"class_error") and never enters "nll_nats" or "bpd".

``flow_log_prob`` and ``flow_sample`` are the likelihood and the sampler of
any bijector onto N(0, I); ``build_flow`` assembles the bijection that
``FlowConfig`` describes and ``make(config.model)`` the ``Family``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses, schema
from gm_jax.family import Family
from gm_jax.flows import bijectors, dequantization
from gm_jax.flows.architectures import build_glow, build_realnvp
from gm_jax.flows.bijectors import (
  Chain,
  Logit,
  ScalarAffine,
  UniformDequantize,
)

Array = jax.Array

ARCHITECTURES = ("realnvp", "glow")
PREPROCESSINGS = ("logit", "shift")
GLOW_PERMUTATIONS = bijectors.CONV_PARAMETERIZATIONS + bijectors.PERMUTATIONS
DATA_BITS = 8  # the batches' images are uint8


@dataclasses.dataclass(frozen=True)
class FlowConfig(schema.ModelConfig):
  """``config.model`` of the flow family.

  Attributes:
    image_shape: (H, W, C) of the data (see ``schema.ModelConfig``).
    architecture: "realnvp" or "glow".
    num_levels: L, the scales (Glow: squeezes, each followed by a split but
      the last; RealNVP: scales). H and W must be divisible by 2^L (Glow) or
      2^(L - 1) (RealNVP).
    steps_per_level: K, flow steps per level (Glow); couplings per stage
      (RealNVP).
    width: channels of the coupling conditioners.
    num_res_blocks: residual blocks of each conditioner (0: Glow's 3-conv
      net).
    coupling: "affine", "additive" or "spline" (rational-quadratic, with
      ``spline_bins`` bins on [-spline_bound, spline_bound]).
    scale_fn: "sigmoid" or "tanh", the bound on affine couplings' scales.
    spline_bins: bins of the spline couplings.
    spline_bound: the splines act on [-spline_bound, spline_bound].
    permutation: (Glow) "lu" | "plain" (invertible 1x1 convolutions) or
      "shuffle" | "reverse" (fixed permutations).
    actnorm: (RealNVP) an actnorm after each coupling, in place of batch
      norm.
    actnorm_data_init: initialise actnorms from the first batch's statistics
      (Glow's data-dependent init) rather than as the identity.
    conditioner: "plain" (convs with biases, a plain zero-initialised output
      conv) or "glow" (openai/glow: actnorm after each hidden conv, output
      layer ``ZeroConv`` with the learned scale exp(3 * logs)), for the
      couplings' conditioners and the split priors' convs.
    learned_split_prior: the factored-out halves get a learned conditional
      prior (Glow) rather than a standard normal.
    learned_top_prior: the final latent gets a learned prior N(mu, sigma^2)
      (openai/glow's ``learntop``; see ``priors.GaussianTopPrior``),
      exactly N(0, I) at initialisation.
    num_classes: 0 for an unconditional model; else (openai/glow's
      ``ycond``) the top prior's mean and log-scale get a class-dependent
      term from a zero-initialised linear layer of the one-hot label, and
      batches must carry "label" in [0, num_classes). Samples cycle
      through the classes.
    class_loss_weight: Glow's ``weight_y``: > 0 adds a linear classifier on
      the top latent averaged over space and weight * its cross-entropy in
      bits per example to the training objective (needs num_classes >= 2).
    dequantization: "uniform" (u ~ U[0, 1)^D) or "variational" (u ~ q(u | x),
      a conditional flow trained with the model; see
      ``flows.dequantization``).
    dequantization_steps: couplings of q's flow.
    dequantization_width: channels of q's context net and conditioners.
    dequantization_res_blocks: residual blocks of q's conditioners.
    num_bits: n, the bits per subpixel the model sees (1..8): the images
      are reduced to floor(x / 2^(8 - n)) in {0, ..., 2^n - 1}, dequantized
      with bins of width 1 / 2^n after the scale, and the likelihood is of
      the n-bit data (its log-det -D log 2^n).
    preprocess: "logit" (RealNVP, with ``logit_alpha``) or "shift" (Glow:
      x / 256 - 0.5).
    logit_alpha: the logit transform's margin, in [0, 0.5).
    sample_temperature: standard deviation of z for ``sample``.
    visualize_temperatures: temperatures of the grids ``visualize`` returns.
    scan_layers: run repeated layers as one ``flax.linen.scan`` each, with
      their parameters stacked on a leading axis: each Glow level's K steps
      (``architectures.GlowSteps``) and each conditioner's residual blocks.
      The same function, compiled once per level instead of K times, but
      another parameter tree: a checkpoint of the unrolled model does not
      load into the scanned one, nor the other way round. False unrolls.
  """

  architecture: str = schema.choice("glow", ARCHITECTURES)
  num_levels: int = 2
  steps_per_level: int = 4
  width: int = 64
  num_res_blocks: int = 0
  coupling: str = schema.choice("affine", bijectors.COUPLING_KINDS)
  scale_fn: str = schema.choice("sigmoid", bijectors.SCALE_FNS)
  spline_bins: int = 8
  spline_bound: float = 3.0
  permutation: str = schema.choice("lu", GLOW_PERMUTATIONS)
  actnorm: bool = True
  actnorm_data_init: bool = True
  conditioner: str = schema.choice("plain", bijectors.CONDITIONERS)
  learned_split_prior: bool = True
  learned_top_prior: bool = False
  num_classes: int = 0
  class_loss_weight: float = 0.0
  dequantization: str = schema.choice("uniform",
                                      dequantization.DEQUANTIZATIONS)
  dequantization_steps: int = 4
  dequantization_width: int = 32
  dequantization_res_blocks: int = 1
  num_bits: int = DATA_BITS
  preprocess: str = schema.choice("shift", PREPROCESSINGS)
  logit_alpha: float = 0.05
  sample_temperature: float = 0.7
  visualize_temperatures: tuple[float, ...] = (0.0, 0.5, 0.7, 1.0)
  scan_layers: bool = False

  def validate(self):
    for key in ("num_levels", "steps_per_level", "width",
                "dequantization_steps", "dequantization_width"):
      value = getattr(self, key)
      schema.require(value >= 1, key, value, "must be >= 1")
    schema.require(self.num_res_blocks >= 0, "num_res_blocks",
                   self.num_res_blocks, "must be >= 0")
    schema.require(self.dequantization_res_blocks >= 0,
                   "dequantization_res_blocks",
                   self.dequantization_res_blocks, "must be >= 0")
    glow = self.architecture == "glow"
    squeezes = self.num_levels if glow else self.num_levels - 1
    factor = 2**squeezes
    h, w = self.image_shape[:2]
    schema.require(
        h % factor == 0 and w % factor == 0, "image_shape",
        self.image_shape,
        f"must have H and W divisible by {factor}: {self.architecture} with"
        f" num_levels={self.num_levels} squeezes {squeezes} times")
    schema.require(self.spline_bins >= 2, "spline_bins", self.spline_bins,
                   "must be >= 2")
    schema.require(self.spline_bound > 0, "spline_bound", self.spline_bound,
                   "must be > 0")
    schema.require(self.num_classes >= 0, "num_classes", self.num_classes,
                   "must be >= 0")
    schema.require(self.class_loss_weight >= 0.0, "class_loss_weight",
                   self.class_loss_weight, "must be >= 0")
    schema.require(
        self.class_loss_weight == 0.0 or self.num_classes >= 2,
        "class_loss_weight", self.class_loss_weight,
        "needs num_classes >= 2 (the classifier predicts the label)")
    schema.require(1 <= self.num_bits <= DATA_BITS, "num_bits",
                   self.num_bits, f"must be in 1..{DATA_BITS}")
    schema.require(0.0 <= self.logit_alpha < 0.5, "logit_alpha",
                   self.logit_alpha, "must be in [0, 0.5)")
    schema.require(self.sample_temperature >= 0.0, "sample_temperature",
                   self.sample_temperature, "must be >= 0")
    schema.require(all(t >= 0.0 for t in self.visualize_temperatures),
                   "visualize_temperatures", self.visualize_temperatures,
                   "must all be >= 0")


def default_model_config() -> ml_collections.ConfigDict:
  """``config.model`` of the flow family with every key at its default."""
  return schema.default_config(FlowConfig, family="flow")


def preprocessing(preprocess: str, logit_alpha: float = 0.05,
                  num_bins: int = losses.PIXEL_VALUES,
                  dequantizer: Optional[nn.Module] = None
                  ) -> list[nn.Module]:
  """The data-side bijectors: dequantize, scale, and logit or shift.

  ``"logit"``: x + u -> (x + u) / num_bins in [0, 1) -> logit(alpha + (1 -
  2 alpha) .). ``"shift"``: x + u -> (x + u) / num_bins - 0.5. Their
  log-dets (-D log num_bins, and the logit's) enter the likelihood exactly.
  ``dequantizer`` replaces ``UniformDequantize(num_bins)`` (e.g. a
  ``dequantization.VariationalDequantize``).
  """
  first = dequantizer or UniformDequantize(num_bins)
  if preprocess == "logit":
    return [first, ScalarAffine(1.0 / num_bins), Logit(logit_alpha)]
  if preprocess == "shift":
    return [first, ScalarAffine(1.0 / num_bins, -0.5)]
  raise ValueError(
      f"preprocess={preprocess!r}, expected one of {PREPROCESSINGS}.")


def build_flow(cfg: FlowConfig, uniform: bool = False) -> Chain:
  """The whole bijection from integer images [B, H, W, C] of ``num_bits``
  bits to z [B, D]. ``uniform=True`` builds it with uniform
  dequantization whatever ``cfg.dequantization`` says: the same parameter
  names after the dequantizer, so it runs on the variational model's
  parameters (those of q unused)."""
  common = dict(
      image_shape=cfg.image_shape, num_levels=cfg.num_levels,
      steps_per_level=cfg.steps_per_level, width=cfg.width,
      num_res_blocks=cfg.num_res_blocks, coupling=cfg.coupling,
      scale_fn=cfg.scale_fn, spline_bins=cfg.spline_bins,
      spline_bound=cfg.spline_bound,
      learned_split_prior=cfg.learned_split_prior,
      actnorm_data_init=cfg.actnorm_data_init, conditioner=cfg.conditioner,
      learned_top_prior=cfg.learned_top_prior, num_classes=cfg.num_classes,
      classifier=cfg.class_loss_weight > 0, scan=cfg.scan_layers)
  if cfg.architecture == "glow":
    body = build_glow(permutation=cfg.permutation, **common)
  else:
    body = build_realnvp(actnorm=cfg.actnorm, **common)
  dequantizer = None
  if cfg.dequantization == "variational" and not uniform:
    dequantizer = dequantization.VariationalDequantize(
        num_bins=2**cfg.num_bits, num_steps=cfg.dequantization_steps,
        width=cfg.dequantization_width,
        num_res_blocks=cfg.dequantization_res_blocks)
  return Chain(preprocessing(cfg.preprocess, cfg.logit_alpha,
                             2**cfg.num_bits, dequantizer) + [body])


def reduce_bits(images: Array, num_bits: int) -> Array:
  """8-bit images [B, ...] (any dtype) -> float32 levels floor(x / 2^(8 - n))
  in {0, ..., 2^n - 1} (openai/glow's reduction; the identity at n = 8)."""
  if not 1 <= num_bits <= DATA_BITS:
    raise ValueError(f"num_bits={num_bits} must be in 1..{DATA_BITS}.")
  levels = images.astype(jnp.float32)
  if num_bits == DATA_BITS:
    return levels
  return jnp.floor(levels / 2.0**(DATA_BITS - num_bits))


def _label_kwargs(labels: Optional[Array]) -> dict[str, Array]:
  return {} if labels is None else {"labels": labels}


def _standard_normal_log_prob(z: Array) -> Array:
  """log N(z; 0, I) [B] of z [B, ...]."""
  return losses.sum_except_batch(
      losses.gaussian_log_prob(z, jnp.zeros_like(z), jnp.zeros_like(z)))


def flow_log_prob(flow: nn.Module, params: Any, x: Array,
                  key: Optional[Array] = None,
                  labels: Optional[Array] = None) -> Array:
  """log p(x + u) = log N(z; 0, I) + log|det dz/dx| per example, in nats.

  For a ``flow`` that starts with ``UniformDequantize`` this lower-bounds the
  log-probability of the discrete images (level units, unit-volume bins).

  Args:
    flow: a bijector from the data to z [B, D] (e.g. ``build_flow``).
    params: its parameters.
    x: [B, ...] the data, e.g. integer levels [B, H, W, C] (any dtype; cast
      to float32).
    key: PRNG key for the flow's randomness (the rng stream "dequantize");
      needed only by a flow that dequantizes.
    labels: [B] int32 class labels, for a flow that takes them (a
      class-conditional prior); None otherwise.

  Returns:
    [B] log-likelihoods in nats.
  """
  rngs = {} if key is None else {"dequantize": key}
  z, log_det = flow.apply({"params": params}, x.astype(jnp.float32),
                          rngs=rngs, **_label_kwargs(labels))
  return _standard_normal_log_prob(z) + log_det


def flow_sample(flow: nn.Module, params: Any, key: Array, num: int,
                num_dims: int, temperature: float | Array = 1.0,
                labels: Optional[Array] = None) -> Array:
  """Runs the flow backwards from z ~ N(0, temperature^2 I) [num, D].

  ``labels`` [num] int32 are the classes of a flow that takes them.
  Returns the flow's data-side output: integer levels [num, H, W, C] (as
  float32) for a flow that starts with ``UniformDequantize``.
  """
  z = temperature * jax.random.normal(key, (num, num_dims), jnp.float32)
  x, _ = flow.apply({"params": params}, z, method="inverse_and_log_det",
                    **_label_kwargs(labels))
  return x


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the flow ``Family`` from ``config.model`` (see ``FlowConfig``)."""
  cfg = schema.parse(FlowConfig, model_config)
  flow = build_flow(cfg)
  variational = cfg.dequantization == "variational"
  uniform_flow = build_flow(cfg, uniform=True) if variational else None
  num_dims = math.prod(cfg.image_shape)
  max_level = 2**cfg.num_bits - 1
  temperature = float(cfg.sample_temperature)
  vis_temperatures = cfg.visualize_temperatures
  conditional = cfg.num_classes > 0
  classifier = cfg.class_loss_weight > 0

  def labels_of(batch):
    if not conditional:
      return None
    if "label" not in batch:
      raise ValueError(
          f"config.model.num_classes={cfg.num_classes}: the batch needs"
          " 'label' [B] int32.")
    return batch["label"]

  def sample_labels(num):
    # Samples cycle through the classes.
    if not conditional:
      return None
    return jnp.arange(num, dtype=jnp.int32) % cfg.num_classes

  def init(key, batch):
    params_key, noise_key = jax.random.split(key)
    variables = flow.init({"params": params_key, "dequantize": noise_key},
                          reduce_bits(batch["image"], cfg.num_bits),
                          **_label_kwargs(labels_of(batch)))
    return variables.get("params", {})

  def evaluate(params, batch, key, with_uniform=True):
    labels = labels_of(batch)
    levels = reduce_bits(batch["image"], cfg.num_bits)
    (z, log_det), state = flow.apply(
        {"params": params}, levels, rngs={"dequantize": key},
        mutable=["intermediates"], **_label_kwargs(labels))
    nll = -(_standard_normal_log_prob(z) + log_det)
    results = {"nll_nats": nll, "bpd": losses.bits_per_dim(nll, num_dims)}
    if variational and with_uniform:
      # The same flow's bound with uniform noise: what q gains.
      uniform_nll = -flow_log_prob(uniform_flow, params, levels, key, labels)
      results["uniform_nll_nats"] = uniform_nll
      results["uniform_bpd"] = losses.bits_per_dim(uniform_nll, num_dims)
    if classifier:
      # The one GaussianTopPrior sows its logits once per forward pass.
      (logits,), = jax.tree_util.tree_leaves(
          state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))
      log_probs = jax.nn.log_softmax(logits)  # [B, K]
      cross_entropy = -jnp.take_along_axis(log_probs, labels[:, None],
                                           axis=-1)[:, 0]
      results["class_bits"] = cross_entropy / math.log(2.0)
      results["class_error"] = (jnp.argmax(logits, axis=-1) != labels
                                ).astype(jnp.float32)
    return results

  def loss(params, batch, key, step):
    del step
    metrics = evaluate(params, batch, key, with_uniform=False)
    metrics = {name: jnp.mean(value) for name, value in metrics.items()}
    objective = metrics["bpd"]
    if classifier:
      objective = objective + cfg.class_loss_weight * metrics["class_bits"]
    return objective, metrics

  def to_unit(levels):
    # An extreme z (high temperature, early training) can overflow an
    # inverse coupling; show such pixels black rather than NaN.
    levels = jnp.clip(jnp.nan_to_num(levels, nan=0.0), 0, max_level)
    return levels / float(max_level)

  def sample(params, key, num):
    return to_unit(flow_sample(flow, params, key, num, num_dims, temperature,
                               sample_labels(num)))

  def visualize(params, batch, key):
    """"temperatures" [len(visualize_temperatures), n, H, W, C]: row i holds
    n <= 16 samples at temperature visualize_temperatures[i], column j the
    same z direction in every row (a temperature of 0 gives n copies of the
    image of z = 0)."""
    # One inverse pass over all temperatures (the same z directions scaled),
    # rather than one traced inverse per temperature.
    num = min(batch["image"].shape[0], 16)
    scales = jnp.repeat(jnp.asarray(vis_temperatures, jnp.float32), num)
    z = jax.random.normal(key, (num, num_dims), jnp.float32)
    z = scales[:, None] * jnp.tile(z, (len(vis_temperatures), 1))
    labels = sample_labels(num)
    if labels is not None:
      labels = jnp.tile(labels, len(vis_temperatures))
    x, _ = flow.apply({"params": params}, z, method="inverse_and_log_det",
                      **_label_kwargs(labels))
    x = to_unit(x).reshape((len(vis_temperatures), num) + x.shape[1:])
    return {"temperatures": x}

  return Family(init=init, loss=loss,
                evaluate=lambda params, batch, key: evaluate(params, batch,
                                                             key),
                sample=sample, visualize=visualize)
