"""Gaussian diffusion: schedules, objectives, samplers, the U-Net, a family.

Re-exports only: the noise schedules in ``schedules``, the training
objectives and the variational bound in ``objectives``, the DDPM / DDIM
samplers in ``samplers``, importance sampling of training timesteps in
``timestep_sampling``, the U-Net and its blocks in ``unet`` and
``layers``, and the config schema and ``make`` in ``family``.
"""

from gm_jax.diffusion import (
  layers,
  objectives,
  samplers,
  schedules,
  timestep_sampling,
)
from gm_jax.diffusion.family import (
  DiffusionConfig,
  default_model_config,
  make,
  make_unet,
)
from gm_jax.diffusion.unet import UNet, count_params

__all__ = [
    "DiffusionConfig", "UNet", "count_params", "default_model_config",
    "layers", "make", "make_unet", "objectives", "samplers", "schedules",
    "timestep_sampling",
]
