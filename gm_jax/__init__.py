"""gm_jax: likelihood-based generative models of images in JAX/Flax.

The pure functions (likelihoods, bounds, bijectors, samplers) work with any
model; the families plug into the shared trainer through ``Family``.
"""

# Autoregressive models: causal convolutions and the three networks.
from gm_jax.autoregressive import (  # noqa: F401  (re-exports)
  DownRightShiftedConv,
  DownRightShiftedConvTranspose,
  DownShiftedConv,
  DownShiftedConvTranspose,
  GatedPixelCNN,
  MaskedConv,
  PixelCNN,
  PixelCNNConfig,
  PixelCNNPlusPlus,
  causal_mask,
  concat_elu,
  down_shift,
  right_shift,
)

# Diffusion: schedules, objectives and samplers, usable with any eps_fn.
from gm_jax.diffusion import DiffusionConfig, UNet  # noqa: F401
from gm_jax.diffusion.objectives import (  # noqa: F401  (re-exports)
  eps_fn_from_model,
  simple_loss,
  variational_bound,
)
from gm_jax.diffusion.ode import (  # noqa: F401  (re-exports)
  dequantized_nll,
  ode_log_likelihood,
)
from gm_jax.diffusion.samplers import (  # noqa: F401  (re-exports)
  ddim_sample,
  ddpm_sample,
  sampling_timesteps,
)
from gm_jax.diffusion.schedules import (  # noqa: F401  (re-exports)
  cosine_betas,
  linear_betas,
  noise_schedule,
  q_posterior,
  q_sample,
  schedule_from_betas,
)
from gm_jax.diffusion.timestep_sampling import (  # noqa: F401  (re-exports)
  init_loss_history,
  sample_timesteps,
  timestep_probabilities,
  update_loss_history,
)

# The family interface and the table of families.
from gm_jax.families import FAMILIES, make_family  # noqa: F401
from gm_jax.family import Family, LossState  # noqa: F401

# Normalizing flows: bijectors, architectures and the likelihood / sampler.
from gm_jax.flows import (  # noqa: F401  (re-exports)
  ActNorm,
  Bijector,
  Chain,
  ChannelPermutation,
  Coupling,
  FlowConfig,
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

# Shared likelihood math.
from gm_jax.losses import (  # noqa: F401  (re-exports)
  PIXEL_VALUES,
  bernoulli_log_prob,
  binarize_images,
  bits_per_dim,
  categorical_log_prob,
  discretized_gaussian_log_prob,
  discretized_logistic_log_prob,
  discretized_logistic_mixture_log_prob,
  gaussian_kl,
  gaussian_log_prob,
  mixture_num_components,
  mixture_num_params,
  normal_kl,
  sample_discretized_logistic_mixture,
  scale_to_symmetric,
  standard_normal_kl,
  sum_except_batch,
  uniform_dequantize,
)

# Sample quality: FID / KID over features, and the feature extractors.
from gm_jax.quality import (  # noqa: F401  (re-exports)
  FeatureExtractor,
  FIDInceptionV3,
  Reference,
  build_extractor,
  compute_reference,
  feature_statistics,
  fid,
  frechet_distance,
  inception_extractor,
  kid,
  load_reference,
  mnist_classifier,
  save_reference,
  score_against_reference,
)

# VAE bounds, usable with any encoder / decoder callables.
from gm_jax.vae import (  # noqa: F401  (re-exports)
  LatentModel,
  VAEConfig,
  elbo,
  gaussian_latent_model,
  importance_weighted_bound,
  iwae_bound,
  multi_sample_elbo,
  reparameterize,
)

# Variational diffusion models: the bound, schedules, variance gradient and
# sampler, usable with any eps_fn(z_t, gamma_t).
from gm_jax.vdm import ScoreNet, VDMConfig  # noqa: F401
from gm_jax.vdm.bound import (  # noqa: F401  (re-exports)
  ancestral_sample,
  fixed_linear_gamma,
  learned_gamma,
  monotone_shape,
  variance_gradient,
)
from gm_jax.vdm.bound import (  # noqa: F401  (re-exports)
  variational_bound as vdm_variational_bound,
)
