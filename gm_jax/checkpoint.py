"""Checkpoints that are never lost: orbax saves, checksums, verified restores.

Layout of ``workdir/checkpoints/<step>/`` (one orbax step, written into a
temporary folder and renamed into place when complete):

  state/      the train-state pytree (orbax PyTree handler)
  checksums/  sha256 of every saved array, keyed by its path in the tree,
              computed on the host at save time and committed with the state
  host/       small JSON host state (e.g. the running means of the metrics
              since the last log line), so a resumed run writes exactly what
              an uninterrupted one would
  commit_success.txt   orbax's completion marker

Restoring distinguishes three situations and treats each differently:

* **Mismatch**: the caller asks for a structure the checkpoint does not hold
  (another model, another optimizer chain). That is the caller's error:
  ``CheckpointMismatchError`` names the differing entries and nothing is
  moved. The check reads only orbax's metadata, never the arrays.
* **Damage**: a step whose own files are missing, unreadable or fail their
  checksum (truncation, flipped bytes, a deleted file, an empty or partial
  folder, a removed commit marker). Only that step is moved to
  ``workdir/corrupt_checkpoints/<step>_<time>/`` (never deleted) and the
  previous step is tried. Read-only users (evaluation, sampling) skip a
  damaged step without moving it.
* **Nothing readable**: ``CheckpointError``; the caller must not silently
  start over.

Nothing here deletes a readable checkpoint; the only deletions are orbax's
``max_to_keep`` rotation of old steps after a newer one is committed.

``WorkdirLock`` makes one trainer the only writer of a workdir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any, Iterator, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CORRUPT_DIR = "corrupt_checkpoints"
LOCK_FILE = "LOCK"
_COMMIT_MARKER = "commit_success.txt"  # orbax writes it when a step is final
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored although some exist."""


class CheckpointMismatchError(ValueError):
  """The checkpoint holds another structure than the one asked for."""


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"WARNING: {message}", flush=True)


# ----------------------------------------------------------------------------
# Trees: normalised paths, digests, structure comparison.


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_paths(tree) -> dict[str, Any]:
  """Flattens a pytree to {"params/Dense_0/kernel": leaf}.

  Dict keys, attribute names and sequence indices all become plain path
  components, so a tree and orbax's metadata of it (where tuples come back as
  lists and dataclasses as dicts) give the same paths.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _host_array(x) -> np.ndarray:
  """A replicated (or host) array as NumPy, on any process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def array_digest(x) -> str:
  """sha256 of an array's dtype, shape and bytes."""
  value = _host_array(x)
  h = hashlib.sha256()
  h.update(f"{value.dtype.str}{value.shape}".encode())
  h.update(value.tobytes())
  return h.hexdigest()


def tree_digests(tree) -> dict[str, str]:
  return {path: array_digest(leaf) for path, leaf in tree_paths(tree).items()}


def _describe_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
  """'' when every wanted path is saved with the same shape and dtype."""
  problems = []
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing:
    problems.append(f"not in the checkpoint: {', '.join(missing[:3])}"
                    + (f" (+{len(missing) - 3} more)" if len(missing) > 3
                       else ""))
  if extra:
    problems.append(f"only in the checkpoint: {', '.join(extra[:3])}"
                    + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""))
  for path in sorted(set(saved) & set(wanted)):
    got, want = saved[path], wanted[path]
    got_shape, want_shape = tuple(got.shape), tuple(want.shape)
    if got_shape != want_shape or np.dtype(got.dtype) != np.dtype(want.dtype):
      problems.append(f"{path} is {np.dtype(got.dtype).name}{list(got_shape)}"
                      f" in the checkpoint, {np.dtype(want.dtype).name}"
                      f"{list(want_shape)} here")
      break
  return "; ".join(problems)


# ----------------------------------------------------------------------------
# Checkpointer.


class Restored(NamedTuple):
  step: int
  state: Any
  host_state: dict


