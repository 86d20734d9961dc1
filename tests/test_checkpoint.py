"""Checkpoints: checksums, damage vs mismatch, quarantine of the damaged step
alone, read-only restores, the workdir lock."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import checkpoint as ckpt_lib


def _state(value):
  """A small train-state-like pytree whose every leaf depends on ``value``."""
  return {"step": jnp.asarray(value, jnp.int32),
          "params": {"w": jnp.full((16, 8), value, jnp.float32),
                     "b": jnp.arange(8, dtype=jnp.float32) + value},
          "ema_params": {"w": jnp.full((16, 8), -value, jnp.float32),
                         "b": jnp.zeros(8, jnp.float32) + value / 2},
          "opt_state": ({"mu": jnp.full((16, 8), value / 3, jnp.float32)},)}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


@pytest.fixture
def workdir(tmp_path):
  """A workdir with intact checkpoints at steps 1, 2, 3."""
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {"interval": {"sums": {"loss": step
                                                                 / 7},
                                                        "count": step}})
  checkpointer.close()
  return str(tmp_path)


def _equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_files(step_dir):
  """Array data files of a step (orbax's OCDBT data under state/)."""
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.sep + "d" in root:
      found += [os.path.join(root, f) for f in files]
  assert found, f"no data files under {step_dir}"
  return found


def _truncate(step_dir):
  for path in _data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)


def _delete_file(step_dir):
  for path in _data_files(step_dir):
    os.remove(path)


def _random_bytes(step_dir):
  """Flips bytes inside the data files without changing their sizes."""
  rng = np.random.default_rng(0)
  for path in _data_files(step_dir):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 2)
      f.write(rng.integers(0, 256, size=min(8, size - size // 2),
                           dtype=np.uint8).tobytes())


def _remove_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, "commit_success.txt"))


def _remove_checksums(step_dir):
  import shutil
  shutil.rmtree(os.path.join(step_dir, "checksums"))


DAMAGE = {"truncate": _truncate, "delete_file": _delete_file,
          "random_bytes": _random_bytes,
          "remove_commit_marker": _remove_commit_marker,
          "remove_checksums": _remove_checksums}


def test_round_trip_with_host_state(workdir):
  restored = ckpt_lib.Checkpointer(workdir).restore_latest(
      _abstract(_state(0)))
  assert restored.step == 3
  _equal(restored.state, _state(3))
  assert restored.host_state == {"interval": {"sums": {"loss": 3 / 7},
                                              "count": 3}}
  digests = json.load(open(os.path.join(workdir, "checkpoints", "3",
                                        "checksums", "metadata")))
  assert digests["algorithm"] == "sha256"
  assert set(digests["leaves"]) == set(ckpt_lib.tree_paths(_state(0)))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_quarantines_only_that_step(workdir, damage, capsys):
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "3"))
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=5)
  restored = checkpointer.restore_latest(_abstract(_state(0)))
  assert restored.step == 2
  _equal(restored.state, _state(2))
  assert checkpointer.all_steps() == [1, 2]
  moved = os.listdir(os.path.join(workdir, ckpt_lib.CORRUPT_DIR))
  assert len(moved) == 1 and moved[0].startswith("3_")
  out = capsys.readouterr().out
  assert out.count("WARNING") == 1 and "step 3" in out and "damaged" in out
  assert "bound method" not in out


def test_random_bytes_are_caught_by_the_checksum_or_the_reader(workdir):
  """Overwriting bytes of the data changes values orbax happily reads back
  (or breaks its decoding): either way the step is refused."""
  _random_bytes(os.path.join(workdir, "checkpoints", "3"))
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 3"):
    checkpointer.restore(3, _abstract(_state(0)))


