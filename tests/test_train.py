"""The trainer: outputs, sharding invariance, faults (kills, corruption,
SIGTERM, a second trainer), mismatching configs and errors."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import (
  config_lib,
  data,
  families,
  input_pipeline,
  launch,
  metrics,
  train,
)
from gm_jax import sharding as sharding_lib
from gm_jax.family import Family, LossState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(num_steps=6, ckpt_every=2, augment=False,
                 **train_overrides):
  config = config_lib.load("configs/vae_mnist.py:smoke")
  config.unlock()
  config.model.architecture = "mlp"  # compiles faster than the conv net
  config.train.num_steps = num_steps
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.sample_every = 1000
  config.train.compilation_cache_dir = ""
  config.ckpt.every_steps = ckpt_every
  config.data.random_flip = augment
  config.data.random_shift = 2 if augment else 0
  for k, v in train_overrides.items():
    config.train[k] = v
  config.lock()
  return config


# Checkpoints every 3 steps, logs every 2: a resume lands inside a logging
# interval; evaluations and sample grids at checkpointed steps; random flips
# and shifts, which must be drawn again identically after a resume.
FAULT_CONFIG = dict(num_steps=8, ckpt_every=3, log_every=2, eval_every=3,
                    sample_every=3, augment=True)


def final_params(workdir, config=None):
  """The newest checkpoint's step and params (NumPy)."""
  abstract = train.build(config or smoke_config()).abstract_state
  restored = checkpoint_lib.Checkpointer(workdir, read_only=True
                                         ).restore_latest(abstract,
                                                          only="params")
  return restored.step, jax.tree_util.tree_map(np.asarray, restored.state)


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)


def recorded(workdir):
  """metrics.jsonl without wall-clock figures, in order."""
  return [{k: v for k, v in r.items() if k not in metrics.TIMING_KEYS}
          for r in metrics.read_metrics(workdir)]


def sample_files(workdir):
  folder = os.path.join(workdir, "samples")
  return {name: open(os.path.join(folder, name), "rb").read()
          for name in sorted(os.listdir(folder))}


def assert_same_run(workdir, reference):
  """Parameters, metric records and sample grids all identical."""
  step, params = final_params(workdir)
  ref_step, ref_params = final_params(reference)
  assert step == ref_step
  assert_trees_equal(params, ref_params)
  assert recorded(workdir) == recorded(reference)
  assert sample_files(workdir) == sample_files(reference)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted smoke run on all 8 devices, shared by several tests."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = smoke_config()
  results = train.train_and_evaluate(config, workdir)
  return workdir, config, results


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory):
  """The uninterrupted run that the fault-injection tests must reproduce."""
  workdir = str(tmp_path_factory.mktemp("fault_reference"))
  train.train_and_evaluate(smoke_config(**FAULT_CONFIG), workdir)
  return workdir


def test_outputs_of_a_run(reference_run):
  workdir, config, results = reference_run
  assert {"nll_nats", "bpd", "neg_elbo_nats", "nll_nats_stderr"} <= set(
      results)
  assert np.isfinite(results["nll_nats"]) and results["nll_nats_stderr"] > 0
  records = metrics.read_metrics(workdir, "train")
  assert [r["step"] for r in records] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert all(0 <= r["data_wait_fraction"] <= 1 for r in records)
  assert metrics.read_metrics(workdir, "eval")[-1]["step"] == 6
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["family"] == "vae"
  pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert pngs == ["step_0000006.png", "step_0000006_interpolation.png",
                  "step_0000006_reconstruction.png"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2, 4, 6]
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.LOCK_FILE))


def test_one_and_eight_devices_give_the_same_losses(reference_run, tmp_path):
  """Same global batch on 1 and 8 devices: the same loss curve. The 1-device
  run logs every 2 steps, so its lines are means over pairs of steps."""
  workdir, _, _ = reference_run
  config = smoke_config(log_every=2)
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  losses8 = np.array([r["loss"] for r in metrics.read_metrics(workdir,
                                                               "train")])
  records1 = metrics.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in records1] == [2, 4, 6]
  losses1 = [r["loss"] for r in records1]
  np.testing.assert_allclose(losses1, losses8.reshape(3, 2).mean(1),
                             rtol=2e-5)
  assert losses8[0] != losses8[-1]  # it trained


# A trainer in a child process that SIGKILLs itself at one step: "now" right
# after that step's checkpoint is dispatched (so a save is in flight), or
# "committed" once that checkpoint is on disk but before the step's
# evaluation and samples are written.
_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from tests.test_train import smoke_config
    from gm_jax import train

    def kill_at(step, state):
      if step != {kill_step}:
        return
      if {mode!r} == "committed":
        marker = os.path.join({workdir!r}, "checkpoints", str(step),
                              "commit_success.txt")
        deadline = time.time() + 60
        while not os.path.exists(marker) and time.time() < deadline:
          time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)

    train.train_and_evaluate(smoke_config(**{config!r}), {workdir!r},
                             hooks=[kill_at])