class Checkpointer:
  """Saves and restores a train-state pytree, keeping the newest few.

  Args:
    workdir: the run's folder; checkpoints live in ``workdir/checkpoints``.
    max_to_keep: orbax's rotation: older steps are deleted once this many
      newer ones are committed.
    async_save: write in a background thread while training goes on.
    read_only: never create, move or delete anything (evaluation,
      sampling); a damaged step is skipped instead of quarantined.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"No checkpoint in {self.directory}: is"
                              f" {self.workdir} a training workdir?")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    handlers = {"state": ocp.PyTreeCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler(),
                "host": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  # -- queries

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reached_preemption(self, step: int) -> bool:
    """orbax's preemption notice (TPU maintenance, SLURM through
    jax.distributed), agreed on by every process."""
    return self._manager.reached_preemption(step)

  # -- saving

  def save(self, step: int, state: Any,
           host_state: Optional[dict] = None) -> None:
    """Saves ``state`` (and a small JSON ``host_state``) as ``step``.

    The checksums are computed on process 0 from the host copy of the state
    and committed in the same orbax step, so a step either has both or is
    incomplete.
    """
    digests = tree_digests(state) if jax.process_index() == 0 else {}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        checksums=ocp.args.JsonSave({"algorithm": "sha256",
                                     "leaves": digests}),
        host=ocp.args.JsonSave(host_state or {})))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restoring

  def restore_latest(self, abstract: Any, only: Optional[str] = None
                     ) -> Optional[Restored]:
    """Restores the newest intact checkpoint.

    Args:
      abstract: the state's structure: a pytree of ``jax.ShapeDtypeStruct``
        with shardings.
      only: restore only this top-level field of the state (e.g.
        ``"ema_params"``); ``abstract`` is still the whole state.

    Returns:
      ``Restored(step, state, host_state)`` (``state`` is the field alone
      when ``only`` is given), or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest intact step holds another
        structure; nothing was moved.
      CheckpointError: checkpoints exist but none is intact.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      restored = self._try_restore(step, abstract, only)
      if restored is not None:
        return restored
    if steps:
      where = (f"; the damaged steps were moved to"
               f" {os.path.join(self.workdir, CORRUPT_DIR)}"
               if not self.read_only else "")
      raise CheckpointError(
          f"None of the checkpoints {steps} in {self.directory} is intact"
          f"{where}. Nothing was deleted; start a new workdir or repair"
          " them.")
    return None

  def restore(self, step: int, abstract: Any,
              only: Optional[str] = None) -> Restored:
    """Restores one step; raises CheckpointError if it is damaged."""
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint at step {step} in {self.directory}; available"
          f" steps: {self.all_steps()}.")
    restored = self._try_restore(step, abstract, only)
    if restored is None:
      raise CheckpointError(f"The checkpoint at step {step} in"
                            f" {self.directory} is damaged.")
    return restored

  def _try_restore(self, step: int, abstract: Any,
                   only: Optional[str]) -> Optional[Restored]:
    """The restored step, or None after reporting (and, unless read-only,
    quarantining) a damaged one."""
    item = abstract
    if only:
      item = {only: (abstract[only] if isinstance(abstract, dict)
                     else getattr(abstract, only))}
    problem = self._missing_files(step)
    if not problem:
      try:
        metadata = self._manager.item_metadata(step)["state"]
        saved = tree_paths(getattr(metadata, "tree", metadata))
      except Exception as e:  # orbax/tensorstore raise many error types
        problem = f"its metadata cannot be read ({_first_line(e)})"
    if not problem:
      wanted = tree_paths(item)
      if only:
        saved = {p: v for p, v in saved.items()
                 if p == only or p.startswith(only + "/")}
      mismatch = _describe_mismatch(saved, wanted)
      if mismatch:
        raise CheckpointMismatchError(
            f"The checkpoint at step {step} in {self.directory} holds a"
            f" different state than this config builds ({mismatch}).")
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=bool(only)),
            checksums=ocp.args.JsonRestore(),
            host=ocp.args.JsonRestore()))
      except (PermissionError, MemoryError):
        raise  # the machine's problem, not the checkpoint's
      except Exception as e:
        problem = f"it cannot be read ({_first_line(e)})"
    if not problem:
      problem = _verify(out["state"], out["checksums"])
    if not problem:
      state = out["state"][only] if only else out["state"]
      return Restored(step, state, dict(out["host"] or {}))
    self._report_damage(step, problem)
    return None

  def _missing_files(self, step: int) -> str:
    folder = os.path.join(self.directory, str(step))
    for name in (_COMMIT_MARKER, "state", "checksums", "host"):
      if not os.path.exists(os.path.join(folder, name)):
        return f"it has no {name} (an incomplete or partial step)"
    return ""

  def _report_damage(self, step: int, problem: str) -> None:
    if self.read_only:
      _warn(f"Skipping the checkpoint at step {step} in {self.directory}:"
            f" {problem}.")
      return
    moved_to = self.quarantine(str(step))
    _warn(f"The checkpoint at step {step} in {self.directory} is damaged:"
          f" {problem}. Moved it to {moved_to}; trying the previous one.")

  def quarantine(self, name: str) -> str:
    """Moves ``checkpoints/<name>`` aside (process 0), keeping its bytes."""
    source = os.path.join(self.directory, name)
    target = os.path.join(self.workdir, CORRUPT_DIR,
                          f"{name}_{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      while os.path.exists(target):
        target += "_"
      shutil.move(source, target)
    self._manager.reload()
    return target

  def quarantine_leftovers(self) -> None:
    """Moves temporary folders of interrupted saves aside (call it only while
    holding the workdir lock, so no save of ours is in flight)."""
    if self.read_only or not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARKER in name:
        moved_to = self.quarantine(name)
        _warn(f"Moved the unfinished save {name} to {moved_to}.")


def _verify(state: Any, checksums: Optional[dict]) -> str:
  """'' when every restored array matches the digest saved with it."""
  if not checksums or "leaves" not in checksums:
    return "it has no checksums"
  leaves = checksums["leaves"]
  for path, leaf in tree_paths(state).items():
    if path not in leaves:
      return f"no checksum for {path}"
    if array_digest(leaf) != leaves[path]:
      return f"{path} fails its sha256 checksum"
  return ""


def _first_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------
# One writer per workdir.


def _process_start_time(pid: int) -> Optional[str]:
  """The kernel's start time of ``pid`` (Linux), to tell a reused pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start_time: Optional[str]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  current = _process_start_time(pid)
  return start_time is None or current is None or current == start_time


class WorkdirLock:
  """An exclusive lock file ``workdir/LOCK`` naming its holder.

  Taken by the trainer (process 0 of a multi-process run). A second trainer
  is refused with one line naming the holder (host, pid, start time). A lock
  left by a dead process on this host is taken over with a warning. Use as a
  context manager.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self._held = False

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

  def acquire(self) -> None:
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    record = json.dumps(self._record())
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._check_holder()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(record)
      self._held = True
      return
    raise WorkdirLockedError(f"Could not take the lock {self.path}.")

  def _check_holder(self) -> None:
    """Raises if a live process holds the lock; removes a stale one."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except FileNotFoundError:
      return  # released meanwhile: try again
    except (OSError, ValueError):
      holder = {}
    host, pid = holder.get("host"), holder.get("pid")
    same_host = host == socket.gethostname()
    if (same_host and isinstance(pid, int)
        and not _alive(pid, holder.get("pid_start_time"))):
      _warn(f"Taking over the stale lock {self.path} of pid {pid}, which is"
            " no longer running.")
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      return
    raise WorkdirLockedError(
        f"The workdir {os.path.dirname(self.path)} is in use by pid {pid} on"
        f" {host} (since {holder.get('started', '?')}). One trainer per"
        f" workdir; if that process is gone for good, delete {self.path}.")

  def release(self) -> None:
    if self._held:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      self._held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------
# Preemption.


class PreemptionWatch:
  """Notices SIGTERM (and orbax's preemption notices) during training.

  Within the context, SIGTERM sets a flag instead of killing the process;
  the trainer asks ``requested(step)`` after every step, saves and exits.
  The previous handler is restored on exit. In multi-process runs, and
  outside the main thread (where signals cannot be caught), only orbax's
  notices count.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._checkpointer = checkpointer
    self.signal_received = False
    self._previous = None

  def _handler(self, signum, frame):
    del frame
    self.signal_received = True
    _warn(f"Received signal {signum}: saving a checkpoint after this step.")

  def requested(self, step: int) -> bool:
    if self.signal_received:
      return True
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return False

  @contextlib.contextmanager
  def watching(self) -> Iterator[PreemptionWatch]:
    # Multi-process runs leave SIGTERM to jax.distributed's preemption
    # notifier, which every process agrees on through reached_preemption;
    # a flag set in one process alone would make it save while the others
    # train on.
    main = (threading.current_thread() is threading.main_thread()
            and jax.process_count() == 1)
    if main:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    try:
      yield self
    finally:
      if main:
        signal.signal(signal.SIGTERM, self._previous)
