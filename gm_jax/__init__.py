"""gm_jax: likelihood-based generative models of images in JAX/Flax.

The pure functions (likelihoods, bounds, bijectors, samplers) work with any
model; the families plug into the shared trainer through ``Family``.
"""

# The family interface and the table of families.
from gm_jax.families import FAMILIES, make_family  # noqa: F401
from gm_jax.family import Family  # noqa: F401

# Shared likelihood math.
from gm_jax.losses import (  # noqa: F401  (re-exports)
  bernoulli_log_prob,
  bits_per_dim,
  categorical_log_prob,
  discretized_gaussian_log_prob,
  discretized_logistic_log_prob,
  discretized_logistic_mixture_log_prob,
  gaussian_log_prob,
  mixture_num_params,
  normal_kl,
  sample_discretized_logistic_mixture,
  scale_to_symmetric,
  standard_normal_kl,
  sum_except_batch,
  uniform_dequantize,
)

# VAE bounds, usable with any encoder / decoder callables.
from gm_jax.vae import elbo, iwae_bound, reparameterize  # noqa: F401

# Normalizing flows: bijectors, architectures and the likelihood / sampler.
from gm_jax.flows import (  # noqa: F401  (re-exports)
  ActNorm,
  Chain,
  ChannelPermutation,
  Coupling,
  GaussianSplit,
  Invertible1x1Conv,
  Logit,
  MultiScaleFlow,
  ScalarAffine,
  Squeeze,
  UniformDequantize,
  build_flow,
  build_glow,
  build_realnvp,
  flow_log_prob,
  flow_sample,
)
