"""The normalizing-flow family: RealNVP and Glow trained by exact likelihood.

An image of integer levels x is mapped by one bijection to z ~ N(0, I):
uniform dequantization (x + u), the scale to [0, 1) (or to [-0.5, 0.5)),
optionally RealNVP's logit transform, then the multi-scale flow. With
log-dets summed along the chain, log p(x + u) = log N(z; 0, I) + sum
log|det|, in level units, so -log p(x + u) bounds the NLL of the 8-bit data
(each bin has unit volume) and the scale's -D log 256 is the bits/dim
accounting. ``make(config.model)`` builds the ``Family``.

Model config keys (``DEFAULTS`` gives the value of any key left out):
  architecture: "realnvp" | "glow".
  num_levels: L (Glow: squeezes; RealNVP: scales). H and W must be
    divisible by 2^L (Glow) or 2^(L - 1) (RealNVP).
  num_steps: K steps per level (Glow); couplings per stage (RealNVP).
  hidden_channels: conditioner width.
  num_res_blocks: conditioner residual blocks (0: Glow's 3-conv net).
  coupling: "affine" | "additive" | "spline" (rational-quadratic, with
    ``num_bins`` bins on [-spline_bound, spline_bound]).
  scale_fn: "sigmoid" | "tanh" (affine couplings).
  permutation (Glow): "lu" | "plain" | "shuffle" | "reverse".
  actnorm (RealNVP): actnorm after each coupling (stands in for batch norm).
  learned_split_prior: the factored-out halves get a learned conditional
    prior (Glow) rather than a standard normal.
  preprocess: "logit" (RealNVP, with ``logit_alpha``) | "shift" (Glow,
    x / 256 - 0.5).
  sample_temperature: standard deviation of z for ``sample``.
  visualize_temperatures: temperatures of the sample grids ``visualize``
    returns.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gm_jax import losses
from gm_jax.family import Family
from gm_jax.flows import architectures, bijectors
from gm_jax.flows.architectures import (
  MultiScaleFlow,
  build_glow,
  build_realnvp,
)
from gm_jax.flows.bijectors import (
  ActNorm,
  Chain,
  ChannelPermutation,
  Coupling,
  GaussianSplit,
  Invertible1x1Conv,
  Logit,
  ScalarAffine,
  Squeeze,
  UniformDequantize,
)

Array = jax.Array

ARCHITECTURES = ("realnvp", "glow")
PREPROCESSINGS = ("logit", "shift")
GLOW_PERMUTATIONS = bijectors.CONV_PARAMETERIZATIONS + bijectors.PERMUTATIONS

DEFAULTS = {
    "architecture": "glow",
    "num_levels": 2,
    "num_steps": 4,
    "hidden_channels": 64,
    "num_res_blocks": 0,
    "coupling": "affine",
    "scale_fn": "sigmoid",
    "num_bins": 8,
    "spline_bound": 3.0,
    "permutation": "lu",
    "actnorm": True,
    "learned_split_prior": True,
    "preprocess": "shift",
    "logit_alpha": 0.05,
    "sample_temperature": 0.7,
    "visualize_temperatures": (0.0, 0.5, 0.7, 1.0),
}

__all__ = [
    "ActNorm", "Chain", "ChannelPermutation", "Coupling", "GaussianSplit",
    "Invertible1x1Conv", "Logit", "MultiScaleFlow", "ScalarAffine", "Squeeze",
    "UniformDequantize", "architectures", "bijectors", "build_flow",
    "build_glow", "build_realnvp", "default_model_config", "flow_log_prob", "flow_sample", "make",
    "preprocessing",
]


def default_model_config() -> ml_collections.ConfigDict:
  """Every key the flow family reads, with the ``DEFAULTS`` values."""
  config = ml_collections.ConfigDict()
  config.family = "flow"
  config.image_shape = (28, 28, 1)
  for key, value in DEFAULTS.items():
    config[key] = value
  return config


def _get(model_config: ml_collections.ConfigDict, key: str) -> Any:
  return model_config.get(key, DEFAULTS[key])


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(f"Invalid flow model config: {message}")


def _validate(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and the allowed values."""
  arch = _get(model_config, "architecture")
  _check(arch in ARCHITECTURES,
         f"model.architecture={arch!r}, expected one of {ARCHITECTURES}.")
  shape = tuple(model_config.image_shape)
  _check(len(shape) == 3, f"model.image_shape={shape} must be (H, W, C).")
  levels = _get(model_config, "num_levels")
  _check(levels >= 1, f"model.num_levels={levels} must be >= 1.")
  for key in ("num_steps", "hidden_channels"):
    _check(_get(model_config, key) >= 1,
           f"model.{key}={_get(model_config, key)} must be >= 1.")
  _check(_get(model_config, "num_res_blocks") >= 0,
         f"model.num_res_blocks={_get(model_config, 'num_res_blocks')} must"
         " be >= 0.")
  squeezes = levels if arch == "glow" else levels - 1
  factor = 2**squeezes
  _check(shape[0] % factor == 0 and shape[1] % factor == 0,
         f"model.image_shape={shape}: {arch} with num_levels={levels}"
         f" squeezes {squeezes} times, so H and W must be divisible by"
         f" {factor}.")
  for key, allowed in (("coupling", bijectors.COUPLING_KINDS),
                       ("scale_fn", bijectors.SCALE_FNS),
                       ("preprocess", PREPROCESSINGS)):
    value = _get(model_config, key)
    _check(value in allowed,
           f"model.{key}={value!r}, expected one of {allowed}.")
  if arch == "glow":
    value = _get(model_config, "permutation")
    _check(value in GLOW_PERMUTATIONS,
           f"model.permutation={value!r}, expected one of"
           f" {GLOW_PERMUTATIONS}.")
  _check(_get(model_config, "num_bins") >= 2,
         f"model.num_bins={_get(model_config, 'num_bins')} must be >= 2.")
  _check(_get(model_config, "spline_bound") > 0,
         f"model.spline_bound={_get(model_config, 'spline_bound')} must be"
         " > 0.")
  alpha = _get(model_config, "logit_alpha")
  _check(0.0 <= alpha < 0.5,
         f"model.logit_alpha={alpha} must be in [0, 0.5).")
  for t in (_get(model_config, "sample_temperature"),
            *_get(model_config, "visualize_temperatures")):
    _check(t >= 0.0, f"model temperatures must be >= 0, got {t}.")


