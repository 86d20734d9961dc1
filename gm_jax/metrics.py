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
  """Tiles floats in [0, 1] into one uint8 [H', W', C] image.

  ``images`` is either [N, H, W, C], laid out row-major in ``num_cols``
  columns (by default the ceiling of sqrt(N)), or [rows, cols, H, W, C],
  whose layout is kept: image (r, c) lands in grid row r, column c
  (``num_cols`` must then be None or equal cols).
  """
  images = np.asarray(images, dtype=np.float32)
  if images.ndim == 5:
    num_rows, cols = images.shape[:2]
    if num_cols is not None and num_cols != cols:
      raise ValueError(f"num_cols={num_cols} contradicts the {cols} columns "
                       f"of a [rows, cols, H, W, C] input {images.shape}.")
    num_cols = cols
    images = images.reshape((num_rows * cols,) + images.shape[2:])
  elif images.ndim != 4:
    raise ValueError("image_grid expects [N, H, W, C] or [rows, cols, H, W, "
                     f"C], got {images.shape}.")
  n, h, w, c = images.shape
  num_cols = num_cols or max(1, int(math.ceil(math.sqrt(n))))
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


# Wall-clock figures: they differ between an interrupted and an uninterrupted
# run, unlike every other recorded value.
TIMING_KEYS = frozenset({"steps_per_sec", "data_wait_fraction", "eval_seconds",
                         "sample_seconds"})


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def _parse_lines(lines) -> list[dict]:
  """JSON records of metrics.jsonl lines; a torn last line (a kill during a
  write) is skipped."""
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if i != len(lines) - 1:
        raise
  return records


def truncate_records(path: str, last_step: int) -> int:
  """Keeps the records of metrics.jsonl up to ``last_step`` (atomically);
  returns how many were dropped. Used on resume: the steps after the
  restored checkpoint are trained again and write their records again."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  records = _parse_lines(lines)
  kept = [r for r in records if int(r["step"]) <= last_step]
  if len(kept) == len(lines):
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(records) - len(kept)


class MetricWriter:
  """Appends ``{"step", "split", ...}`` lines to metrics.jsonl and scalars
  (and images) to TensorBoard under ``workdir/tensorboard``; string values
  (e.g. the name of a feature extractor) go to metrics.jsonl only.

  Args:
    workdir: the run's folder.
    enabled: False on processes other than 0 (everything is a no-op).
    tensorboard: also write TensorBoard events.
    resume_step: the step a run resumes from: records after it are dropped
      from metrics.jsonl and TensorBoard purges its events after it, so every
      step appears once.
  """

  def __init__(self, workdir: str, enabled: bool = True,
               tensorboard: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.dropped_records = 0
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      self.dropped_records = truncate_records(path, resume_step)
    self._jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional cost
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=purge)

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
        if not isinstance(v, str):  # names (e.g. fid_extractor): JSON only
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
    records = _parse_lines(f.readlines())
  return [r for r in records if split is None or r["split"] == split]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class IntervalMeans:
  """Averages scalar metrics over the steps between two log lines.

  ``state()``/``IntervalMeans(state)`` carry the running sums through a
  checkpoint (Python floats round-trip exactly through JSON), so the first
  log line after a resume averages the same steps as an uninterrupted run.
  """

  def __init__(self, state: Optional[dict] = None):
    state = state or {}
    self._sums: dict[str, float] = dict(state.get("sums", {}))
    self._count = int(state.get("count", 0))

  def state(self) -> dict:
    return {"sums": dict(self._sums), "count": self._count}

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
    """{"steps_per_sec", "eta_sec", "seconds" (since the last report)}."""
    now = time.perf_counter()
    seconds = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    rate = steps / seconds if steps > 0 else float("nan")
    self._last_step, self._last_time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_sec": eta, "seconds": seconds}
