"""The model-config schema every family declares its config.model with."""

import dataclasses
import json

import ml_collections
import pytest

from gm_jax import autoregressive, diffusion, flows, schema, vae, vdm
from gm_jax.families import FAMILIES

# Each family's config dataclass and the factory of its default config.model.
SCHEMAS = {
    "vae": (vae.VAEConfig, vae.default_model_config),
    "pixelcnn": (autoregressive.PixelCNNConfig,
                 autoregressive.default_model_config),
    "flow": (flows.FlowConfig, flows.default_model_config),
    "diffusion": (diffusion.DiffusionConfig, diffusion.default_model_config),
    "vdm": (vdm.VDMConfig, vdm.default_model_config),
}


def test_every_family_has_a_schema():
  assert set(SCHEMAS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(SCHEMAS))
def test_default_config_round_trips(family):
  cls, default_model_config = SCHEMAS[family]
  config = default_model_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.family == family
  assert set(config) == {f.name for f in dataclasses.fields(cls)} | {
      "family"}
  assert schema.parse(cls, config) == cls()
  # A config saved as JSON (lists for tuples) parses to the same dataclass.
  saved = json.loads(config.to_json())
  assert isinstance(saved["image_shape"], list)
  assert schema.parse(cls, saved) == cls()
  # Keys left out take their defaults.
  assert schema.parse(cls, {"family": family}) == cls()


@pytest.mark.parametrize("family", sorted(SCHEMAS))
def test_unknown_keys_are_listed_with_the_valid_ones(family):
  cls, default_model_config = SCHEMAS[family]
  config = default_model_config()
  config.image_shap = (8, 8, 1)
  config.num_stepz = 3
  with pytest.raises(ValueError) as error:
    FAMILIES[family](config)
  message = str(error.value)
  assert "['image_shap', 'num_stepz']" in message
  assert "image_shape" in message.split("valid keys:")[1]
  assert "\n" not in message


def test_values_are_type_checked_and_validated_by_key():
  with pytest.raises(ValueError,
                     match=r"config.model.latent_dim=2.5 must be of type int"):
    schema.parse(vae.VAEConfig, {"latent_dim": 2.5})
  with pytest.raises(ValueError, match="config.model.sample_mean=1 must be"):
    schema.parse(vae.VAEConfig, {"sample_mean": 1})
  with pytest.raises(ValueError, match="config.model.image_shape=.* must be"):
    schema.parse(vae.VAEConfig, {"image_shape": [28, 28]})
  # An int is a valid float; a validation error names the key.
  assert schema.parse(vae.VAEConfig, {"beta": 2}).beta == 2
  with pytest.raises(ValueError, match="config.model.width=0 must be >= 1"):
    schema.parse(flows.FlowConfig, {"width": 0})
  # The dataclass validates when built directly, too.
  with pytest.raises(ValueError, match="config.model.sampler='euler'"):
    diffusion.DiffusionConfig(sampler="euler")
