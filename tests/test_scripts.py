"""The command-line scripts, run as a user runs them (in subprocesses)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gm_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/vae_mnist.py:smoke", "--config.train.log_every=1",
         "--config.model.architecture=mlp"]


def _env(devices=None):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # the scripts' --local_device_count decides
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(script, *args, timeout=300):
  proc = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  return proc


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four"))
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  proc = _run("train.py", *SMOKE, f"--workdir={workdir}",
              "--local_device_count=4",
              f"--config.train.compilation_cache_dir={cache}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, cache, proc.stdout


def test_train_script_prints_progress_and_caches_compilation(four_device_run):
  workdir, cache, stdout = four_device_run
  assert "steps/s" in stdout and "ETA" in stdout
  assert "Final test metrics: " in stdout and "nll_nats=" in stdout
  assert os.listdir(cache), "the persistent compilation cache stayed empty"


def test_two_processes_match_one_process(four_device_run, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed, gloo collectives) train
  exactly like 1 process x 4 devices."""
  reference, _, _ = four_device_run
  workdir = str(tmp_path / "two")
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "scripts/train.py", *SMOKE, f"--workdir={workdir}",
           "--local_device_count=2", f"--coordinator_address=localhost:{port}",
           "--num_processes=2", f"--process_id={i}",
           "--config.train.compilation_cache_dir="],
          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=False):
    assert p.returncode == 0, err[-3000:]
  two = metrics.read_metrics(workdir, "train")
  one = metrics.read_metrics(reference, "train")
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in two],
                             [r["loss"] for r in one], rtol=1e-5)
  assert "Final test metrics" in outputs[0][0]
  assert "Final test metrics" not in outputs[1][0]  # only process 0 reports


def test_evaluate_and_sample_scripts(four_device_run, tmp_path):
  workdir, _, _ = four_device_run
  proc = _run("evaluate.py", f"--workdir={workdir}", "--k=8",
              "--num_examples=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 4, split 'test'" in proc.stdout
  saved = json.load(open(os.path.join(workdir, "eval_step_4.json")))
  assert np.isfinite(saved["nll_nats"]) and saved["bpd"] > 0
  out = str(tmp_path / "grid.png")
  proc = _run("sample.py", f"--workdir={workdir}", "--num=9", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for suffix in ("", "_reconstruction", "_interpolation"):
    assert os.path.exists(str(tmp_path / f"grid{suffix}.png"))


@pytest.mark.parametrize("args,message", [
    (["--config.optim.learning_rat=0.1"], "learning_rat"),
    (["--config=configs/vae_mnist.py:smokey"], "smokey"),
    (["--config.data.source=nowhere"], "nowhere"),
])
def test_train_script_errors_are_one_clear_message(tmp_path, args, message):
  proc = _run("train.py", *SMOKE, f"--workdir={tmp_path}", *args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr.split(message)[0][-200:]


def test_evaluate_script_without_checkpoint(tmp_path):
  proc = _run("evaluate.py", f"--workdir={tmp_path}",
              "--config=configs/vae_mnist.py:smoke")
  assert proc.returncode == 1
  assert "No checkpoint in" in proc.stderr
