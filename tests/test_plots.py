"""Curves of workdirs: scripts/plot.py and gm_jax.plots."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gm_jax import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(path, scale):
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(1, 9):
      f.write(json.dumps({"step": step, "split": "train", "loss": scale / step,
                          "nll_nats": scale / step, "steps_per_sec": 9.0})
              + "\n")
      if step % 4 == 0:
        f.write(json.dumps({"step": step, "split": "eval",
                            "nll_nats": scale / step + 1,
                            "nll_nats_stderr": 0.1, "bpd": 0.5}) + "\n")
  return str(path)


def test_plot_curves_of_two_runs(tmp_path):
  runs = [_workdir(tmp_path / "a", 10.0), _workdir(tmp_path / "b", 20.0)]
  out = str(tmp_path / "curves.png")
  names = plots.plot_curves(runs, out)
  assert names == ["bpd", "loss", "nll_nats"]  # no timings, no stderr panels
  image = np.asarray(Image.open(out))
  assert image.shape[0] > 200 and image.shape[1] > 600
  assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
  assert plots.plot_curves(runs, out, metrics=["nll_nats"]) == ["nll_nats"]
  with pytest.raises(ValueError, match="available"):
    plots.plot_curves(runs, out, metrics=["fid"])
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    plots.plot_curves([str(tmp_path)], out)


def test_plot_script(tmp_path):
  run = _workdir(tmp_path / "a", 10.0)
  out = str(tmp_path / "c.png")
  proc = subprocess.run([sys.executable, "scripts/plot.py", run,
                         f"--out={out}", "--metrics=loss,nll_nats"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Wrote" in proc.stdout and os.path.exists(out)
