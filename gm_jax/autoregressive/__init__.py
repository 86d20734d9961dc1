"""Autoregressive image models: PixelCNN, Gated PixelCNN and PixelCNN++.

Re-exports only: causal convolutions in ``layers``, the networks in
``networks``, the config schema and ``make`` in ``family``.
"""

from gm_jax.autoregressive.family import (
  ARCHITECTURES,
  LIKELIHOODS,
  PixelCNNConfig,
  build_network,
  default_model_config,
  make,
  rbg_key,
  receptive_rows,
)
from gm_jax.autoregressive.layers import (
  DownRightShiftedConv,
  DownRightShiftedConvTranspose,
  DownShiftedConv,
  DownShiftedConvTranspose,
  MaskedConv,
  causal_mask,
  channel_groups,
  concat_elu,
  down_shift,
  right_shift,
)
from gm_jax.autoregressive.networks import (
  GatedPixelCNN,
  PixelCNN,
  PixelCNNPlusPlus,
  pixelcnnpp_scanned_params,
  pixelcnnpp_unrolled_params,
)

__all__ = [
    "ARCHITECTURES", "LIKELIHOODS", "DownRightShiftedConv",
    "DownRightShiftedConvTranspose", "DownShiftedConv",
    "DownShiftedConvTranspose", "GatedPixelCNN", "MaskedConv", "PixelCNN",
    "PixelCNNConfig", "PixelCNNPlusPlus", "build_network", "causal_mask",
    "channel_groups", "concat_elu", "default_model_config", "down_shift",
    "make", "pixelcnnpp_scanned_params", "pixelcnnpp_unrolled_params",
    "rbg_key", "receptive_rows", "right_shift",
]
