"""Normalizing flows: bijectors, RealNVP and Glow, and the flow family.

Re-exports only: the bijector protocol and layers in ``bijectors``, the
learned Gaussian priors (split and top) in ``priors``, variational
dequantization (Flow++) in ``dequantization``, the multi-scale
architectures in ``architectures``, rational-quadratic splines in
``splines``, and the likelihood, sampler, config schema and ``make`` in
``family``.
"""

from gm_jax.flows import (
  architectures,
  bijectors,
  dequantization,
  priors,
  splines,
)
from gm_jax.flows.architectures import (
  MultiScaleFlow,
  build_glow,
  build_realnvp,
)
from gm_jax.flows.bijectors import (
  ActNorm,
  Bijector,
  Chain,
  ChannelPermutation,
  Coupling,
  Invertible1x1Conv,
  Logit,
  ScalarAffine,
  Squeeze,
  UniformDequantize,
  ZeroConv,
  ZeroDense,
)
from gm_jax.flows.dequantization import (
  ConditionalCoupling,
  VariationalDequantize,
)
from gm_jax.flows.family import (
  ARCHITECTURES,
  FlowConfig,
  build_flow,
  default_model_config,
  flow_log_prob,
  flow_sample,
  make,
  preprocessing,
  reduce_bits,
)
from gm_jax.flows.priors import GaussianSplit, GaussianTopPrior

__all__ = [
    "ARCHITECTURES", "ActNorm", "Bijector", "Chain", "ChannelPermutation",
    "ConditionalCoupling", "Coupling", "FlowConfig", "GaussianSplit", "GaussianTopPrior",
    "Invertible1x1Conv", "Logit", "MultiScaleFlow", "ScalarAffine", "Squeeze",
    "UniformDequantize", "VariationalDequantize", "ZeroConv", "ZeroDense",
    "architectures", "bijectors", "build_flow", "build_glow", "build_realnvp",
    "default_model_config", "dequantization", "flow_log_prob", "flow_sample", "make",
    "preprocessing", "priors", "reduce_bits", "splines",
]
