"""Variational diffusion models (Kingma et al., 2021).

Re-exports only: the bound, schedules, variance gradient and sampler as
pure functions in ``bound``, the noise-prediction network in ``network``,
and the config schema and ``make`` in ``family``.
"""

from gm_jax.vdm import bound, network
from gm_jax.vdm.family import (
  VDM,
  VDMConfig,
  default_model_config,
  make,
)
from gm_jax.vdm.network import (
  ScoreNet,
  fourier_features,
  scanned_params,
  unrolled_params,
)

__all__ = [
    "VDM", "VDMConfig", "ScoreNet", "bound", "default_model_config",
    "fourier_features", "make", "network", "scanned_params",
    "unrolled_params",
]
