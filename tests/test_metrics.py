"""metrics.image_grid: the tiling of [N, H, W, C] and [rows, cols, H, W, C]."""

import numpy as np
import pytest

from gm_jax import metrics


def _distinct_images(n, h=3, w=2, c=1):
  """Constant images whose values 1/(n+1) .. n/(n+1) all differ in uint8."""
  levels = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
  return np.broadcast_to(levels[:, None, None, None], (n, h, w, c)).copy()


def test_five_d_input_keeps_its_rows_and_columns():
  rows, cols, h, w, pad = 2, 3, 3, 2, 1
  images = _distinct_images(rows * cols, h, w).reshape(rows, cols, h, w, 1)
  grid = metrics.image_grid(images, padding=pad)
  assert grid.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, 1)
  for r in range(rows):
    for c in range(cols):
      top, left = pad + r * (h + pad), pad + c * (w + pad)
      block = grid[top:top + h, left:left + w]
      expected = np.round(images[r, c] * 255).astype(np.uint8)
      np.testing.assert_array_equal(block, expected)
  # Padding lines between the blocks are white.
  assert np.all(grid[0] == 255) and np.all(grid[:, 0] == 255)
  assert np.all(grid[h + pad] == 255)


def test_five_d_layout_differs_from_the_square_default():
  # Six images flattened would tile 3 x 2 by default; [1, 6] stays one row.
  images = _distinct_images(6)
  row = metrics.image_grid(images[None])
  assert row.shape == (1 * 4 + 1, 6 * 3 + 1, 1)
  assert metrics.image_grid(images).shape == (2 * 4 + 1, 3 * 3 + 1, 1)
  # The same images in the same order as a flat grid with six columns.
  np.testing.assert_array_equal(row, metrics.image_grid(images, num_cols=6))


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="num_cols"):
    metrics.image_grid(np.zeros((2, 3, 4, 4, 1)), num_cols=2)
  with pytest.raises(ValueError, match="expects"):
    metrics.image_grid(np.zeros((4, 4, 1)))