""")


def run_and_kill(workdir, kill_step, mode="now", config=None):
  script = _KILL_SCRIPT.format(
      cache=jax.config.jax_compilation_cache_dir, kill_step=kill_step,
      mode=mode, workdir=workdir, config=config or FAULT_CONFIG)
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  return proc


def test_killed_runs_resume_identically(fault_reference, tmp_path, capsys):
  """SIGKILL during a save, mid-interval, and between a committed save and
  its evaluation: after each restart the run ends with the parameters, the
  metrics.jsonl records and the sample grids of an uninterrupted run (a
  killed run's LOCK is taken over each time)."""
  workdir = str(tmp_path)
  run_and_kill(workdir, 3, "now")
  run_and_kill(workdir, 5, "now")
  run_and_kill(workdir, 6, "committed")
  assert checkpoint_lib.Checkpointer(workdir).latest_step() == 6
  assert not any(r["step"] == 6 and r["split"] == "eval"
                 for r in metrics.read_metrics(workdir))
  capsys.readouterr()
  train.train_and_evaluate(smoke_config(**FAULT_CONFIG), workdir)
  out = capsys.readouterr().out
  assert "stale lock" in out and "Resumed from the checkpoint at step 6" in out
  assert "[eval] step 6" in out and "[samples] step 6" in out
  assert_same_run(workdir, fault_reference)


@pytest.mark.slow
def test_soak_many_kills(tmp_path):
  """12 SIGKILLs at random steps of a 45-step run, half of them during
  saves, half between a committed save and its evaluation."""
  config = dict(FAULT_CONFIG, num_steps=45)
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(smoke_config(**config), reference)
  workdir = str(tmp_path / "killed")
  rng = np.random.default_rng(1)
  for kill in range(12):
    latest = checkpoint_lib.Checkpointer(workdir).latest_step() or 0
    step = min(latest + int(rng.integers(1, 5)), config["num_steps"])
    assert latest < config["num_steps"], f"finished after {kill} kills"
    run_and_kill(workdir, step, ["now", "committed"][kill % 2], config)
  train.train_and_evaluate(smoke_config(**config), workdir)
  assert_same_run(workdir, reference)


def test_sigterm_saves_and_resumes_identically(fault_reference, tmp_path,
                                               capsys):
  workdir = str(tmp_path)
  handler = signal.getsignal(signal.SIGTERM)

  def preempt_after_4(step, state):
    if step == 4:  # noticed at the end of the next step
      os.kill(os.getpid(), signal.SIGTERM)

  assert train.train_and_evaluate(smoke_config(**FAULT_CONFIG), workdir,
                                  hooks=[preempt_after_4]) == {}
  assert "Preempted: saved the checkpoint at step 5" in capsys.readouterr().out
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [3, 5]
  assert signal.getsignal(signal.SIGTERM) == handler  # restored
  train.train_and_evaluate(smoke_config(**FAULT_CONFIG), workdir)
  assert_same_run(workdir, fault_reference)


def test_a_second_trainer_is_refused(tmp_path):
  with checkpoint_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(checkpoint_lib.WorkdirLockedError, match="in use by"):
      train.train_and_evaluate(smoke_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def _corrupt(step_dir):
  """Truncates every array data file of a checkpoint."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.sep + "d" in root:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(f.name) // 3, 1))


def test_corrupted_latest_checkpoint_falls_back(reference_run, tmp_path,
                                                capsys):
  ref_dir, _, _ = reference_run
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=4), workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "4"))
  capsys.readouterr()
  train.train_and_evaluate(smoke_config(num_steps=6), workdir)
  out = capsys.readouterr().out
  assert "checkpoint at step 4" in out and "is damaged" in out
  assert "Resumed from the checkpoint at step 2" in out
  assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 1
  _, params = final_params(workdir)
  _, ref_params = final_params(ref_dir)
  assert_trees_equal(params, ref_params)
  assert recorded(workdir) == recorded(ref_dir)


def test_all_checkpoints_corrupted_never_starts_over(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "2"))
  for _ in range(2):  # also on the next attempt, after the quarantine
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match="None of the checkpoints|refusing to start over"):
      train.train_and_evaluate(smoke_config(num_steps=4), workdir)
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [1, 2]


def _nan_family(model_config):
  """The smoke VAE whose loss turns NaN from step 3 on."""
  base = families.FAMILIES["vae"](model_config)

  def loss(params, batch, key, step):
    value, aux = base.loss(params, batch, key, step)
    return jnp.where(step >= 3, jnp.nan, value), aux
  return Family(base.init, loss, base.evaluate, base.sample)


def test_non_finite_loss_stops_without_checkpointing(tmp_path, monkeypatch):
  monkeypatch.setitem(families.FAMILIES, "nan_vae", _nan_family)
  config = smoke_config(num_steps=8, log_every=100)
  config.unlock()
  config.model.family = "nan_vae"
  with pytest.raises(train.NonFiniteError,
                     match=r"at step 4 \(the update from step 3\).*latest"
                     r" checkpoint is at step 2"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = checkpoint_lib.Checkpointer(str(tmp_path)).all_steps()
  assert steps == [2]


class _CompileLog:
  """Which thread compiled which jitted function (jax.monitoring's
  backend-compile event, also sent on a persistent-cache hit)."""

  def __init__(self):
    self.events = []

  def __call__(self, event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      self.events.append((kwargs.get("fun_name"),
                          threading.current_thread().name))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)

  def threads(self, name):
    return [thread for fun, thread in self.events if fun == name]


def test_the_train_step_compiles_once_alongside_the_init(tmp_path, capsys):
  """A fresh run and a resumed one compile the train step exactly once,
  in the compile-ahead thread: the specs it compiles for (abstract state,
  batch spec, key) are the shapes, dtypes and shardings of the real first
  call, which then finds the executable in the jit cache."""
  workdir = str(tmp_path)
  jax.clear_caches()
  with _CompileLog() as log:
    train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  assert log.threads("jit(train_step)") == ["gm_jax-compile-ahead"]
  assert log.threads("jit(init_fn)") == ["MainThread"]
  assert "Compiled the train step in" in capsys.readouterr().out
  jax.clear_caches()
  with _CompileLog() as log:
    train.train_and_evaluate(smoke_config(num_steps=4), workdir)
  assert log.threads("jit(train_step)") == ["gm_jax-compile-ahead"]
  assert log.threads("jit(init_fn)") == []
  out = capsys.readouterr().out
  assert "Resumed from the checkpoint at step 2" in out
  assert "alongside the catch-up" in out


def _untraceable_family(model_config):
  """The smoke VAE whose loss cannot be traced."""
  base = families.FAMILIES["vae"](model_config)

  def loss(params, batch, key, step):
    raise ValueError("this loss cannot be traced")
  return Family(base.init, loss, base.evaluate, base.sample)


def test_an_error_compiling_ahead_is_raised_by_the_run(tmp_path,
                                                       monkeypatch):
  """The compile-ahead thread's error reaches the caller as itself, after
  the initialisation, with no thread left behind and nothing saved."""
  monkeypatch.setitem(families.FAMILIES, "untraceable_vae",
                      _untraceable_family)
  config = smoke_config(num_steps=2)
  config.unlock()
  config.model.family = "untraceable_vae"
  before = set(threading.enumerate())
  with pytest.raises(ValueError, match="this loss cannot be traced"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [t for t in set(threading.enumerate()) - before
              if t.name == "gm_jax-compile-ahead"]
  assert checkpoint_lib.Checkpointer(str(tmp_path)).all_steps() == []


def _batch_recording_family(model_config):
  """The smoke VAE whose initial parameters record the init batch: its
  size and the sum of its images (a data-dependent initialisation)."""
  base = families.FAMILIES["vae"](model_config)

  def init(key, batch):
    params = base.init(key, batch)
    images = batch["image"].astype(jnp.float32)
    return {**params, "seen": jnp.stack([images.shape[0] + 0.0,
                                         jnp.sum(images)])}

  def loss(params, batch, key, step):
    params = {k: v for k, v in params.items() if k != "seen"}
    return base.loss(params, batch, key, step)
  return Family(init, loss, base.evaluate, base.sample)


@pytest.mark.parametrize("init_batch_size", [0, 8, 4, 3])
def test_init_sees_the_first_init_batch_size_examples(
    tmp_path, monkeypatch, init_batch_size):
  """0: the whole first batch (16); 8 splits over the 8 devices; 4 and 3 do
  not, and are held whole by every device. Either way the init sees the
  first init_batch_size examples of step 0's batch, and training goes on
  with whole batches."""
  monkeypatch.setitem(families.FAMILIES, "recording_vae",
                      _batch_recording_family)
  config = smoke_config(num_steps=0, batch_size=16,
                        init_batch_size=init_batch_size)
  config.unlock()
  config.model.family = "recording_vae"
  config.lock()
  built = train.build(config)
  source = data.load_source(config.data, config.data.train_split)
  indices = input_pipeline.train_indices(len(source), 16, config.seed, 0)
  batch = input_pipeline.init_batch(source, indices, init_batch_size,
                                    built.mesh)
  size = init_batch_size or 16
  sharded = size % built.mesh.size == 0
  assert batch["image"].sharding.is_fully_replicated is not sharded
  state = built.init(jax.random.PRNGKey(0), batch)
  expected = source.get(indices[:size])["image"].astype(np.float64).sum()
  np.testing.assert_allclose(np.asarray(state.params["seen"]),
                             [size, expected], rtol=1e-6)
  # The trainer initialises from the same examples, then trains on whole
  # batches.
  config = smoke_config(num_steps=2, batch_size=16,
                        init_batch_size=init_batch_size)
  config.unlock()
  config.model.family = "recording_vae"
  config.lock()
  train.train_and_evaluate(config, str(tmp_path))
  _, params = final_params(str(tmp_path), config)
  # Its gradient is zero: Adam leaves it where the init put it.
  np.testing.assert_allclose(np.asarray(params["seen"]), [size, expected],
                             rtol=1e-6)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.train.update(init_batch_size=9),
     r"train.init_batch_size=9 must be in \[0, train.batch_size=8\]"),
    (lambda c: c.data.update(source="imagenet_on_floppy"),
     "imagenet_on_floppy"),
    (lambda c: c.model.update(image_shape=(32, 32, 3)),
     r"shape \(28, 28, 1\) but config.model.image_shape is \(32, 32, 3\)"),
    (lambda c: c.train.update(batch_size=6), "divisible by the number of"),
    (lambda c: c.model.update(family="gan"), "Unknown model family 'gan'"),
    (lambda c: c.optim.update(schedule="linear"), "optim.schedule='linear'"),
    (lambda c: c.train.update(fid_every=-1), "train.fid_every=-1"),
    (lambda c: c.train.update(fid_samples=1), "train.fid_samples=1"),
    (lambda c: c.train.update(sample_every=-1), "train.sample_every=-1"),
    (lambda c: c.train.update(curve_eval_examples=0),
     "train.curve_eval_examples=0"),
    (lambda c: c.train.update(cpu_convolutions="mkl"),
     "train.cpu_convolutions='mkl' must be 'eigen', 'ynnpack' or 'xla'"),
    (lambda c: c.train.update(cpu_forward_convolutions="onednn"),
     "train.cpu_forward_convolutions='onednn' must be 'eigen', 'ynnpack'"),
])
def test_bad_config_values_are_named(tmp_path, change, message):
  config = smoke_config()
  config.unlock()
  change(config)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def kernel_library(compiled_text: str) -> str:
  """Which library a compiled HLO module's convolutions run on: "ynnpack"
  (inside YNNPACK fusions), "eigen" (XLA's own instructions, YNNPACK
  fusions elsewhere) or "xla" (no YNNPACK fusion at all)."""
  bodies = dict(re.findall(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}",
                           compiled_text, re.S))
  fusions = re.findall(r"%ynn_fusion[\w.]* = [^\n]*calls=(%[\w.\-]+)",
                       compiled_text)
  assert " convolution(" in compiled_text
  if any(" convolution(" in bodies.get(name, "") for name in fusions):
    return "ynnpack"
  return "eigen" if fusions else "xla"


@pytest.mark.parametrize("library,forward_library",
                         [("eigen", "xla"), ("ynnpack", "eigen")])
def test_every_function_of_the_run_compiles_with_its_kernel_library(
    library, forward_library):
  """train.cpu_convolutions reaches the train step that build makes and
  train.cpu_forward_convolutions its evaluation and sampling: with "eigen"
  the convolutions are XLA's own instructions next to YNNPACK's matrix
  products, with "ynnpack" they are inside YNNPACK fusions, with "xla"
  nothing is."""
  if jax.default_backend() != "cpu":
    pytest.skip("the option only applies on the CPU backend")
  config = smoke_config(cpu_convolutions=library,
                        cpu_forward_convolutions=forward_library)
  config.unlock()
  config.model.architecture = "conv"
  config.model.conv_channels = (32, 32)  # big enough for YNNPACK to take
  config.lock()
  built = train.build(config)
  shape = (config.train.batch_size,) + tuple(config.model.image_shape)
  batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  key = jax.random.PRNGKey(0)
  params = built.abstract_state.params
  compiled = {
      library: [built.train_step.lower(built.abstract_state, batch,
                                       key).compile()],
      forward_library: [built.evaluate.lower(params, batch, key).compile(),
                        built.sample.lower(params, key, 4).compile()]}
  for expected, executables in compiled.items():
    for executable in executables:
      assert kernel_library(executable.as_text()) == expected


def test_cadence_of_outputs():
  """Every n steps and at the last step; 0 switches an output off."""
  outputs = train._Outputs.__new__(train._Outputs)
  outputs.train = smoke_config(num_steps=7).train
  assert [s for s in range(8) if outputs.due(3, s)] == [3, 6, 7]
  assert not any(outputs.due(0, s) for s in range(8))


def test_curve_evaluations_on_fewer_examples(reference_run, tmp_path,
                                            monkeypatch):
  """train.curve_eval_examples: the evaluations before the last step use
  that many examples, the last one eval_examples; training and the final
  figures are those of a run that evaluated once."""
  _, _, reference_results = reference_run
  used = []
  evaluate_dataset = train.evaluate_dataset

  def counting(*args, **kwargs):
    used.append(args[4])
    return evaluate_dataset(*args, **kwargs)

  monkeypatch.setattr(train, "evaluate_dataset", counting)
  workdir = str(tmp_path / "curve")
  results = train.train_and_evaluate(
      smoke_config(eval_every=2, curve_eval_examples=8), workdir)
  evals = metrics.read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [2, 4, 6]
  assert used == [8, 8, 16]
  assert evals[0]["nll_nats"] != evals[2]["nll_nats"]
  assert {k: v for k, v in results.items() if k not in metrics.TIMING_KEYS
          } == {k: v for k, v in reference_results.items()
                if k not in metrics.TIMING_KEYS}


def test_fid_during_training(reference_run, tmp_path, monkeypatch):
  """train.fid_every: FID / KID of fid_samples samples at every fid_every
  steps and at the last, in the eval records with N and the extractor; the
  training, the likelihood and the sample grids stay those of a run
  without it (the default: off in every config)."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  reference, reference_config, reference_results = reference_run
  assert reference_config.train.fid_every == 0
  workdir = str(tmp_path / "fid")
  results = train.train_and_evaluate(
      smoke_config(fid_every=4, fid_samples=8, fid_classifier_steps=3),
      workdir)
  evals = metrics.read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [4, 6]  # fid_every, then the last
  assert "nll_nats" not in evals[0]  # eval_every (1000) was not due at 4
  for record in evals:
    assert np.isfinite(record["fid"]) and record["fid"] > 0
    assert np.isfinite(record["kid"]) and np.isfinite(record["kid_se"])
    assert record["fid_num_samples"] == 8
    assert record["fid_extractor"].startswith("mnist_classifier-")
  assert evals[0]["fid"] != evals[1]["fid"]  # other params, other samples
  assert results["fid"] == evals[1]["fid"]
  fid_keys = {"fid", "kid", "kid_se", "fid_num_samples", "fid_extractor"}
  assert {k: v for k, v in results.items() if k not in fid_keys} == {
      k: v for k, v in reference_results.items()
      if k not in metrics.TIMING_KEYS} | {
          "eval_seconds": results["eval_seconds"]}
  assert (recorded(workdir) and
          [r for r in recorded(workdir) if r["split"] == "train"]
          == [r for r in recorded(reference) if r["split"] == "train"])
  assert_trees_equal(final_params(workdir), final_params(reference))
  assert sample_files(workdir) == sample_files(reference)
  assert not any(fid_keys & set(r) for r in metrics.read_metrics(reference))
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py") and not name.startswith("_"):
      assert config_lib.load(f"configs/{name}").train.fid_every == 0, name


def test_resuming_with_another_model_is_refused(reference_run, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  config = smoke_config(num_steps=4)
  config.unlock()
  config.model.latent_dim = 5
  with pytest.raises(ValueError, match=r"different model.*latent_dim: 4 -> 5"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2]


def test_runs_from_before_a_new_model_key_resume_and_evaluate(tmp_path):
  """A workdir whose config.json predates a model key (here: the key
  removed from it, as an older version wrote it) is the same model at that
  key's default: training resumes and the workdir's config loads complete;
  a real change next to it is still refused by name."""
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))
  assert saved["model"].pop("decoder_head") == "conv"  # the default
  with open(path, "w") as f:
    json.dump(saved, f)
  assert launch.workdir_config(workdir).model.decoder_head == "conv"
  config = smoke_config(num_steps=4)
  config.unlock()
  config.model.latent_dim = 5
  with pytest.raises(ValueError, match=r"different model.*latent_dim: 4 -> 5"
                     r"(?!.*decoder_head)"):
    train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(smoke_config(num_steps=4), workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2, 4]


def test_resuming_with_another_optimizer_structure_moves_nothing(tmp_path):
  """Turning gradient clipping off changes the optimizer state's structure:
  a one-line error naming the key; checkpoints, config.json and metrics
  untouched."""
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  config = smoke_config(num_steps=4)
  config.unlock()
  config.optim.grad_clip = 0.0
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"optim.grad_clip: 100.0 -> 0.0.*Nothing was moved"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
  assert open(os.path.join(workdir, "config.json")).read() == before
  train.train_and_evaluate(smoke_config(num_steps=4), workdir)  # still fine


def test_schedules():
  config = smoke_config()
  optim = config.optim
  optim.unlock()
  optim.update(learning_rate=1.0, warmup_steps=10, schedule="cosine")
  schedule = train.learning_rate_schedule(optim, 110)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
      [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  optim.update(warmup_steps=0, schedule="piecewise",
               piecewise_boundaries=(3, 6), piecewise_factor=0.5)
  schedule = train.learning_rate_schedule(optim, 10)
  np.testing.assert_allclose([schedule(2), schedule(4), schedule(7)],
                             [1.0, 0.5, 0.25])


def test_train_step_updates_ema_with_warm_up():
  """EMA decay is min(ema_decay, (1 + t) / (10 + t)) at step t."""
  quadratic = Family(
      init=lambda key, batch: {"w": jnp.ones((3,))},
      loss=lambda params, batch, key, step: (jnp.sum(params["w"]**2), {}),
      evaluate=None, sample=None)
  config = smoke_config()
  tx, schedule = train.make_optimizer(config.optim, 100)
  step_fn = jax.jit(train.make_train_step(quadratic, tx, schedule, 0.999))
  state = train.make_init_fn(quadratic, tx)(jax.random.PRNGKey(0), None)
  ema, w = np.ones(3), np.ones(3)
  for t in range(3):
    state, metrics = step_fn(state, None, jax.random.PRNGKey(0))
    decay = min(0.999, (1 + t) / (10 + t))
    w = np.asarray(state.params["w"])
    ema = decay * ema + (1 - decay) * w
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
    assert bool(metrics["finite"])
  assert int(state.step) == 3 and np.all(w < 1)


def _regression_family():
  """loss = mean over examples of (w . features(x) - 1)^2: deterministic, a
  true mean over the batch."""
  def features(batch):
    image = batch["image"].astype(jnp.float32) / 255.0
    return image.reshape(image.shape[0], -1)[:, :4]  # [B, 4]

  def loss(params, batch, key, step):
    residual = features(batch) @ params["w"][:, 0] + params["b"][0] - 1.0
    return jnp.mean(residual**2), {"mean_residual": jnp.mean(residual)}

  return Family(init=lambda key, batch: {"w": jnp.full((4, 1), 0.3),
                                         "b": jnp.zeros((1,))},
                loss=loss, evaluate=None, sample=None)


def test_gradient_accumulation_equals_the_full_batch_step():
  family = _regression_family()
  config = smoke_config()
  tx, schedule = train.make_optimizer(config.optim, 100)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 2, 2, 1)), jnp.uint8),
           "label": jnp.zeros(8, jnp.int32)}
  state = train.make_init_fn(family, tx)(jax.random.PRNGKey(0), batch)
  results = []
  for k in (1, 2, 4):
    step = jax.jit(train.make_train_step(family, tx, schedule, 0.9,
                                         accumulation=k))
    results.append(step(state, batch, jax.random.PRNGKey(0)))
  for new_state, m in results[1:]:
    np.testing.assert_allclose(new_state.params["w"], results[0][0].params["w"],
                               rtol=1e-6)
    np.testing.assert_allclose(m["loss"], results[0][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["mean_residual"],
                               results[0][1]["mean_residual"], rtol=1e-5)


def test_l2_penalty_is_added_to_the_loss_on_weight_matrices_only():
  zero_loss = Family(
      init=lambda key, batch: {"w": jnp.arange(6.0).reshape(2, 3),
                               "b": jnp.ones((3,))},
      loss=lambda params, batch, key, step: (0.0 * params["b"].sum(), {}),
      evaluate=None, sample=None)
  config = smoke_config()
  tx, schedule = train.make_optimizer(config.optim, 100)
  state = train.make_init_fn(zero_loss, tx)(jax.random.PRNGKey(0), None)
  step = jax.jit(train.make_train_step(zero_loss, tx, schedule, 0.9,
                                       l2_coefficient=0.1))
  _, m = step(state, None, jax.random.PRNGKey(0))
  w = np.arange(6.0)
  np.testing.assert_allclose(m["l2_penalty"], 0.5 * np.sum(w**2), rtol=1e-6)
  np.testing.assert_allclose(m["loss"], 0.1 * 0.5 * np.sum(w**2), rtol=1e-6)
  # d/dw of 0.1 * |w|^2 / 2 is 0.1 w; the bias gets no gradient.
  np.testing.assert_allclose(m["grad_norm"], 0.1 * np.linalg.norm(w),
                             rtol=1e-6)


def test_adamax_matches_optax():
  config = smoke_config()
  config.unlock()
  config.optim.update(name="adamax", grad_clip=0.0, warmup_steps=0,
                      schedule="constant", learning_rate=0.01)
  tx, _ = train.make_optimizer(config.optim, 10)
  reference = optax.adamax(0.01, b1=config.optim.b1, b2=config.optim.b2,
                           eps=config.optim.eps)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, 0.1, -4.0])}
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)


