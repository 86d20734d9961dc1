"""Metric and image writers: JSON lines, TensorBoard, PNG grids, progress.

Only process 0 writes; the others get writers that do nothing, so callers
never branch on the process index.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, num_cols: Optional[int] = None,
               padding: int = 1) -> np.ndarray:
  """Tiles [N, H, W, C] floats in [0, 1] into one uint8 [H', W', C] image."""
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4:
    raise ValueError(f"image_grid expects [N, H, W, C], got {images.shape}.")
  n, h, w, c = images.shape
  num_cols = num_cols or int(math.ceil(math.sqrt(n)))
  num_rows = int(math.ceil(n / num_cols))
  grid = np.ones((num_rows * (h + padding) + padding,
                  num_cols * (w + padding) + padding, c), np.float32)
  for i in range(n):
    r, col = divmod(i, num_cols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = images[i]
  return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image (C = 1 or 3) to ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if grid.shape[-1] == 1:
    Image.fromarray(grid[..., 0], mode="L").save(path)
  else:
    Image.fromarray(grid).save(path)


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends ``{"step", "split", ...}`` lines to metrics.jsonl and scalars
  (and images) to TensorBoard under ``workdir/tensorboard``."""

  def __init__(self, workdir: str, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional cost
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, split: str,
                    scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(np.asarray(v)), int(step))

  def write_image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, grid, int(step), dataformats="HWC")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
  """Reads metrics.jsonl back (for tests and notebooks)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r["split"] == split]


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class IntervalMeans:
  """Averages scalar metrics over the steps between two log lines."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._count = 0

  def add(self, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._count += 1

  def means(self) -> dict[str, float]:
    """The means since the last call, then starts a new interval."""
    out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
    self._sums, self._count = {}, 0
    return out


class Progress:
  """Steps per second and ETA over the steps since the last report."""

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_sec": eta}
