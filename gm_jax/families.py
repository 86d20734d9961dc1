"""The table of model families: name -> ``make(model_config) -> Family``."""

from __future__ import annotations

from typing import Callable

import ml_collections

from gm_jax import autoregressive, diffusion, flows, vae, vdm
from gm_jax.family import Family

FAMILIES: dict[str, Callable[[ml_collections.ConfigDict], Family]] = {
    "vae": vae.make,
    "flow": flows.make,
    "pixelcnn": autoregressive.make,
    "diffusion": diffusion.make,
    "vdm": vdm.make,
}


def make_family(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the family named by ``model_config.family``."""
  name = model_config.get("family")
  if name not in FAMILIES:
    raise ValueError(
        f"Unknown model family {name!r} (config.model.family); known families:"
        f" {sorted(FAMILIES)}.")
  return FAMILIES[name](model_config)