def test_inference_restores_the_parameters_the_config_evaluates(
    reference_run):
  workdir, config, _ = reference_run
  _, ema, _ = train.restore_for_inference(config, workdir)
  raw_config = smoke_config()
  raw_config.unlock()
  raw_config.train.eval_params = "params"
  _, raw, step = train.restore_for_inference(raw_config, workdir)
  _, params = final_params(workdir)
  assert step == 6
  assert_trees_equal(jax.tree_util.tree_map(np.asarray, raw), params)
  with pytest.raises(AssertionError):
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, ema), params)


def test_evaluation_too_big_for_memory_is_named_up_front(monkeypatch):
  """XLA's memory analysis of the compiled evaluation is checked against
  free memory before the first batch runs; the error names the chunk key."""
  from gm_jax import data
  config = smoke_config()
  config.unlock()
  config.model.iwae_samples = config.model.iwae_chunk = 64
  config.lock()
  built = train.build(config)
  source = data.load_source(config.data, "test")
  batch = {k: jnp.asarray(v) for k, v in source.get(
      np.arange(config.train.batch_size)).items()}
  params = built.init(jax.random.key(0), batch).params
  hint = train.memory_hint(config.model)
  assert hint == "model.iwae_chunk=64"

  def run():
    return train.evaluate_dataset(
        built.evaluate, params, source, config.train.eval_batch_size, 16,
        jax.random.key(1), built.mesh, memory_hint=hint)

  assert np.isfinite(run()["nll_nats"])  # fits in this machine's memory
  monkeypatch.setattr(train, "available_memory_bytes", lambda device: 1024)
  with pytest.raises(MemoryError) as error:
    run()
  message = str(error.value)
  assert "evaluate (a batch of" in message and "GiB of working memory" in message
  assert "lower train.eval_batch_size or model.iwae_chunk=64" in message
  assert "\n" not in message