def test_empty_step_folder_and_leftover_tmp_folder(workdir):
  os.mkdir(os.path.join(workdir, "checkpoints", "4"))
  tmp = os.path.join(workdir, "checkpoints", "5.orbax-checkpoint-tmp-17")
  os.makedirs(os.path.join(tmp, "state"))
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=5)
  checkpointer.quarantine_leftovers()
  restored = checkpointer.restore_latest(_abstract(_state(0)))
  assert restored.step == 3
  assert checkpointer.all_steps() == [1, 2, 3]
  moved = sorted(os.listdir(os.path.join(workdir, ckpt_lib.CORRUPT_DIR)))
  assert [m.split("_")[0] for m in moved] == ["4", "5.orbax-checkpoint-tmp-17"]


def test_mismatch_moves_nothing(workdir):
  other = _state(0)
  other["opt_state"] = ({"mu": other["opt_state"][0]["mu"]},
                        {"nu": jnp.zeros(3)})
  checkpointer = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"only in this|not in the checkpoint: opt_state/1"):
    checkpointer.restore_latest(_abstract(other))
  bigger = _state(0)
  bigger["params"]["w"] = jnp.zeros((16, 9))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"params/w is float32\[16, 8\] in the checkpoint"):
    checkpointer.restore_latest(_abstract(bigger))
  assert checkpointer.all_steps() == [1, 2, 3]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.CORRUPT_DIR))


def test_partial_restore_ignores_the_optimizer(workdir):
  """Inference asks for the EMA parameters alone: another optimizer
  structure in the caller's abstract state does not matter."""
  other = _state(0)
  other["opt_state"] = ()
  restored = ckpt_lib.Checkpointer(workdir, read_only=True).restore_latest(
      _abstract(other), only="ema_params")
  assert restored.step == 3
  _equal(restored.state, _state(3)["ema_params"])


def test_read_only_skips_damage_without_moving(workdir, capsys):
  _truncate(os.path.join(workdir, "checkpoints", "3"))
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  restored = checkpointer.restore_latest(_abstract(_state(0)),
                                         only="ema_params")
  assert restored.step == 2
  assert checkpointer.all_steps() == [1, 2, 3]
  assert not os.path.exists(os.path.join(workdir, ckpt_lib.CORRUPT_DIR))
  assert "Skipping the checkpoint at step 3" in capsys.readouterr().out


def test_read_only_never_creates_a_workdir(tmp_path):
  missing = str(tmp_path / "typo")
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    ckpt_lib.Checkpointer(missing, read_only=True)
  assert not os.path.exists(missing)


def test_all_damaged_is_an_error(workdir):
  for step in (1, 2, 3):
    _truncate(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(ckpt_lib.CheckpointError, match="None of the"):
    ckpt_lib.Checkpointer(workdir).restore_latest(_abstract(_state(0)))
  moved = os.listdir(os.path.join(workdir, ckpt_lib.CORRUPT_DIR))
  assert len(moved) == 3  # kept, not deleted


def test_second_lock_is_refused_and_names_the_holder(tmp_path):
  with ckpt_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(ckpt_lib.WorkdirLockedError,
                       match=f"in use by pid {os.getpid()}"):
      ckpt_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / ckpt_lib.LOCK_FILE)  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  record = {"host": __import__("socket").gethostname(), "pid": dead.pid,
            "pid_start_time": None, "started": "earlier"}
  (tmp_path / ckpt_lib.LOCK_FILE).write_text(json.dumps(record))
  with ckpt_lib.WorkdirLock(str(tmp_path)):
    holder = json.loads((tmp_path / ckpt_lib.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()
  assert "stale lock" in capsys.readouterr().out


def test_lock_of_another_host_is_respected(tmp_path):
  record = {"host": "some-other-host", "pid": 1, "started": "earlier"}
  (tmp_path / ckpt_lib.LOCK_FILE).write_text(json.dumps(record))
  with pytest.raises(ckpt_lib.WorkdirLockedError, match="some-other-host"):
    ckpt_lib.WorkdirLock(str(tmp_path)).acquire()
