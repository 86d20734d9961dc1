"""Training and evaluation curves of one or more workdirs, as one PNG.

``plot_curves(workdirs, out)`` reads each workdir's metrics.jsonl and draws
one panel per metric, with a line per (run, split): train records as thin
lines, evaluations as markers, so the two overlay wherever the families
report the same quantity under the same name. Used by ``scripts/plot.py``
and the cross-family report.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from gm_jax import metrics as metrics_lib

# Bookkeeping values that are not curves worth a panel.
_SKIPPED = metrics_lib.TIMING_KEYS | {"learning_rate", "kl_weight"}


def _numeric_series(records: list[dict]) -> dict[str, tuple[list, list]]:
  series: dict[str, tuple[list, list]] = {}
  for record in records:
    for name, value in record.items():
      if name in ("step", "split") or name in _SKIPPED:
        continue
      if name.endswith("_stderr") or not isinstance(value, (int, float)):
        continue
      if not math.isfinite(value):
        continue
      steps, values = series.setdefault(name, ([], []))
      steps.append(record["step"])
      values.append(value)
  return series


def plot_curves(workdirs: Sequence[str], out: str,
                metrics: Optional[Sequence[str]] = None,
                labels: Optional[Sequence[str]] = None,
                title: str = "") -> list[str]:
  """Draws the curves of ``workdirs`` into the PNG ``out``.

  Args:
    workdirs: training workdirs (each with a metrics.jsonl).
    out: the PNG to write.
    metrics: the metric names to draw (default: every numeric metric that any
      run records, except timings and bookkeeping).
    labels: a legend label per workdir (default: the folder names).
    title: a figure title.

  Returns:
    The metric names drawn, one panel each.

  Raises:
    FileNotFoundError: a workdir has no metrics.jsonl.
    ValueError: none of the requested metrics is recorded.
  """
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  labels = list(labels or [os.path.basename(os.path.normpath(w))
                           for w in workdirs])
  runs = []
  for workdir in workdirs:
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      raise FileNotFoundError(f"{workdir} has no metrics.jsonl.")
    runs.append({split: _numeric_series(metrics_lib.read_metrics(workdir,
                                                                 split))
                 for split in ("train", "eval")})
  available = sorted({name for run in runs for split in run.values()
                      for name in split})
  names = [m for m in (metrics or available) if m in available]
  if not names:
    raise ValueError(f"None of the metrics {list(metrics or [])} is recorded;"
                     f" available: {available}.")
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows),
                           squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, name in zip(axes.flat, names, strict=False):
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
      color = colors[i % len(colors)]
      if name in run["train"]:
        ax.plot(*run["train"][name], color=color, linewidth=1.0, alpha=0.8,
                label=f"{label} train")
      if name in run["eval"]:
        ax.plot(*run["eval"][name], color=color, marker="o", linestyle="--",
                markersize=4, label=f"{label} eval")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  handles, legend_labels = [], []
  for ax in axes.flat:
    for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
      if text not in legend_labels:
        handles.append(handle)
        legend_labels.append(text)
  fig.legend(handles, legend_labels, loc="lower center",
             ncol=min(4, len(legend_labels)), fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(legend_labels) // 4), 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return names


def plot_grids(grids: Sequence, labels: Sequence[str], out: str,
               title: str = "") -> None:
  """Draws image grids side by side, each under its label, into the PNG
  ``out`` (the cross-family report's one picture of the samples).

  Args:
    grids: images [H, W, C] (C = 1 or 3) with values in [0, 1] or uint8,
      e.g. ``metrics.image_grid`` outputs.
    labels: a title per grid.
    out: the PNG to write.
    title: a figure title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  if len(grids) != len(labels) or not grids:
    raise ValueError(f"{len(grids)} grids and {len(labels)} labels: need one"
                     " label per grid and at least one grid.")
  fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 4.2),
                           squeeze=False)
  for ax, grid, label in zip(axes[0], grids, labels, strict=True):
    grid = np.asarray(grid)
    if grid.ndim == 3 and grid.shape[-1] == 1:
      grid = grid[..., 0]
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None,
              vmin=0, vmax=255 if grid.dtype == np.uint8 else 1,
              interpolation="nearest")
    ax.set_title(label, fontsize=9)
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # "tight": the long titles and the grids' edges are never cut off.
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)