def test_evaluation_reports_estimator_noise():
  """A per-example "<name>_estimator_var" becomes "<name>_estimator_sd" (root
  mean variance) and "<name>_estimator_stderr" (over the examples)."""
  from gm_jax import data
  config = smoke_config()
  built = train.build(config)
  source = data.load_source(config.data, "test")

  def evaluate_fn(params, batch, key):
    del params, key
    pixels = jnp.mean(batch["image"].astype(jnp.float32), axis=(1, 2, 3))
    return {"bpd": pixels, "bpd_estimator_var": 1.0 + 0.0 * pixels + (
        pixels > jnp.median(pixels)) * 6.0}

  results = train.evaluate_dataset(
      evaluate_fn, None, source, config.train.eval_batch_size, 32,
      jax.random.key(1), built.mesh)
  assert "bpd_estimator_var" not in results
  images = source.get(np.arange(32))["image"].astype(np.float64)
  bpd = images.mean(axis=(1, 2, 3))
  assert results["bpd"] == pytest.approx(bpd.mean())
  assert results["bpd_stderr"] == pytest.approx(bpd.std(ddof=1) / np.sqrt(32))
  per_batch = [b.reshape(-1, *images.shape[1:]).mean(axis=(1, 2, 3))
               for b in np.split(images, 32 // config.train.eval_batch_size)]
  variances = np.concatenate([1.0 + 6.0 * (p > np.median(p))
                              for p in per_batch])
  assert results["bpd_estimator_sd"] == pytest.approx(
      np.sqrt(variances.mean()))
  assert results["bpd_estimator_stderr"] == pytest.approx(
      np.sqrt(variances.mean() / 32))


def _stateful_regression_family():
  """_regression_family with a LossState: the state records the labels of
  the last batch (per-example stats, in the order update receives them),
  sums the residuals and counts updates; its loss reads the state (the
  residuals are scaled by 1 + updates / 10), so the state must reach it."""
  base = _regression_family()

  def loss(params, state, batch, key, step):
    image = batch["image"].astype(jnp.float32) / 255.0
    features = image.reshape(image.shape[0], -1)[:, :4]
    residual = features @ params["w"][:, 0] + params["b"][0] - 1.0
    scale = 1.0 + state["updates"].astype(jnp.float32) / 10.0
    stats = {"label": batch["label"], "residual": residual}
    return jnp.mean((scale * residual)**2), (
        {"mean_residual": jnp.mean(residual)}, stats)

  def update(state, stats):
    return {"labels": stats["label"],
            "residual_sum": state["residual_sum"] + jnp.sum(stats["residual"]),
            "updates": state["updates"] + 1}

  loss_state = LossState(
      init=lambda: {"labels": jnp.zeros(8, jnp.int32),
                    "residual_sum": jnp.zeros(()),
                    "updates": jnp.zeros((), jnp.int32)},
      loss=loss, update=update)
  return base._replace(loss_state=loss_state)


def test_family_state_is_updated_once_per_step_in_batch_order():
  """A LossState's state starts from init(), reaches the loss, and is
  updated once per step with every example's stats in the batch's order,
  with or without gradient accumulation (whose micro-batches interleave
  the rows); gradients, metrics and the l2 penalty are those of the
  stateless path."""
  family = _stateful_regression_family()
  config = smoke_config()
  tx, schedule = train.make_optimizer(config.optim, 100)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 2, 2, 1)), jnp.uint8),
           "label": jnp.arange(8, dtype=jnp.int32) * 10}
  state = train.make_init_fn(family, tx)(jax.random.PRNGKey(0), batch)
  assert int(state.family_state["updates"]) == 0
  stateless = train.make_init_fn(_regression_family(), tx)(
      jax.random.PRNGKey(0), batch)
  assert stateless.family_state is None
  for l2 in (0.0, 0.1):
    results = []
    for k in (1, 2, 4):
      step = jax.jit(train.make_train_step(family, tx, schedule, 0.9,
                                           l2_coefficient=l2,
                                           accumulation=k))
      new_state, m = step(state, batch, jax.random.PRNGKey(0))
      np.testing.assert_array_equal(new_state.family_state["labels"],
                                    batch["label"])
      assert int(new_state.family_state["updates"]) == 1
      # A second step sees the updated state: its loss is scaled by 1.1.
      _, m2 = step(new_state, batch, jax.random.PRNGKey(0))
      assert float(m2["loss"]) > float(m["loss"])
      results.append((new_state, m))
    plain = jax.jit(train.make_train_step(_regression_family(), tx, schedule,
                                          0.9, l2_coefficient=l2))
    plain_state, plain_m = plain(stateless, batch, jax.random.PRNGKey(0))
    for new_state, m in results:
      np.testing.assert_allclose(new_state.params["w"], plain_state.params["w"],
                                 rtol=1e-6)
      np.testing.assert_allclose(m["loss"], plain_m["loss"], rtol=1e-6)
      np.testing.assert_allclose(new_state.family_state["residual_sum"],
                                 8 * plain_m["mean_residual"], rtol=1e-5)
      assert ("l2_penalty" in m) == (l2 > 0)
      if l2 > 0:
        np.testing.assert_allclose(m["l2_penalty"], plain_m["l2_penalty"],
                                   rtol=1e-6)


