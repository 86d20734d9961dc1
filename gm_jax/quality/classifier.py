"""A small digit classifier whose penultimate layer gives FID / KID features.

For MNIST-like data the Inception network of FID is a poor fit (ImageNet
features of 28x28 grey digits), so gm_jax trains its own: a two-layer conv
net on the training split of the user's data, with a plain optax loop,
deterministic from a seed (about a minute on 2 CPU cores for the embedded
digits). The trained weights are cached in

  <cache_dir>/mnist_classifier-<key>.npz

where cache_dir defaults to $XDG_CACHE_HOME/gm_jax/feature_extractors
(~/.cache/gm_jax/feature_extractors without XDG_CACHE_HOME) and the key is a
hash of the architecture version, the training settings, the seed and the
training images and labels, so other data or another seed never reuse
weights. A cached file is reloaded bit for bit; its metadata records the
test accuracy and the training time.

Features: the ReLU activations of the hidden dense layer, [N, hidden_size].
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from gm_jax import initializers
from gm_jax.quality.features import (
  FeatureExtractor,
  batched_apply,
  check_image_shape,
  default_cache_dir,
  to_uint8,
)

NAME = "mnist_classifier"
# Bump whenever the network, its preprocessing or the training loop change:
# it is part of the cache key, so old weights are never reused by new code.
ARCHITECTURE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """How the classifier is built and trained (all part of the cache key).

  Attributes:
    num_steps: Adam steps.
    batch_size: examples per step.
    learning_rate: peak Adam learning rate (cosine decay to 0).
    conv_features: channels of the 3x3 conv layers (each followed by ReLU
      and 2x2 average pooling).
    hidden_size: width of the penultimate dense layer = the feature size D.
    max_shift: random translations of up to this many pixels (zero fill) as
      augmentation; 0 disables.
  """

  num_steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 2e-3
  conv_features: tuple[int, ...] = (16, 32)
  hidden_size: int = 128
  max_shift: int = 2


class DigitClassifier(nn.Module):
  """Conv -> ReLU -> 2x2 mean (x len(conv_features)) -> dense -> ReLU -> dense.

  Stride-1 convolutions followed by a 2x2 mean taken with a reshape: on
  XLA:CPU the backward pass of strided convolutions and of ``avg_pool``
  (a reduce-window) costs several times more than this one.
  """

  num_classes: int
  conv_features: Sequence[int] = (16, 32)
  hidden_size: int = 128

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classifies uint8 images.

    Args:
      images: uint8 [B, H, W, C] in 0..255.

    Returns:
      logits: float32 [B, num_classes].
      features: float32 [B, hidden_size], the penultimate activations.
    """
    x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0  # [B, H, W, C]
    # Uniform kernels (fan-avg, scale 2 for ReLU) drawn flat by the shared
    # helper: the default truncated-normal draws of 4-D kernels compile
    # several times slower on XLA:CPU.
    kernel_init = initializers.fan_avg_uniform(2.0)
    for features in self.conv_features:
      x = nn.relu(nn.Conv(features, (3, 3), kernel_init=kernel_init)(x))
      b, h, w, c = x.shape
      x = x[:, :h - h % 2, :w - w % 2]  # odd sizes drop the last row / column
      x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))  # [B, H/2, W/2, c]
    x = x.reshape(x.shape[0], -1)
    hidden = nn.relu(nn.Dense(self.hidden_size,
                              kernel_init=kernel_init)(x))  # [B, hidden_size]
    return nn.Dense(self.num_classes, kernel_init=kernel_init)(hidden), hidden


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """sha256 of the images' and labels' shapes, dtypes and bytes."""
  digest = hashlib.sha256()
  for array in (np.ascontiguousarray(images),
                np.ascontiguousarray(labels, dtype=np.int64)):
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def cache_key(train_fingerprint: str, num_classes: int,
              settings: ClassifierSettings, seed: int) -> str:
  """The cache key: everything that determines the trained weights."""
  identity = {"name": NAME, "architecture_version": ARCHITECTURE_VERSION,
              "settings": dataclasses.asdict(settings), "seed": int(seed),
              "num_classes": int(num_classes), "train_data": train_fingerprint}
  text = json.dumps(identity, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  batch = source.get(np.arange(len(source)))
  return to_uint8(batch["image"]), np.asarray(batch["label"], np.int32)


def _shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by a random (dy, dx) in [-max_shift, max_shift]^2,
  filling with zeros."""
  if max_shift == 0:
    return images
  _, h, w, c = images.shape
  s = max_shift
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * s + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     settings: ClassifierSettings, seed: int) -> dict:
  """Trains a DigitClassifier with Adam on cross-entropy; deterministic.

  The batch order is a fresh permutation per epoch from
  ``numpy.random.default_rng(seed)``; initialisation and augmentation draw
  from ``jax.random.PRNGKey(seed)`` (augmentation folds in the step).

  Args:
    images: uint8 [N, H, W, C].
    labels: int32 [N] in [0, num_classes).
    num_classes: number of classes.
    settings: the ClassifierSettings.
    seed: the seed.

  Returns:
    The trained Flax params.
  """
  model = DigitClassifier(num_classes, tuple(settings.conv_features),
                          settings.hidden_size)
  init_key, shift_key = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(model.init)(init_key, images[:1])["params"]
  tx = optax.adam(optax.cosine_decay_schedule(settings.learning_rate,
                                              settings.num_steps))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch_images, batch_labels, step):
    batch_images = _shift(batch_images, jax.random.fold_in(shift_key, step),
                          settings.max_shift)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, batch_images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch_labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  batch_size = min(settings.batch_size, images.shape[0])
  order = np.empty(0, np.int64)
  for step in range(settings.num_steps):
    if order.size < batch_size:
      order = np.concatenate([order, rng.permutation(images.shape[0])])
    rows, order = order[:batch_size], order[batch_size:]
    params, opt_state = train_step(params, opt_state, images[rows],
                                   labels[rows], step)
  return jax.device_get(params)


@functools.cache
def _jitted_apply(num_classes: int, conv_features: tuple[int, ...],
                  hidden_size: int) -> Callable:
  """One jitted (params, images) -> (logits, features) per architecture, so
  extractors of one architecture share compilations."""
  model = DigitClassifier(num_classes, conv_features, hidden_size)
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


def _apply_fns(model: DigitClassifier, params) -> tuple[Callable, Callable]:
  """(logits_fn, features_fn) of uint8 images; params are passed to the
  jitted function rather than baked into it as constants."""
  apply = _jitted_apply(model.num_classes, tuple(model.conv_features),
                        model.hidden_size)
  params = jax.device_put(params)
  return (lambda x: apply(params, x)[0]), (lambda x: apply(params, x)[1])


def accuracy(logits_fn: Callable, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> float:
  """Fraction of ``images`` whose arg-max logit is the label."""
  logits = batched_apply(logits_fn, images, batch_size)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _save(path: str, params, metadata: dict) -> None:
  """Writes params and metadata to ``path`` atomically (temp + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep="/")
  temporary = path + ".tmp.npz"
  np.savez(temporary, **{f"params/{k}": np.asarray(v) for k, v in flat.items()},
           metadata=np.asarray(json.dumps(metadata, sort_keys=True)))
  os.replace(temporary, path)


def _load(path: str, expected_shapes) -> Optional[tuple[dict, dict]]:
  """Params and metadata from ``path``, or None when the file is unreadable
  or does not hold exactly the expected parameter shapes (a cache miss)."""
  try:
    with np.load(path, allow_pickle=False) as contents:
      flat = {k[len("params/"):]: contents[k] for k in contents.files
              if k.startswith("params/")}
      metadata = json.loads(str(contents["metadata"]))
  except (OSError, ValueError, KeyError) as e:
    print(f"Ignoring unreadable cached classifier {path}: {e}", flush=True)
    return None
  expected = {k: tuple(v.shape) for k, v in
              traverse_util.flatten_dict(expected_shapes, sep="/").items()}
  if {k: tuple(v.shape) for k, v in flat.items()} != expected:
    print(f"Ignoring cached classifier {path}: its parameters do not match"
          " this architecture.", flush=True)
    return None
  return traverse_util.unflatten_dict(flat, sep="/"), metadata


def _shown(value: Optional[float]) -> str:
  return "n/a (no test split)" if value is None else f"{value:.4f}"


def mnist_classifier(train_source, test_source=None, *, seed: int = 0,
                     settings: ClassifierSettings = ClassifierSettings(),
                     cache_dir: Optional[str] = None, batch_size: int = 500,
                     verbose: bool = True) -> FeatureExtractor:
  """The classifier feature extractor for a labelled training split.

  Loads the weights cached for (architecture, settings, seed, training data)
  or trains and caches them; prints the test accuracy either way.

  Args:
    train_source: a ``gm_jax.data`` ImageSource with at least two classes
      (e.g. ``data.load_source(config.data, "train")``).
    test_source: optional held-out split; its accuracy is printed and
      recorded (in the cache's metadata when training).
    seed: the training seed.
    settings: ClassifierSettings.
    cache_dir: where the weights live; default ``default_cache_dir()``.
    batch_size: images per jitted call when computing features.
    verbose: print what happened (trained / loaded, accuracy, time).

  Returns:
    A FeatureExtractor with features float32 [N, settings.hidden_size] and
    metadata {"id", "cache_path", "test_accuracy", "train_seconds", ...}.
  """
  images, labels = _read_split(train_source)
  num_classes = int(labels.max()) + 1 if labels.size else 0
  if len(np.unique(labels)) < 2:
    raise ValueError(
        "The mnist_classifier feature extractor trains a classifier and needs"
        " a labelled training split with at least 2 classes; this one has"
        f" labels {np.unique(labels).tolist()}. Use another extractor.")
  fingerprint = data_fingerprint(images, labels)
  key = cache_key(fingerprint, num_classes, settings, seed)
  path = os.path.join(cache_dir or default_cache_dir(), f"{NAME}-{key}.npz")
  model = DigitClassifier(num_classes, tuple(settings.conv_features),
                          settings.hidden_size)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          images[:1])["params"]

  test = _read_split(test_source) if test_source is not None else None
  test_fingerprint = data_fingerprint(*test) if test is not None else None
  loaded = _load(path, shapes) if os.path.exists(path) else None
  if loaded is not None:
    params, metadata = loaded
    logits_fn, features_fn = _apply_fns(model, params)
    if test is not None and test_fingerprint != metadata.get("test_data"):
      # A test split other than the one recorded at training time.
      metadata = {**metadata, "test_data": test_fingerprint,
                  "num_test": int(test[0].shape[0]),
                  "test_accuracy": accuracy(logits_fn, *test, batch_size)}
    if verbose:
      print(f"Loaded the {NAME} feature extractor from {path} (test accuracy"
            f" {_shown(metadata.get('test_accuracy'))}).", flush=True)
  else:
    if verbose:
      print(f"Training the {NAME} feature extractor ({settings.num_steps}"
            f" steps on {images.shape[0]} images, seed {seed})...",
            flush=True)
    start = time.perf_counter()
    params = train_classifier(images, labels, num_classes, settings, seed)
    train_seconds = time.perf_counter() - start
    logits_fn, features_fn = _apply_fns(model, params)
    metadata = {
        "id": f"{NAME}-{key}", "name": NAME,
        "architecture_version": ARCHITECTURE_VERSION,
        "settings": dataclasses.asdict(settings), "seed": int(seed),
        "num_classes": num_classes, "num_train": int(images.shape[0]),
        "train_data": fingerprint, "train_seconds": train_seconds,
        "train_accuracy": accuracy(logits_fn, images, labels, batch_size),
        "test_data": test_fingerprint,
        "num_test": None if test is None else int(test[0].shape[0]),
        "test_accuracy": (None if test is None
                          else accuracy(logits_fn, *test, batch_size)),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _save(path, params, metadata)
    if verbose:
      print(f"Trained the {NAME} feature extractor in {train_seconds:.1f} s:"
            f" test accuracy {_shown(metadata['test_accuracy'])}, train accuracy"
            f" {metadata['train_accuracy']:.4f}; cached at {path}.",
            flush=True)

  image_shape = tuple(int(d) for d in images.shape[1:])

  def features(batch: Any) -> np.ndarray:
    batch = to_uint8(batch)
    check_image_shape(batch, image_shape, NAME)
    return batched_apply(features_fn, batch, batch_size)

  return FeatureExtractor(NAME, image_shape, settings.hidden_size, features,
                          {**metadata, "cache_path": path})
