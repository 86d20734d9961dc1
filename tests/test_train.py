"""The trainer: outputs, sharding invariance, resume, corruption, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import config_lib, families, metrics, train
from gm_jax.family import Family

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(num_steps=6, **train_overrides):
  config = config_lib.load("configs/vae_mnist.py:smoke")
  config.unlock()
  config.model.architecture = "mlp"  # compiles faster than the conv net
  config.train.num_steps = num_steps
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.sample_every = 1000
  config.train.compilation_cache_dir = ""
  config.ckpt.every_steps = 2
  for k, v in train_overrides.items():
    config.train[k] = v
  config.lock()
  return config


def final_params(workdir, config):
  """Restores the newest checkpoint's params as NumPy arrays."""
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step = ckpt.latest_step()
  state = ckpt._manager.restore(step)  # untyped restore: plain arrays
  ckpt.close()
  return step, jax.tree_util.tree_map(np.asarray, state["params"])


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=False):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted smoke run on all 8 devices, shared by several tests."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = smoke_config()
  results = train.train_and_evaluate(config, workdir)
  return workdir, config, results


def test_outputs_of_a_run(reference_run):
  workdir, config, results = reference_run
  assert {"nll_nats", "bpd", "neg_elbo_nats"} <= set(results)
  assert np.isfinite(results["nll_nats"])
  records = metrics.read_metrics(workdir, "train")
  assert [r["step"] for r in records] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert metrics.read_metrics(workdir, "eval")[-1]["step"] == 6
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["family"] == "vae"
  pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert pngs == ["step_0000006.png", "step_0000006_interpolation.png",
                  "step_0000006_reconstruction.png"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2, 4, 6]


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


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal
    from tests.test_train import smoke_config
    from gm_jax import train

    def kill_at(step, state):
      if step == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)

    train.train_and_evaluate(smoke_config(), {workdir!r}, hooks=[kill_at])
""")


def test_resume_after_sigkill_is_bit_identical(reference_run, tmp_path):
  ref_dir, config, _ = reference_run
  workdir = str(tmp_path)
  script = _KILL_SCRIPT.format(kill_step=5, workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, cwd=REPO)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  steps = checkpoint_lib.Checkpointer(workdir).all_steps()
  assert steps and max(steps) < 6
  train.train_and_evaluate(config, workdir)
  ref_step, ref_params = final_params(ref_dir, config)
  step, params = final_params(workdir, config)
  assert step == ref_step == 6
  assert_trees_equal(params, ref_params)


def _corrupt(step_dir):
  """Truncates every data file of an orbax checkpoint."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if "_METADATA" in name or name.endswith(".txt"):
        continue
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
  assert "Checkpoint at step 4" in out and "could not be restored" in out
  assert "Resumed from the checkpoint at step 2" in out
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  _, params = final_params(workdir, None)
  _, ref_params = final_params(ref_dir, None)
  assert_trees_equal(params, ref_params)


def test_all_checkpoints_corrupted_is_an_error(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="None of the checkpoints"):
    train.train_and_evaluate(smoke_config(num_steps=4), workdir)
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))


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
  with pytest.raises(train.NonFiniteError, match="at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = checkpoint_lib.Checkpointer(str(tmp_path)).all_steps()
  assert steps == [2]


@pytest.mark.parametrize("change,message", [
    (lambda c: c.data.update(source="imagenet_on_floppy"),
     "imagenet_on_floppy"),
    (lambda c: c.model.update(image_shape=(32, 32, 3)),
     r"shape \(28, 28, 1\) but config.model.image_shape is \(32, 32, 3\)"),
    (lambda c: c.train.update(batch_size=6), "divisible by the number of"),
    (lambda c: c.model.update(family="gan"), "Unknown model family 'gan'"),
    (lambda c: c.optim.update(schedule="linear"), "optim.schedule='linear'"),
])
def test_bad_config_values_are_named(tmp_path, change, message):
  config = smoke_config()
  config.unlock()
  change(config)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_resuming_with_another_model_is_refused(reference_run, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config(num_steps=2), workdir)
  config = smoke_config(num_steps=4)
  config.unlock()
  config.model.latent_dim = 5
  with pytest.raises(ValueError, match=r"different model.*latent_dim"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2]


def test_train_indices_are_deterministic_epoch_permutations():
  a = [train.train_indices(10, 3, 0, s) for s in range(6)]
  b = [train.train_indices(10, 3, 0, s) for s in range(6)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
  epoch0 = np.concatenate(a[:3])
  assert len(set(epoch0)) == 9  # no repeats within an epoch
  assert not np.array_equal(np.concatenate(a[3:]), epoch0)
  c = train.train_indices(10, 3, 1, 0)
  assert not np.array_equal(a[0], c)


def test_schedules():
  config = smoke_config()
  optim = config.optim
  optim.unlock()
  optim.update(learning_rate=1.0, warmup_steps=10, schedule="cosine")
  schedule = train.make_schedule(optim, 110)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
      [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  optim.update(warmup_steps=0, schedule="piecewise",
               piecewise_boundaries=(3, 6), piecewise_factor=0.5)
  schedule = train.make_schedule(optim, 10)
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
