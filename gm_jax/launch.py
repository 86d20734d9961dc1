"""What the command-line scripts share: config flags, distributed start-up
and clean errors.

Every script takes its config the same way: ``--config=configs/x.py[:args]``
(loaded with ``config_lib.load``) or, for scripts that read a trained
workdir, the workdir's ``config.json``; then any number of
``--config.section.key=value`` overrides, each checked against the existing
key and its type.

``run(main)`` wraps ``absl.app.run`` so that the errors a user can cause end
the program with one clear line on stderr instead of a traceback: exit code
2 for a bad command line or config (unknown flag or key, a value of the wrong
type, a missing config file), 1 for a failure while running (an unknown
dataset, a shape the model can't take, unreadable checkpoints, a non-finite
loss). Set GM_JAX_TRACEBACK=1 for the full traceback.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import sys
from typing import Optional

from absl import app, flags, logging

_COORDINATOR = "coordinator_address"
_NUM_PROCESSES = "num_processes"
_PROCESS_ID = "process_id"
_OVERRIDE_PREFIX = "--config."

# The --config.KEY=VALUE arguments of this process, in order.
_overrides: list[tuple[str, str]] = []


class UsageError(ValueError):
  """A bad command line or config: reported in one line, exit code 2."""


def define_config_flag(required: bool, help_text: str) -> None:
  """``--config`` (a config file spec) plus ``--config.KEY=VALUE``."""
  flags.DEFINE_string(
      "config", None,
      f"{help_text} Override any key with --config.SECTION.KEY=VALUE"
      " (repeatable).\n" + available_configs())
  if required:
    flags.mark_flag_as_required("config")


def available_configs(with_args: bool = False) -> str:
  """A help paragraph listing configs/*.py with their one-line summaries and,
  ``with_args``, the ``:args`` each accepts (``config_lib.config_args``,
  which imports every family: only for --help)."""
  from gm_jax import config_lib
  folder = os.path.join(config_lib.REPO_ROOT, "configs")
  if not os.path.isdir(folder):
    return ""
  accepted = config_lib.config_args(folder) if with_args else {}
  lines = ["Configs (append :arg1,arg2 for a config's arguments, e.g."
           " :smoke; each file's docstring explains them):"]
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py") and not name.startswith("_"):
      summary = _docstring_summary(os.path.join(folder, name))
      lines.append(f"  configs/{name}: {summary}")
      if accepted.get(name):
        lines.append(f"      args: {', '.join(accepted[name])}")
  return "\n".join(lines)


_HELP_FLAGS = ("help", "helpshort", "helpfull", "?")


def _add_config_args_to_help() -> None:
  """Rewrites --config's help with each config's accepted :args, and the
  main module's usage docstring with the same list."""
  listing = available_configs(with_args=True)
  flag = flags.FLAGS["config"]
  flag.help = flag.help.split("\nConfigs (", 1)[0] + "\n" + listing
  main = sys.modules.get("__main__")
  if main is not None and main.__doc__ and listing not in main.__doc__:
    main.__doc__ = main.__doc__.rstrip() + "\n\n" + listing + "\n"


def _docstring_summary(path: str) -> str:
  try:
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError):
    return ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def define_distributed_flags() -> None:
  flags.DEFINE_string(
      _COORDINATOR, None,
      "host:port of process 0, for a multi-process run. Leave unset on a"
      " single host; on Cloud TPU pods and SLURM clusters use"
      " --distributed=auto instead.")
  flags.DEFINE_integer(_NUM_PROCESSES, None, "Number of processes.")
  flags.DEFINE_integer(_PROCESS_ID, None, "This process's index.")
  flags.DEFINE_enum(
      "distributed", "off", ["off", "auto"],
      "auto: call jax.distributed.initialize() with no arguments, letting JAX"
      " read the cluster from the environment (TPU pods, SLURM, Open MPI).")
  flags.DEFINE_integer(
      "local_device_count", None,
      "Simulated CPU devices in this process (testing multi-device code).")


def initialize_distributed() -> None:
  """Starts jax.distributed when the flags ask for several processes."""
  import jax  # imported here: flags must be parsed first
  fl = flags.FLAGS
  if fl.local_device_count:
    jax.config.update("jax_num_cpu_devices", fl.local_device_count)
  if fl[_COORDINATOR].value:
    if fl[_NUM_PROCESSES].value is None or fl[_PROCESS_ID].value is None:
      raise UsageError("--coordinator_address needs --num_processes and"
                       " --process_id.")
    # Collectives between CPU devices of different processes (tests, CPU
    # clusters); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=fl[_COORDINATOR].value,
        num_processes=fl[_NUM_PROCESSES].value,
        process_id=fl[_PROCESS_ID].value)
  elif fl.distributed == "auto":
    jax.distributed.initialize()


# ----------------------------------------------------------------------------
# Configs.


def _tuples(value):
  """JSON turns tuples into lists; configs use tuples for shapes."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def workdir_config(workdir: str):
  """The config a workdir was trained with (its config.json), locked."""
  import ml_collections
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"The workdir {workdir} does not exist.")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: is {workdir} a training workdir? Pass"
        " --config=<the config file it was trained with>.")
  from gm_jax import config_lib, families
  with open(path) as f:
    saved = json.load(f)
  if isinstance(saved.get("model"), dict):
    saved["model"] = families.with_model_defaults(saved["model"])
  saved = _tuples(saved)
  # Keys added to the trainer's sections (and to the model's family, above)
  # since the run was made take their defaults, so older workdirs stay
  # readable.
  merged = config_lib.base_config().to_dict()
  for section, values in saved.items():
    if isinstance(values, dict) and isinstance(merged.get(section), dict) and (
        section != "model"):
      merged[section].update(values)
    else:
      merged[section] = values
  loaded = ml_collections.ConfigDict(merged)
  loaded.lock()
  return loaded


def load_config(spec: Optional[str], workdir: Optional[str] = None):
  """The config of the command line: ``spec`` (a config file) or else the
  workdir's config.json, with the --config.KEY=VALUE overrides applied.

  Raises:
    UsageError: a missing file, a bad config argument, an unknown key or a
      value of the wrong type.
  """
  from gm_jax import config_lib
  try:
    config = (config_lib.load(spec) if spec is not None
              else workdir_config(workdir))
  except FileNotFoundError as e:
    if spec is None:
      raise
    raise UsageError(str(e)) from None
  except ValueError as e:
    raise UsageError(str(e)) from None
  apply_overrides(config, _overrides)
  return config


def overrides() -> list[tuple[str, str]]:
  """The (key, text) overrides given on the command line, in order."""
  return list(_overrides)


def apply_overrides(config, overrides) -> None:
  """Sets ``[(dotted_key, text)]`` on a config, parsing each text as the
  type of the value it replaces. Raises UsageError naming the key."""
  for key, text in overrides:
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
      if part not in node:
        raise UsageError(_unknown_key(key, node, part))
      node = node[part]
    if not hasattr(node, "keys") or leaf not in node:
      raise UsageError(_unknown_key(key, node, leaf))
    value = _parse_like(text, node[leaf], key)
    with node.ignore_type():
      node[leaf] = value


def _unknown_key(key: str, node, part: str) -> str:
  known = sorted(node.keys()) if hasattr(node, "keys") else []
  close = difflib.get_close_matches(part, known, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"unknown config key {key!r}.{hint}"


def _parse_like(text: str, old, key: str):
  """``text`` as a value of ``old``'s type."""
  def bad(kind):
    return UsageError(f"--config.{key}={text!r}: expected {kind}.")
  if isinstance(old, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise bad("true or false")
  if isinstance(old, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if old is None:
      return text
    raise bad(f"a Python literal like {old!r}") from None
  if isinstance(old, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  return value


# ----------------------------------------------------------------------------
# Running.


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


def _exit(code: int) -> None:
  """Ends a script that has finished its work, skipping the interpreter's
  teardown.

  Python's finalisation stops daemon threads (input prefetching, library
  thread pools) wherever they are; one stopped inside C++ code that
  catches the forced unwind aborts the process ("terminate called ...
  exception not rethrown", exit status -6) after everything was saved: one
  ``train.py`` run in a few hundred in the test suite (2026-11-28 and
  2026-11-29). Everything teardown would do that matters is done here:
  the other non-daemon threads are joined, the atexit handlers run
  (``jax.distributed``'s shutdown among them) and the streams are flushed.
  """
  import atexit
  import threading
  for thread in threading.enumerate():
    if thread is not threading.main_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _fail(message: str, code: int) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr,
        flush=True)
  _exit(code)


def run(main) -> None:
  """absl's app.run, with user-facing errors printed as one line."""
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      # orbax and tfds log routine events (every save, read-only managers,
      # dataset variants) as INFO and WARNING; what a user must see, gm_jax
      # prints itself.
      logging.set_verbosity(logging.ERROR)
    try:
      code = main(argv)
    except UsageError as e:
      if os.environ.get("GM_JAX_TRACEBACK"):
        raise
      _fail(str(e), 2)
    except (ValueError, OSError, FloatingPointError, RuntimeError,
            KeyError, MemoryError) as e:
      if os.environ.get("GM_JAX_TRACEBACK"):
        raise
      _fail(f"{type(e).__name__}: {e}", 1)
    _exit(code if isinstance(code, int) else 0)
  app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv):
  """Takes the --config.KEY=VALUE overrides out of ``argv``, then lets absl
  parse the rest; a flag error is one line and exit code 2."""
  rest = [argv[0]]
  args = iter(argv[1:])
  for arg in args:
    if arg.startswith(_OVERRIDE_PREFIX):
      key, sep, value = arg[len(_OVERRIDE_PREFIX):].partition("=")
      if not sep:
        value = next(args, None)
        if value is None:
          _fail(f"{arg} needs a value ({arg}=VALUE).", 2)
      _overrides.append((key, value))
    else:
      rest.append(arg)
  asks_help = any(a.lstrip("-").partition("=")[0] in _HELP_FLAGS
                  for a in rest[1:] if a.startswith("-"))
  if asks_help and "config" in flags.FLAGS:
    _add_config_args_to_help()
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    if os.environ.get("GM_JAX_TRACEBACK"):
      raise
    _fail(str(e), 2)