def preprocessing(preprocess: str, logit_alpha: float = 0.05,
                  num_bins: int = 256) -> list[nn.Module]:
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


def build_flow(model_config: ml_collections.ConfigDict) -> Chain:
  """The whole bijection from integer images [B, H, W, C] to z [B, D]."""
  _validate(model_config)
  shape = tuple(model_config.image_shape)
  common = dict(
      image_shape=shape,
      num_levels=_get(model_config, "num_levels"),
      num_steps=_get(model_config, "num_steps"),
      hidden_channels=_get(model_config, "hidden_channels"),
      num_res_blocks=_get(model_config, "num_res_blocks"),
      coupling=_get(model_config, "coupling"),
      scale_fn=_get(model_config, "scale_fn"),
      num_bins=_get(model_config, "num_bins"),
      spline_bound=_get(model_config, "spline_bound"),
      learned_split_prior=_get(model_config, "learned_split_prior"))
  if _get(model_config, "architecture") == "glow":
    body = build_glow(permutation=_get(model_config, "permutation"), **common)
  else:
    body = build_realnvp(actnorm=_get(model_config, "actnorm"), **common)
  return Chain(preprocessing(_get(model_config, "preprocess"),
                             _get(model_config, "logit_alpha")) + [body])


def flow_log_prob(flow: nn.Module, params: Any, images: Array,
                  key: Array) -> Array:
  """log p(x + u) = log N(z; 0, I) + log|det dz/dx| per example, in nats.

  For a ``flow`` that starts with ``UniformDequantize`` this lower-bounds the
  log-probability of the discrete images (level units, unit-volume bins).

  Args:
    flow: a bijector from images to z [B, D] (e.g. ``build_flow``).
    params: its parameters.
    images: [B, H, W, C] integer levels (any dtype).
    key: PRNG key for the dequantization noise (rng stream "dequantize").

  Returns:
    [B] log-likelihoods in nats.
  """
  z, log_det = flow.apply({"params": params}, images.astype(jnp.float32),
                          rngs={"dequantize": key},
                          method="forward_and_log_det")
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
  """Builds the flow ``Family`` from ``config.model`` (see module docstring)."""
  flow = build_flow(model_config)
  shape = tuple(model_config.image_shape)
  num_dims = math.prod(shape)
  num_levels = 256
  temperature = float(_get(model_config, "sample_temperature"))
  vis_temperatures: Sequence[float] = tuple(
      _get(model_config, "visualize_temperatures"))

  def init(key, batch):
    params_key, noise_key = jax.random.split(key)
    variables = flow.init({"params": params_key, "dequantize": noise_key},
                          batch["image"].astype(jnp.float32),
                          method="forward_and_log_det")
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
    levels = jnp.clip(jnp.nan_to_num(levels, nan=0.0), 0, num_levels - 1)
    return levels / (num_levels - 1.0)

  def sample(params, key, num):
    return to_unit(flow_sample(flow, params, key, num, num_dims, temperature))

  def visualize(params, batch, key):
    # One inverse pass over all temperatures (the same z directions scaled),
    # rather than one traced inverse per temperature.
    num = min(batch["image"].shape[0], 16)
    scales = jnp.repeat(jnp.asarray(vis_temperatures, jnp.float32), num)
    z = jax.random.normal(key, (num, num_dims), jnp.float32)
    z = scales[:, None] * jnp.tile(z, (len(vis_temperatures), 1))
    x, _ = flow.apply({"params": params}, z, method="inverse_and_log_det")
    x = to_unit(x)
    return {f"samples_temperature_{t:.2f}": x[i * num:(i + 1) * num]
            for i, t in enumerate(vis_temperatures)}

  return Family(init=init, loss=loss, evaluate=evaluate, sample=sample,
                visualize=visualize)
