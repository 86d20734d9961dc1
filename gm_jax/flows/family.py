"""The normalizing-flow family: RealNVP and Glow trained by exact likelihood.

An image of integer levels x is mapped by one bijection to z ~ N(0, I):
uniform dequantization (x + u), the scale to [0, 1) (or to [-0.5, 0.5)),
optionally RealNVP's logit transform, then the multi-scale flow. With
log-dets summed along the chain, log p(x + u) = log N(z; 0, I) + sum
log|det|, in level units, so -log p(x + u) bounds the NLL of the 8-bit data
(each bin has unit volume) and the scale's -D log 256 is the bits/dim
accounting.

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
from gm_jax.flows import bijectors
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
    learned_split_prior: the factored-out halves get a learned conditional
      prior (Glow) rather than a standard normal.
    preprocess: "logit" (RealNVP, with ``logit_alpha``) or "shift" (Glow:
      x / 256 - 0.5).
    logit_alpha: the logit transform's margin, in [0, 0.5).
    sample_temperature: standard deviation of z for ``sample``.
    visualize_temperatures: temperatures of the grids ``visualize`` returns.
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
  learned_split_prior: bool = True
  preprocess: str = schema.choice("shift", PREPROCESSINGS)
  logit_alpha: float = 0.05
  sample_temperature: float = 0.7
  visualize_temperatures: tuple[float, ...] = (0.0, 0.5, 0.7, 1.0)

  def validate(self):
    for key in ("num_levels", "steps_per_level", "width"):
      value = getattr(self, key)
      schema.require(value >= 1, key, value, "must be >= 1")
    schema.require(self.num_res_blocks >= 0, "num_res_blocks",
                   self.num_res_blocks, "must be >= 0")
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
                  num_bins: int = losses.PIXEL_VALUES) -> list[nn.Module]:
  """The data-side bijectors: dequantize, scale, and logit or shift.

  ``"logit"``: x + u -> (x + u) / num_bins in [0, 1) -> logit(alpha + (1 -
  2 alpha) .). ``"shift"``: x + u -> (x + u) / num_bins - 0.5. Their
  log-dets (-D log num_bins, and the logit's) enter the likelihood exactly.
  """
  if preprocess == "logit":
    return [UniformDequantize(num_bins), ScalarAffine(1.0 / num_bins),
            Logit(logit_alpha)]
  if preprocess == "shift":
    return [UniformDequantize(num_bins), ScalarAffine(1.0 / num_bins, -0.5)]
  raise ValueError(
      f"preprocess={preprocess!r}, expected one of {PREPROCESSINGS}.")


def build_flow(cfg: FlowConfig) -> Chain:
  """The whole bijection from integer images [B, H, W, C] to z [B, D]."""
  common = dict(
      image_shape=cfg.image_shape, num_levels=cfg.num_levels,
      steps_per_level=cfg.steps_per_level, width=cfg.width,
      num_res_blocks=cfg.num_res_blocks, coupling=cfg.coupling,
      scale_fn=cfg.scale_fn, spline_bins=cfg.spline_bins,
      spline_bound=cfg.spline_bound,
      learned_split_prior=cfg.learned_split_prior,
      actnorm_data_init=cfg.actnorm_data_init)
  if cfg.architecture == "glow":
    body = build_glow(permutation=cfg.permutation, **common)
  else:
    body = build_realnvp(actnorm=cfg.actnorm, **common)
  return Chain(preprocessing(cfg.preprocess, cfg.logit_alpha) + [body])


def flow_log_prob(flow: nn.Module, params: Any, x: Array,
                  key: Optional[Array] = None) -> Array:
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

  Returns:
    [B] log-likelihoods in nats.
  """
  rngs = {} if key is None else {"dequantize": key}
  z, log_det = flow.apply({"params": params}, x.astype(jnp.float32),
                          rngs=rngs)
  base = losses.sum_except_batch(
      losses.gaussian_log_prob(z, jnp.zeros_like(z), jnp.zeros_like(z)))
  return base + log_det


def flow_sample(flow: nn.Module, params: Any, key: Array, num: int,
                num_dims: int, temperature: float | Array = 1.0) -> Array:
  """Runs the flow backwards from z ~ N(0, temperature^2 I) [num, D].

  Returns the flow's data-side output: integer levels [num, H, W, C] (as
  float32) for a flow that starts with ``UniformDequantize``.
  """
  z = temperature * jax.random.normal(key, (num, num_dims), jnp.float32)
  x, _ = flow.apply({"params": params}, z, method="inverse_and_log_det")
  return x


def make(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the flow ``Family`` from ``config.model`` (see ``FlowConfig``)."""
  cfg = schema.parse(FlowConfig, model_config)
  flow = build_flow(cfg)
  num_dims = math.prod(cfg.image_shape)
  max_level = losses.PIXEL_VALUES - 1
  temperature = float(cfg.sample_temperature)
  vis_temperatures = cfg.visualize_temperatures

  def init(key, batch):
    params_key, noise_key = jax.random.split(key)
    variables = flow.init({"params": params_key, "dequantize": noise_key},
                          batch["image"].astype(jnp.float32))
    return variables.get("params", {})

  def evaluate(params, batch, key):
    nll = -flow_log_prob(flow, params, batch["image"], key)
    return {"nll_nats": nll, "bpd": losses.bits_per_dim(nll, num_dims)}

  def loss(params, batch, key, step):
    del step
    metrics = evaluate(params, batch, key)
    metrics = {name: jnp.mean(value) for name, value in metrics.items()}
    return metrics["bpd"], metrics

  def to_unit(levels):
    # An extreme z (high temperature, early training) can overflow an
    # inverse coupling; show such pixels black rather than NaN.
    levels = jnp.clip(jnp.nan_to_num(levels, nan=0.0), 0, max_level)
    return levels / float(max_level)

  def sample(params, key, num):
    return to_unit(flow_sample(flow, params, key, num, num_dims, temperature))

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
    x, _ = flow.apply({"params": params}, z, method="inverse_and_log_det")
    x = to_unit(x).reshape((len(vis_temperatures), num) + x.shape[1:])
    return {"temperatures": x}

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize)
