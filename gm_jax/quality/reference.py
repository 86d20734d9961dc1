"""Feature extractors by name, and the reference statistics of a data split.

What scripts need to score samples against a dataset:

  extractor = build_extractor("mnist_classifier", config.data)
  reference = compute_reference(extractor, config.data, "test", path=...)
  # later, for N samples in [0, 1] from a model:
  scores = score_against_reference(extractor.features(samples), reference)

``compute_reference`` reuses the file at ``path`` when it was made by the
same extractor from the same images, so the statistics of a split are
computed once; ``split_reference`` does so at the shared cache path, and
``sample_scores`` scores samples with what every score is recorded with
(the number of samples and the extractor's id).
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from typing import Any, Optional

import numpy as np

from gm_jax import data as data_lib
from gm_jax.quality import classifier, inception
from gm_jax.quality.features import FeatureExtractor, default_cache_dir
from gm_jax.quality.metrics import (
  Reference,
  feature_statistics,
  load_reference,
  save_reference,
  score_against_reference,
)

EXTRACTORS = ("mnist_classifier", "inception")

# Examples read from a source per call.
_READ_CHUNK = 1000


def default_extractor(image_shape: tuple[int, int, int]) -> str:
  """The extractor that suits images of ``image_shape`` (H, W, C): the
  digit classifier for grey images, the FID Inception for colour."""
  return "mnist_classifier" if image_shape[-1] == 1 else "inception"


def build_extractor(name: str, data_config, *, weights: Optional[str] = None,
                    cache_dir: Optional[str] = None, seed: int = 0,
                    settings: Optional[classifier.ClassifierSettings] = None,
                    batch_size: Optional[int] = None,
                    verbose: bool = True) -> FeatureExtractor:
  """A feature extractor by name.

  Args:
    name: "mnist_classifier" (trained on ``data_config``'s train split,
      tested on its eval split, cached) or "inception" (FID Inception-v3,
      weights from a local file).
    data_config: ``config.data``.
    weights: the Inception weights file (see ``gm_jax.quality.inception``);
      None looks in ``cache_dir`` (or the default cache directory).
    cache_dir: where extractor files live; default
      ``features.default_cache_dir()``.
    seed: the classifier's training seed.
    settings: the classifier's ClassifierSettings (default: the defaults).
    batch_size: images per jitted call (default 500 for the classifier, 50
      for Inception).
    verbose: print what the classifier does.

  Returns:
    The FeatureExtractor.

  Raises:
    ValueError: unknown name.
    FileNotFoundError: missing Inception weights (one line naming the file).
  """
  if name == "mnist_classifier":
    train = data_lib.load_source(data_config, data_config.train_split)
    test = data_lib.load_source(data_config, data_config.eval_split)
    return classifier.mnist_classifier(
        train, test, seed=seed,
        settings=settings or classifier.ClassifierSettings(),
        cache_dir=cache_dir, batch_size=batch_size or 500, verbose=verbose)
  if name == "inception":
    if weights is None and cache_dir:
      weights = os.path.join(cache_dir, inception.WEIGHTS_FILE)
    return inception.inception_extractor(weights, batch_size=batch_size or 50)
  raise ValueError(
      f"Unknown feature extractor {name!r}; known extractors: {EXTRACTORS}.")


def _read_split(source, num_examples: int):
  """Yields uint8 image chunks of the first ``num_examples`` (-1: all)."""
  total = len(source)
  count = total if num_examples < 0 else min(num_examples, total)
  if count < 2:
    raise ValueError(
        f"Reference statistics need at least 2 examples; the split has"
        f" {total} and num_examples={num_examples}.")
  for start in range(0, count, _READ_CHUNK):
    yield source.get(np.arange(start, min(start + _READ_CHUNK, count)))["image"]


def split_fingerprint(source, num_examples: int = -1) -> str:
  """sha256 of the first ``num_examples`` images of a split."""
  digest = hashlib.sha256()
  for images in _read_split(source, num_examples):
    digest.update(np.ascontiguousarray(images).tobytes())
  return digest.hexdigest()


def _data_description(data_config, split: str) -> dict[str, Any]:
  description = {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in data_config.to_dict().items()}
  return {**description, "split": split}


def compute_reference(extractor: FeatureExtractor, data_config, split: str,
                      path: Optional[str] = None, num_examples: int = -1,
                      keep_features: bool = True, overwrite: bool = False,
                      verbose: bool = True) -> Reference:
  """The reference statistics of a data split, computed once.

  When ``path`` holds statistics made by the same extractor (metadata
  ``extractor_id``) from the same images (``data_sha256``), they are loaded
  instead of recomputed, unless ``overwrite``.

  Args:
    extractor: the FeatureExtractor.
    data_config: ``config.data``.
    split: the split, e.g. "test".
    path: the .npz to reuse or write; None computes without saving.
    num_examples: the first N examples of the split; -1 for all.
    keep_features: store the features too (KID needs them).
    overwrite: recompute even when ``path`` is up to date.
    verbose: print whether the file was reused or written.

  Returns:
    The Reference (its metadata names the extractor, the data and N).
  """
  source = data_lib.load_source(data_config, split)
  fingerprint = split_fingerprint(source, num_examples)
  extractor_id = extractor.metadata.get("id", extractor.name)
  existing = None
  if path and os.path.exists(path) and not overwrite:
    try:
      existing = load_reference(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      # A cache, not a result: an unreadable file is recomputed.
      print(f"Recomputing unreadable reference statistics {path}: {e}",
            flush=True)
  if existing is not None:
    same = (existing.metadata.get("extractor_id") == extractor_id
            and existing.metadata.get("data_sha256") == fingerprint)
    if same and (existing.features is not None or not keep_features):
      if verbose:
        print(f"Reference statistics {path} are up to date"
              f" ({existing.metadata.get('num_examples')} examples,"
              f" {extractor_id}).", flush=True)
      return existing
  start = time.perf_counter()
  features = np.concatenate([extractor.features(images) for images in
                             _read_split(source, num_examples)])
  metadata = {
      "extractor": extractor.name, "extractor_id": extractor_id,
      "data": _data_description(data_config, split),
      "data_sha256": fingerprint, "feature_seconds":
      time.perf_counter() - start,
      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  if path:
    reference = save_reference(path, features, metadata, keep_features)
    if verbose:
      print(f"Wrote reference statistics {path}: {features.shape[0]} examples"
            f" of split {split!r}, {features.shape[1]}-d features of"
            f" {extractor_id}.", flush=True)
    return reference
  mu, sigma = feature_statistics(features)
  return Reference(mu, sigma, features.astype(np.float32) if keep_features
                   else None, {**metadata, "num_examples": features.shape[0],
                               "feature_dim": features.shape[1]})


def extractor_id(extractor: FeatureExtractor) -> str:
  """The extractor's identity, recorded with every score (it changes
  whenever the weights do)."""
  return extractor.metadata.get("id", extractor.name)


def split_reference(extractor: FeatureExtractor, data_config, split: str,
                    cache_dir: Optional[str] = None,
                    verbose: bool = True) -> Reference:
  """The reference statistics of a whole split, cached under
  ``<cache_dir>/references/`` (default: ``default_cache_dir()``) with a name
  made of the data source, the dataset, the split and the extractor's id,
  so every script and the trainer share one file per (data, extractor)."""
  name = (f"{data_config.source}_{data_config.name or 'default'}_{split}_"
          f"{extractor_id(extractor)}.npz")
  path = os.path.join(cache_dir or default_cache_dir(), "references", name)
  return compute_reference(extractor, data_config, split, path=path,
                           verbose=verbose)


def sample_scores(extractor: FeatureExtractor, samples: Any,
                  reference: Reference, seed: int = 0) -> dict[str, Any]:
  """FID and KID of model samples against reference statistics.

  Args:
    extractor: the FeatureExtractor that made ``reference``.
    samples: [N, H, W, C] floats in [0, 1] (or uint8), N >= 2.
    reference: e.g. from ``split_reference``.
    seed: seed of KID's subset draws.

  Returns:
    {"fid", "kid", "kid_se": floats, "fid_num_samples": N,
    "fid_extractor": the extractor's id}. KID uses subsets of
    min(1000, N, reference size) rows; FID is biased upward for small N, so
    compare scores of equal N and extractor only.
  """
  num = len(samples)
  reference_size = (len(reference.features) if reference.features is not None
                    else num)
  scores = score_against_reference(
      extractor.features(samples), reference,
      kid_subset_size=min(1000, num, reference_size), seed=seed)
  return {"fid": scores["fid"], "kid": scores["kid"],
          "kid_se": scores["kid_se"], "fid_num_samples": num,
          "fid_extractor": extractor_id(extractor)}
