"""What the command-line scripts share: distributed start-up and clean errors.

``run(main)`` wraps ``absl.app.run`` so that the errors a user can cause (a bad
config value, an unknown dataset, a shape the model can't take, unreadable
checkpoints, a non-finite loss) end the program with one clear line on stderr
and exit code 1 instead of a long traceback. Set GM_JAX_TRACEBACK=1 for the
full traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

_COORDINATOR = "coordinator_address"
_NUM_PROCESSES = "num_processes"
_PROCESS_ID = "process_id"


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
      raise ValueError("--coordinator_address needs --num_processes and"
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


def _tuples(value):
  """JSON turns tuples into lists; configs use tuples for shapes."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(config, workdir: str):
  """The config given on the command line, else the workdir's config.json."""
  import ml_collections
  if config is not None:
    return config
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: is {workdir} a training workdir? Pass"
        " --config=<the config file it was trained with>.")
  with open(path) as f:
    import json
    loaded = ml_collections.ConfigDict(_tuples(json.load(f)))
  loaded.lock()
  return loaded


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


def run(main) -> None:
  """absl's app.run, with user-facing errors printed as one line."""
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      return main(argv)
    except (ValueError, OSError, FloatingPointError, RuntimeError,
            KeyError) as e:
      if os.environ.get("GM_JAX_TRACEBACK"):
        raise
      print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
  app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's flag parsing, with config errors (an unknown key, a bad config
  argument) reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises through many layers
    if os.environ.get("GM_JAX_TRACEBACK"):
      raise
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    def clean(text):
      return " ".join(str(text).replace("\\n", " ").replace("\\'", "'")
                      .strip("'\"").split())
    if isinstance(cause, KeyError):
      print("error: unknown config key " + clean(e).replace("'", ""),
            file=sys.stderr)
    else:
      print(f"error: {clean(e)}", file=sys.stderr)
      if cause is not e:
        print(f"  caused by {type(cause).__name__}: {clean(cause)}",
              file=sys.stderr)
    sys.exit(2)
