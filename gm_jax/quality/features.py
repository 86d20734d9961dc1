"""The feature-extractor interface shared by every FID / KID network.

A ``FeatureExtractor`` maps images to feature vectors:

  features(images uint8 [N, H, W, C] or float [N, H, W, C] in [0, 1])
      -> float32 [N, D]

Float images (what ``Family.sample`` returns) are quantised to 8 bits first,
round(255 x), exactly as if they had been saved as PNG files, so data and
samples go through the same preprocessing and the scores match those of
tools that read image files. ``batched_apply`` runs a jitted network over
fixed-size batches (one compilation for any N), and ``source_features``
reads a data split in chunks.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import numpy as np


class FeatureExtractor(NamedTuple):
  """A named image-to-feature map.

  Attributes:
    name: e.g. "mnist_classifier" or "inception_v3_fid"; recorded with every
      score.
    image_shape: (H, W, C) the extractor accepts, or None for any size (the
      Inception network resizes; it takes 1 or 3 channels).
    feature_dim: D.
    features: images uint8 [N, H, W, C] or float [N, H, W, C] in [0, 1]
      -> float32 [N, D] (NumPy, on the host).
    metadata: the extractor's identity (``id``: a string that changes
      whenever its weights do) and facts worth recording (e.g. the
      classifier's test accuracy).
  """

  name: str
  image_shape: Optional[tuple[int, int, int]]
  feature_dim: int
  features: Callable[[Any], np.ndarray]
  metadata: Mapping[str, Any]


def default_cache_dir() -> str:
  """Where feature extractors keep their files:
  $XDG_CACHE_HOME/gm_jax/feature_extractors, or
  ~/.cache/gm_jax/feature_extractors without XDG_CACHE_HOME."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "gm_jax", "feature_extractors")


def to_uint8(images: Any) -> np.ndarray:
  """Images as uint8 [N, H, W, C]: uint8 unchanged, floats in [0, 1] as
  round(255 clip(x, 0, 1)) (what saving them as PNG does).

  Raises:
    ValueError: not 4-D, or non-finite floats.
    TypeError: neither uint8 nor floating point.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(
        f"images must be [N, H, W, C], got shape {images.shape}.")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(
        "images must be uint8 in 0..255 or floating point in [0, 1], got"
        f" dtype {images.dtype}.")
  if not np.all(np.isfinite(images)):
    raise ValueError("images hold non-finite values (NaN or inf).")
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def check_image_shape(images: np.ndarray,
                      image_shape: Optional[tuple[int, int, int]],
                      name: str) -> None:
  """Raises ValueError naming the extractor when the images do not fit."""
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(
        f"The {name} feature extractor takes images of shape {image_shape},"
        f" got {tuple(images.shape[1:])}.")


def batched_apply(apply_fn: Callable[[jax.Array], jax.Array],
                  images: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs ``apply_fn`` (jitted, uint8 [B, ...] -> [B, D]) over ``images`` in
  batches of exactly ``batch_size`` (the last one zero-padded and trimmed),
  so any N compiles once.

  Args:
    apply_fn: a jitted function of one uint8 batch.
    images: uint8 [N, H, W, C].
    batch_size: rows per call.

  Returns:
    float32 [N, D].
  """
  outputs = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size,) + chunk.shape[1:], chunk.dtype)
    padded[:chunk.shape[0]] = chunk
    outputs.append(np.asarray(apply_fn(padded))[:chunk.shape[0]])
  if not outputs:
    raise ValueError("images is empty: no features to compute.")
  return np.concatenate(outputs).astype(np.float32)


def source_features(extractor: FeatureExtractor, source,
                    num_examples: int = -1,
                    chunk_size: int = 1000) -> np.ndarray:
  """Features of the first ``num_examples`` examples of a data split.

  Args:
    extractor: the FeatureExtractor.
    source: a ``gm_jax.data`` ImageSource (``len``, ``get(indices)``).
    num_examples: how many, from the start of the split; -1 for all.
    chunk_size: examples read per ``source.get`` (bounds host memory).

  Returns:
    float32 [N, D].
  """
  total = len(source)
  count = total if num_examples < 0 else min(num_examples, total)
  if count < 1:
    raise ValueError(f"No examples to read: num_examples={num_examples},"
                     f" split size {total}.")
  return np.concatenate([
      extractor.features(source.get(np.arange(s, min(s + chunk_size, count))
                                    )["image"])
      for s in range(0, count, chunk_size)])
