"""Cold compilation time of every paper config's train step, on this machine.

  python benchmarks/compile_times.py [--configs=a.py,b.py] [--set model.x=v]

For each config (full size, not :smoke; datasets that would download are
replaced by the embedded images of the same shape): the time to lower and
compile the jitted init and train step, from a process-fresh jit cache and
without the persistent compilation cache (the trainer turns that on; the
second launch of a config then skips most of this). The init runs (and is
waited for) between the two compilations, so that its execution does not
share the cores with the step's compilation; its run time is printed apart.
Running the step is not timed: on 2 cores one step of the 35.7M-parameter
U-Net at batch 128 alone takes about a minute. The last column is what the
trainer waits for before its first step: the step compiles in a thread
(``train.CompileAhead``) while the init compiles and runs, from a cleared
jit cache again. ``--set section.key=value``
(repeatable) overrides a config field, e.g. ``--set model.scan_layers=True``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def override(config, item: str):
  """``config`` with ``section.key=value`` applied; the value is a Python
  literal, converted to the field's type. A misspelt field is an error."""
  import ast
  key, sep, value = item.partition("=")
  path = key.split(".")
  if not sep or len(path) != 2:
    raise SystemExit(f"--set wants section.key=value, got {item!r}")
  config.unlock()
  section = config[path[0]]
  if path[1] not in section:
    raise SystemExit(f"--set: config has no field {key!r}")
  old = section[path[1]]
  new = ast.literal_eval(value)
  section[path[1]] = type(old)(new) if old is not None else new
  config.lock()
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="",
                      help="comma-separated file names in configs/ (default:"
                      " all)")
  parser.add_argument("--set", action="append", default=[],
                      metavar="SECTION.KEY=VALUE",
                      help="override a config field (a Python literal)")
  args = parser.parse_args()
  import bench_train
  import jax
  import numpy as np

  from gm_jax import config_lib, data, input_pipeline, train

  names = (args.configs.split(",") if args.configs else sorted(
      os.path.basename(p) for p in glob.glob("configs/*.py")
      if not p.endswith("__init__.py")))
  print("| config | parameters | batch (init) | init compile |"
        " train step compile | both, one after the other | init run |"
        " init compile and run with the step's compile alongside (the"
        " trainer) |")
  print("|---|---|---|---|---|---|---|---|")
  for name in names:
    config = bench_train.offline(config_lib.load(f"configs/{name}"))
    for item in args.set:
      config = override(config, item)
    built = train.build(config)
    source = data.load_source(config.data, config.data.train_split)
    # The embedded images stand in for the dataset; a batch larger than
    # them (glow_cifar10's 512 against 420 colour patches) repeats them.
    indices = np.arange(config.train.batch_size) % len(source)
    batch = input_pipeline.global_batch(source, indices, built.mesh)
    first = input_pipeline.init_batch(source, indices,
                                      config.train.init_batch_size,
                                      built.mesh)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    built.init.lower(key, first).compile()
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = jax.block_until_ready(built.init(key, first))
    run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    built.train_step.lower(state, batch, key).compile()
    step_s = time.perf_counter() - t0
    del state
    jax.clear_caches()
    # The trainer's way: the step compiles in a thread (train.CompileAhead)
    # while the init compiles and runs.
    t0 = time.perf_counter()
    ahead = train.CompileAhead(
        built.train_step, built.abstract_state,
        input_pipeline.batch_spec(source, config.train.batch_size,
                                  built.mesh), key)
    try:
      jax.block_until_ready(built.init(key, first))
    finally:
      ahead.close()
    ahead.result()
    trainer_s = time.perf_counter() - t0
    name = " ".join([f"`{name}`", *args.set])
    print(f"| {name} | {built.num_params:,} | {config.train.batch_size}"
          f" ({len(first['image'])}) |"
          f" {init_s:.1f} s | {step_s:.1f} s | {init_s + step_s:.1f} s |"
          f" {run_s:.1f} s | {trainer_s:.1f} s |", flush=True)
    jax.clear_caches()


if __name__ == "__main__":
  main()
