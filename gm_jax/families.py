"""The table of model families: name -> ``make(model_config) -> Family``."""

from __future__ import annotations

import json
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


# Each family's model config defaults: keys a family gains later take these
# values in older workdirs' configs (a new key's default must keep the former
# behaviour), so those runs still resume and evaluate.
DEFAULT_MODEL_CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "vae": vae.default_model_config,
    "flow": flows.default_model_config,
    "pixelcnn": autoregressive.default_model_config,
    "diffusion": diffusion.default_model_config,
    "vdm": vdm.default_model_config,
}


def with_model_defaults(model: dict) -> dict:
  """A saved config's model section (plain JSON values) with the keys its
  family has gained since it was saved added at their defaults; unchanged
  for an unknown family."""
  defaults = DEFAULT_MODEL_CONFIGS.get(model.get("family"))
  if defaults is None:
    return dict(model)
  return {**json.loads(defaults().to_json_best_effort()), **model}


def make_family(model_config: ml_collections.ConfigDict) -> Family:
  """Builds the family named by ``model_config.family``."""
  name = model_config.get("family")
  if name not in FAMILIES:
    raise ValueError(
        f"Unknown model family {name!r} (config.model.family); known families:"
        f" {sorted(FAMILIES)}.")
  return FAMILIES[name](model_config)