@flax.struct.dataclass
class _TrainStateBeforeFamilyState:
  """TrainState as declared before it had a family_state field."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def test_stateless_checkpoints_keep_the_tree_of_earlier_versions(tmp_path):
  """A stateless config's state (family_state None) is saved with exactly
  the tree of the former four-field TrainState (orbax's tree metadata
  compared entry by entry), and a checkpoint written from the former
  structure restores into today's abstract state, for training and for
  inference (EMA parameters alone)."""
  config = smoke_config()
  built = train.build(config, sharding_lib.make_mesh(jax.devices()[:1]))
  assert built.abstract_state.family_state is None
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size,) + tuple(config.model.image_shape)
  batch = {"image": jnp.asarray(rng.integers(0, 256, shape), jnp.uint8),
           "label": jnp.zeros(shape[:1], jnp.int32)}
  state = built.init(jax.random.PRNGKey(0), batch)
  state, _ = built.train_step(state, batch, jax.random.PRNGKey(1))
  state = jax.device_get(state)
  old = _TrainStateBeforeFamilyState(step=state.step, params=state.params,
                                     ema_params=state.ema_params,
                                     opt_state=state.opt_state)
  trees = {}
  for name, tree in (("old", old), ("new", state)):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / name))
    checkpointer.save(1, tree, {"interval": {}})
    checkpointer.close()
    with open(tmp_path / name / "checkpoints" / "1" / "state" /
              "_METADATA") as f:
      trees[name] = json.load(f)["tree_metadata"]
  assert trees["new"] == trees["old"]
  assert list(trees["new"]) == list(trees["old"])  # same order too
  assert set(checkpoint_lib.tree_paths(built.abstract_state)) == set(
      checkpoint_lib.tree_paths(old))
  restored = checkpoint_lib.Checkpointer(
      str(tmp_path / "old"), read_only=True).restore_latest(
          built.abstract_state)
  assert isinstance(restored.state, train.TrainState)
  assert restored.state.family_state is None
  assert_trees_equal(jax.device_get(restored.state), state)
  _, ema_params, step = train.restore_for_inference(
      config, str(tmp_path / "old"), devices=jax.devices()[:1])
  assert step == 1
  assert_trees_equal(jax.device_get(ema_params), state.ema_params)
