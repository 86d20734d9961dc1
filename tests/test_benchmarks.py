"""The benchmark scripts run and print what they promise (tiny configs on
CPU; the figures themselves are recorded in benchmarks/README.md)."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import script_env

REPO = pathlib.Path(__file__).resolve().parent.parent


def _json_lines(stdout):
  return [json.loads(line) for line in stdout.splitlines()
          if line.startswith("{")]


def _gpu_check(*args, timeout=600):
  proc = subprocess.run(
      [sys.executable, "benchmarks/gpu_check.py", "--smoke", *args],
      cwd=REPO, env=script_env(), capture_output=True, text=True,
      timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_gpu_check_times_training_and_sampling():
  """One config's train step and its samples: every figure is there and
  positive, the sample has the data's shape."""
  out = _gpu_check("--configs=pixelcnn_mnist.py")
  rows = _json_lines(out)
  train, sample = rows
  assert train["config"] == "pixelcnn_mnist.py" and train["params"] > 0
  assert train["first_step_s"] > 0 and train["step_ms"] > 0
  assert train["images_s"] > 0
  assert sample["name"] == "4 PixelCNN MNIST samples"
  assert sample["shape"] == [4, 28, 28, 1] and sample["seconds"] > 0
  assert "skipped DDIM" in out  # no diffusion config measured: said so
  assert "| measurement | figures |" in out


def test_gpu_check_measures_a_scanned_config_unrolled_too():
  """A config with model.scan_layers gets a second, unrolled row (same
  parameter count), after the others."""
  rows = [r for r in _json_lines(_gpu_check("--configs=realnvp_cifar10.py"))
          if r["what"] == "train"]
  assert [r["dtype"] for r in rows] == ["float32", "float32 unrolled"]
  assert rows[0]["params"] == rows[1]["params"] > 0
  assert all(r["images_s"] > 0 for r in rows)


def test_gpu_check_budget_skips_and_says_so():
  out = _gpu_check("--configs=vae_binarized_mnist.py,pixelcnn_mnist.py",
                   "--budget_s=0")
  assert "skipped vae_binarized_mnist.py float32" in out
  assert "skipped pixelcnn_mnist.py float32" in out
  assert not [r for r in _json_lines(out) if "images_s" in r]


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_gpu_check_all_paper_configs():
  rows = _json_lines(_gpu_check())
  dtypes = {(r["config"], r["dtype"]) for r in rows if r["what"] == "train"}
  assert ("diffusion_cifar10.py", "bfloat16") in dtypes
  # 9 configs, diffusion also in bfloat16, and the four scanned configs
  # (two flows, PixelCNN++, VDM) again unrolled.
  assert len([r for r in rows if "images_s" in r]) == 14
  assert any(r.get("name", "").startswith("DDIM-") for r in rows)


def test_compile_times_overrides_a_field_and_names_a_misspelt_one(
    monkeypatch):
  """``--set section.key=value`` changes the config it times (the literal
  converted to the field's type); a field that does not exist stops with
  one line naming it."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import compile_times

  from gm_jax import config_lib
  config = config_lib.load(str(REPO / "configs/glow_cifar10.py"))
  config = compile_times.override(config, "model.scan_layers=False")
  assert config.model.scan_layers is False
  config = compile_times.override(config, "train.batch_size=64")
  assert config.train.batch_size == 64
  with pytest.raises(SystemExit, match="no field 'model.scan_layer'"):
    compile_times.override(config, "model.scan_layer=True")
  with pytest.raises(SystemExit, match="section.key=value"):
    compile_times.override(config, "scan_layers")


def test_bench_train_flags_flops_of_a_step_with_loops(monkeypatch):
  """XLA's cost analysis counts a while loop's body once: with gradient
  accumulation (a scan over micro-batches) the step's FLOPs are a lower
  bound and the result says so; without loops they are exact, and
  accumulating k micro-batches reports about 1/k of them."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import bench_train

  from gm_jax import config_lib
  results = {}
  for accumulation in (1, 2):
    config = config_lib.load(str(REPO / "configs/pixelcnn_mnist.py:smoke"))
    config.unlock()
    config.train.batch_size = 16
    config.optim.grad_accumulation = accumulation
    r = bench_train.measure(config, steps=1, eval_batches=0)
    results[accumulation] = (r["flops_per_step"], r["flops_exact"])
  assert results[1][1] and not results[2][1]
  assert 0.3 < results[2][0] / results[1][0] < 0.7, results
