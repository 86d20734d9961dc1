"""Model-config schemas: the one way a family declares ``config.model``.

Each family declares its model config once, as a frozen dataclass derived
from ``ModelConfig``, whose fields are the keys of ``config.model`` with
typed defaults. Building the dataclass validates it: a field declared with
``choice(default, allowed)`` must take one of the allowed values, and the
family's ``validate()`` checks the rest (``require`` gives the messages one
shape: they name ``config.model.<key>``). Two functions connect the
dataclass to ml_collections:

* ``default_config(VAEConfig, family="vae")`` is the ``ConfigDict`` with
  every key at its default (plus ``family``, the key that ``make_family``
  dispatches on); config files start from it and change a few keys.
* ``parse(VAEConfig, config.model)`` turns a ``config.model`` back into the
  validated dataclass, which the family's ``make`` reads. Unknown keys (a
  misspelt or renamed key) are an error listing the valid ones; lists (what
  a config saved as JSON holds) become tuples.

Example::

  @dataclasses.dataclass(frozen=True)
  class ToyConfig(schema.ModelConfig):
    architecture: str = schema.choice("small", ("small", "large"))
    width: int = 32

    def validate(self):
      schema.require(self.width >= 1, "width", self.width, "must be >= 1")
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

import ml_collections

from gm_jax import losses

C = TypeVar("C", bound="ModelConfig")

# The key that names the family; it selects the schema, so no schema has it.
FAMILY_KEY = "family"


def require(condition: bool, key: str, value: Any, requirement: str) -> None:
  """Raises ValueError("config.model.<key>=<value> <requirement>.") unless
  ``condition`` holds."""
  if not condition:
    raise ValueError(f"config.model.{key}={value!r} {requirement}.")


def require_one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
  """Raises ValueError naming the key unless ``value`` is in ``allowed``."""
  require(value in allowed, key, value, f"is not one of {allowed}")


def choice(default: Any, allowed: tuple[Any, ...]) -> Any:
  """A dataclass field whose value must be one of ``allowed``."""
  return dataclasses.field(default=default,
                           metadata={"choices": tuple(allowed)})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The base of every family's config dataclass.

  Attributes:
    image_shape: (H, W, C) of the data, positive integers.
  """

  image_shape: tuple[int, int, int] = (28, 28, 1)

  def __post_init__(self):
    require(len(self.image_shape) == 3 and all(
        isinstance(d, int) and d >= 1 for d in self.image_shape),
            "image_shape", self.image_shape,
            "must be (H, W, C) with positive integer sizes")
    for field in dataclasses.fields(self):
      if "choices" in field.metadata:
        require_one_of(field.name, getattr(self, field.name),
                       field.metadata["choices"])
    self.validate()

  def validate(self) -> None:
    """Checks the family's own keys; raises ValueError naming the key."""


def _as_tuples(value: Any) -> Any:
  """Lists and tuples, at any depth, as tuples (JSON has no tuples)."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def _check_type(key: str, value: Any, annotation: Any) -> None:
  """Checks the scalar and tuple fields' types; other annotations pass."""
  origin = typing.get_origin(annotation) or annotation
  if origin is bool:
    ok = isinstance(value, bool)
  elif origin is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif origin is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif origin is str:
    ok = isinstance(value, str)
  elif origin is tuple:
    ok = isinstance(value, tuple)
  else:
    ok = True
  if not ok:
    name = getattr(origin, "__name__", str(annotation))
    raise ValueError(f"config.model.{key}={value!r} must be of type {name},"
                     f" not {type(value).__name__}.")


def default_config(cls: type[ModelConfig],
                   family: str) -> ml_collections.ConfigDict:
  """``config.model`` with ``family`` and every field of ``cls`` at its default.

  Args:
    cls: a family's config dataclass (every field has a default).
    family: the family's name in ``gm_jax.families.FAMILIES``.

  Returns:
    An unlocked ConfigDict.
  """
  config = ml_collections.ConfigDict()
  config[FAMILY_KEY] = family
  for key, value in dataclasses.asdict(cls()).items():
    config[key] = value
  return config


def parse(cls: type[C], model_config: Mapping[str, Any]) -> C:
  """Reads ``config.model`` into the validated dataclass ``cls``.

  Keys left out take their defaults; ``family`` is ignored (it chose the
  family already).

  Args:
    cls: a family's config dataclass.
    model_config: ``config.model``, a ConfigDict or any mapping.

  Returns:
    The ``cls`` instance.

  Raises:
    ValueError: unknown keys (listing them and the valid keys), a value of the
      wrong type, or one that the dataclass's validation rejects; every
      message names ``config.model.<key>``.
  """
  if isinstance(model_config, ml_collections.ConfigDict):
    model_config = model_config.to_dict()
  values = {k: _as_tuples(v) for k, v in model_config.items()
            if k != FAMILY_KEY}
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
        f"Unknown config.model key(s) {unknown} for {cls.__name__}; valid"
        f" keys: {sorted(fields | {FAMILY_KEY})}.")
  hints = typing.get_type_hints(cls)
  for key, value in values.items():
    _check_type(key, value, hints[key])
  return cls(**values)


def binarization(default: str) -> Any:
  """The ``binarize`` field of a family with binary and 8-bit likelihoods:
  one of ``losses.BINARIZATIONS`` (see ``losses.binarize_images``)."""
  return choice(default, losses.BINARIZATIONS)


def require_binarization(binarize: str, likelihood: str) -> None:
  """Checks that ``config.model.binarize`` is "none" unless the likelihood is
  "bernoulli" (the others model the 8-bit data)."""
  require(binarize == "none" or likelihood == "bernoulli", "binarize",
          binarize, f"needs likelihood='bernoulli' (the {likelihood!r}"
          " likelihood models 8-bit data: use binarize='none')")
