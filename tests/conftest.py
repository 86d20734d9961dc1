"""Test set-up: eight simulated CPU devices, so sharding is exercised, and
programs compiled without LLVM's optimisation passes."""

import os
import subprocess
import sys

# The suite compiles hundreds of small programs and runs each a few times.
# XLA's CPU backend compiles them in about 40% of the default time without
# LLVM's optimisation passes and with the older loop emitters (the whole
# suite: 11 min 21 s -> 6 min 33 s on 2 cores, with the other savings of
# that change). Results stay deterministic; runs compared bit for bit share
# these flags (the killed-run subprocesses inherit them; script runs, which
# are compared only with each other, use the defaults: ``script_env``).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0"
                      " --xla_cpu_use_fusion_emitters=false")
_CHOSEN = "GM_JAX_TEST_COMPILE_FLAGS"  # the decision, inherited by workers


def _compile_flags() -> str:
  """FAST_COMPILE_FLAGS if this jaxlib accepts them, else none: XLA aborts
  on a flag it does not know, and a later release may drop these. Probed
  once, in the process that starts the xdist workers."""
  if _CHOSEN not in os.environ:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS,
             "JAX_PLATFORMS": "cpu"}, capture_output=True, timeout=300)
    os.environ[_CHOSEN] = FAST_COMPILE_FLAGS if probe.returncode == 0 else ""
  return os.environ[_CHOSEN]


# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if _compile_flags() and _compile_flags() not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _compile_flags()
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs (the same smoke model compiled by several tests) are
# compiled once per session. Each process removes its own cache at exit:
# left behind, every run of the suite added one directory of up to 46 MB
# per xdist worker to the temporary directory.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

_CACHE_DIR = tempfile.mkdtemp(prefix="gm_jax_test_jax_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def script_env(**extra) -> dict:
  """The environment for a script run as a subprocess: CPU only, XLA's
  default flags, and no simulated devices (its --local_device_count
  decides). The fast-compile flags stay out of scripts: with them one
  train.py run in six aborted at exit after finishing (a C++ exception in
  teardown, 2026-11-28). With the defaults it happened too, more rarely
  (3 runs in 12 on 2 busy cores, 2026-11-29); ``launch.run`` now ends the
  scripts without the interpreter's teardown (``launch._exit``: 0 in
  12)."""
  return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **extra}
