"""The input pipeline: order, process sharding, augmentation, eval batches."""

import jax
import numpy as np
import pytest

from gm_jax import data, input_pipeline, sharding


def _source(n=40, h=6, w=5, c=2):
  rng = np.random.default_rng(0)
  return data.ArraySource(
      images=rng.integers(0, 256, (n, h, w, c), dtype=np.uint8),
      labels=np.arange(n) % 10)


def test_train_indices_are_deterministic_epoch_permutations():
  a = [input_pipeline.train_indices(10, 3, 0, s) for s in range(6)]
  b = [input_pipeline.train_indices(10, 3, 0, s) for s in range(6)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
  epoch0 = np.concatenate(a[:3])
  assert len(set(epoch0)) == 9  # no repeats within an epoch
  assert not np.array_equal(np.concatenate(a[3:]), epoch0)
  c = input_pipeline.train_indices(10, 3, 1, 0)
  assert not np.array_equal(a[0], c)


def test_augment_flips_and_shifts_are_crops_of_the_reflected_image():
  images = _source().images
  augment = input_pipeline.Augment(flip=True, max_shift=2, seed=3)
  out = augment(images, step=7, rows=np.arange(len(images)))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  flipped = 0
  for i, image in enumerate(out):
    matches = [
        (dy, dx, f) for dy in range(-2, 3) for dx in range(-2, 3)
        for f in (False, True)
        if np.array_equal(
            image, (lambda crop: crop[:, ::-1] if f else crop)(
                padded[i, 2 - dy:8 - dy, 2 - dx:7 - dx]))]
    assert matches, f"row {i} is not a flipped or plain shifted crop"
    flipped += any(f for _, _, f in matches) and not any(
        not f for _, _, f in matches)
  assert 8 <= flipped <= 32  # about half of 40
  assert not np.array_equal(out, images)


def test_augment_is_a_pure_function_of_seed_step_and_row():
  images = _source().images
  rows = np.arange(len(images))
  augment = input_pipeline.Augment(flip=True, max_shift=1, seed=0)
  a = augment(images, 5, rows)
  np.testing.assert_array_equal(a, augment(images, 5, rows))
  assert not np.array_equal(a, augment(images, 6, rows))
  assert not np.array_equal(
      a, input_pipeline.Augment(flip=True, max_shift=1, seed=1)(images, 5,
                                                                 rows))
  # A process holding rows 10..19 augments them exactly as one process.
  np.testing.assert_array_equal(augment(images[10:20], 5, rows[10:20]),
                                a[10:20])
  off = input_pipeline.Augment()
  assert off(images, 5, rows) is images


def test_global_batch_with_augmentation_does_not_depend_on_devices():
  source = _source()
  indices = input_pipeline.train_indices(len(source), 16, 0, 3)
  augment = input_pipeline.Augment(flip=True, max_shift=2, seed=0)
  one = input_pipeline.global_batch(
      source, indices, sharding.make_mesh(jax.devices()[:1]), augment, 3)
  eight = input_pipeline.global_batch(source, indices, sharding.make_mesh(),
                                      augment, 3)
  np.testing.assert_array_equal(np.asarray(one["image"]),
                                np.asarray(eight["image"]))
  np.testing.assert_array_equal(np.asarray(one["label"]),
                                source.labels[indices])


def test_eval_batches_pad_the_last_batch_and_count_valid_rows():
  source = _source(n=20)
  mesh = sharding.make_mesh()
  batches = list(input_pipeline.eval_batches(source, 8, 19, mesh))
  assert [valid for _, valid in batches] == [8, 8, 3]
  last = np.asarray(batches[-1][0]["image"])
  np.testing.assert_array_equal(last[:3], source.images[16:19])
  np.testing.assert_array_equal(last[3:], source.images[[0, 1, 2, 3, 4]])
  with pytest.raises(ValueError, match="No examples to evaluate"):
    list(input_pipeline.eval_batches(source, 8, 0, mesh))


def test_prefetcher_surfaces_errors_and_counts_waiting():
  def items():
    yield 1
    raise RuntimeError("broken source")

  prefetched = input_pipeline.Prefetcher(items())
  assert next(prefetched) == 1
  with pytest.raises(RuntimeError, match="broken source"):
    next(prefetched)
  assert prefetched.wait_seconds >= 0
