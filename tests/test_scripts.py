"""The command-line scripts, run as a user runs them (in subprocesses)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gm_jax import metrics
from tests.conftest import script_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/vae_mnist.py:smoke", "--config.train.log_every=1",
         "--config.model.architecture=mlp"]


def _run(script, *args, timeout=300, **env):
  proc = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO,
                        env={**script_env(), **env}, capture_output=True, text=True,
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


@pytest.mark.slow  # about 40 s on 2 cores
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
          cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def _one_line(stderr):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith("error: ")
  return lines[0]


def test_evaluate_and_sample_scripts(four_device_run, tmp_path):
  workdir, _, _ = four_device_run
  proc = _run("evaluate.py", f"--workdir={workdir}",
              "--config.model.iwae_samples=8", "--num_examples=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 4, split 'test'" in proc.stdout
  assert "20/20 examples: running" in proc.stdout
  written = [p for p in os.listdir(os.path.join(workdir, "eval"))]
  assert len(written) == 1 and written[0].startswith("step_0000004_test_n20")
  saved = json.load(open(os.path.join(workdir, "eval", written[0])))
  assert np.isfinite(saved["nll_nats"]) and saved["bpd"] > 0
  assert saved["nll_nats_stderr"] > 0
  assert saved["model"]["iwae_samples"] == 8 and saved["seed"] == 0
  assert saved["num_examples"] == 20 and saved["split"] == "test"
  assert saved["overrides"] == {"model.iwae_samples": "8"}
  proc = _run("evaluate.py", f"--workdir={workdir}",
              "--config.model.iwae_samples=4", "--num_examples=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(os.listdir(os.path.join(workdir, "eval"))) == 2  # both kept
  out = str(tmp_path / "grid.png")
  proc = _run("sample.py", f"--workdir={workdir}", "--num=9", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for suffix in ("", "_reconstruction", "_interpolation"):
    assert os.path.exists(str(tmp_path / f"grid{suffix}.png"))
  # Laid out in rows: 28 x 28 digits with 1-pixel padding, inputs above
  # reconstructions and one 8-step interpolation per row.
  with Image.open(str(tmp_path / "grid_reconstruction.png")) as png:
    assert png.size[1] == 2 * 29 + 1
  with Image.open(str(tmp_path / "grid_interpolation.png")) as png:
    assert png.size[0] == 8 * 29 + 1


def _checkpoint_files(workdir):
  return sorted(os.path.relpath(os.path.join(root, f), workdir)
                for root, _, files in os.walk(workdir) for f in files
                if "checkpoints" in root)


@pytest.mark.parametrize("script,args,message", [
    ("evaluate.py", ["--config=configs/vae_mnist.py"],
     "holds a different state than this config builds"),
    ("sample.py", ["--config.model.latent_dim=3"],
     "Overridden model keys: model.latent_dim: 4 -> 3"),
    ("train.py", [*SMOKE, "--config.optim.grad_clip=0"],
     "optim.grad_clip: 100.0 -> 0.0"),
])
def test_mismatching_config_is_one_line_and_moves_nothing(
    four_device_run, script, args, message):
  workdir, _, _ = four_device_run
  before = _checkpoint_files(workdir)
  proc = _run(script, f"--workdir={workdir}", *args)
  assert proc.returncode == 1
  assert message in _one_line(proc.stderr)
  assert _checkpoint_files(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_evaluate_fails_on_non_finite_metrics(four_device_run, tmp_path):
  """A checkpoint whose EMA parameters are NaN: exit 1, not a NaN report."""
  import shutil

  import jax

  from gm_jax import checkpoint, launch, train
  workdir = str(tmp_path / "nan")
  shutil.copytree(four_device_run[0], workdir,
                  ignore=shutil.ignore_patterns("LOCK"))
  config = launch.workdir_config(workdir)
  abstract = train.build(config).abstract_state
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=10)
  state = ckpt.restore_latest(abstract).state
  state = state.replace(ema_params=jax.tree_util.tree_map(
      lambda x: x * float("nan"), state.ema_params))
  ckpt.save(5, state)
  ckpt.close()
  proc = _run("evaluate.py", f"--workdir={workdir}", "--num_examples=8")
  assert proc.returncode == 1
  assert "Non-finite evaluation metrics" in proc.stderr


@pytest.mark.parametrize("script,args,message,code", [
    ("train.py", ["--config.optim.learning_rat=0.1"],
     "unknown config key 'optim.learning_rat'. Did you mean 'learning_rate'?",
     2),
    ("train.py", ["--config=configs/vae_mnist.py:smok"],
     "Unknown config argument(s) ['smok']", 2),
    ("train.py", ["--config=configs/nothere.py"],
     "Config file 'configs/nothere.py' does not exist.", 2),
    ("train.py", ["--config.train.num_steps=abc"],
     "--config.train.num_steps='abc': expected an integer.", 2),
    ("train.py", ["--config.data.source=nowhere"], "nowhere", 1),
    ("sample.py", ["--num=0"], "--num=0", 2),
    ("sample.py", ["--num=-3"], "--num=-3", 2),
    ("evaluate.py", ["--num_examples=0"], "--num_examples must be positive", 2),
])
def test_script_errors_are_one_clear_line(tmp_path, script, args, message,
                                          code):
  base = SMOKE if script == "train.py" else []
  proc = _run(script, *base, f"--workdir={tmp_path}", *args)
  assert proc.returncode == code, proc.stderr[-2000:]
  assert message in _one_line(proc.stderr)


def test_train_help_lists_every_config_and_its_args():
  proc = _run("train.py", "--help")  # absl's help exits with code 1
  assert "configs/" in proc.stdout, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  names = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
  assert names
  for name in names:
    # The summary line, then the line of its :args (every config takes
    # smoke).
    at = next(i for i, line in enumerate(lines)
              if line.strip().startswith(f"configs/{name}:"))
    args = lines[at + 1].strip()
    assert args.startswith("args: ") and "smoke" in args, (name, args)


def test_evaluate_script_without_checkpoint(tmp_path):
  proc = _run("evaluate.py", f"--workdir={tmp_path}",
              "--config=configs/vae_mnist.py:smoke")
  assert proc.returncode == 1
  assert "No checkpoint in" in _one_line(proc.stderr)
  typo = str(tmp_path / "typo")
  proc = _run("evaluate.py", f"--workdir={typo}")
  assert proc.returncode == 1
  assert "does not exist" in _one_line(proc.stderr)
  assert not os.path.exists(typo)


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
  from gm_jax import checkpoint
  with checkpoint.WorkdirLock(str(tmp_path)):
    proc = _run("train.py", *SMOKE, f"--workdir={tmp_path}")
  assert proc.returncode == 1
  assert f"in use by pid {os.getpid()}" in _one_line(proc.stderr)


def test_evaluate_reports_fid_and_kid(four_device_run, tmp_path):
  """FID/KID of samples against the test digits, with a (briefly trained)
  digit classifier cached under $XDG_CACHE_HOME; recorded with N and the
  extractor."""
  workdir, _, _ = four_device_run
  args = [f"--workdir={workdir}", "--num_examples=8", "--fid",
          "--fid_samples=16", "--fid_classifier_steps=10", "--seed=3"]
  proc = _run("evaluate.py", *args, XDG_CACHE_HOME=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fid=" in proc.stdout and "kid=" in proc.stdout
  path = os.path.join(workdir, "eval", "step_0000004_test_n8_seed3.json")
  saved = json.load(open(path))
  assert saved["fid"] > 0 and np.isfinite(saved["kid"])
  assert saved["fid_num_samples"] == 16
  assert saved["fid_extractor"].startswith("mnist_classifier-")
  cached = os.listdir(os.path.join(tmp_path, "gm_jax", "feature_extractors"))
  assert any(name.endswith(".npz") for name in cached)


def test_old_workdir_config_gets_new_trainer_keys(tmp_path):
  """A config.json written before a trainer key existed still loads."""
  from gm_jax import config_lib, launch
  config = json.loads(config_lib.load("configs/vae_mnist.py:smoke")
                      .to_json_best_effort())
  del config["train"]["eval_params"], config["data"]["random_flip"]
  del config["train"]["fid_every"], config["train"]["fid_samples"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  loaded = launch.workdir_config(str(tmp_path))
  assert loaded.train.eval_params == "ema" and loaded.data.random_flip is False
  assert loaded.train.fid_every == 0 and loaded.train.fid_samples == 1000
  assert loaded.model.latent_dim == config["model"]["latent_dim"]
