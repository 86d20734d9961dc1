"""Training and evaluation throughput of any config, on whatever devices exist.

  python benchmarks/bench_train.py --config=configs/vae_mnist.py
  python benchmarks/bench_train.py --config=configs/vae_mnist.py \
      --config.train.batch_size=256 --steps=50

Prints: devices, parameter count, first-step time (compilation included),
train images/s and steps/s over --steps timed steps (after warm-up), eval
images/s of ``family.evaluate`` (with the config's settings, e.g. the IWAE k),
and the peak resident host memory of the process. The data are real batches
from the config's source, already on the device, so the figures measure the
jitted computation, not the input pipeline.
"""

import resource
import time

import jax
from absl import flags
from ml_collections import config_flags

from gm_jax import data, launch, sharding, train
from gm_jax.families import make_family

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 2, "Timed eval batches.")
flags.mark_flags_as_required(["config"])
launch.define_distributed_flags()


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv):
  del argv
  launch.initialize_distributed()
  config = _CONFIG.value
  family = make_family(config.model)
  mesh = sharding.make_mesh()
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  source = data.load_source(config.data, config.data.train_split)
  bs, ebs = config.train.batch_size, config.train.eval_batch_size

  def batch_at(step, size=bs):
    indices = train.train_indices(len(source), size, config.seed, step)
    return sharding.global_batch(source, indices, mesh)

  tx, schedule = train.make_optimizer(config.optim, config.train.num_steps)
  init_fn = jax.jit(train.make_init_fn(family, tx),
                    out_shardings=replicated)
  state = init_fn(jax.random.PRNGKey(0), batch_at(0))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  step_fn = jax.jit(
      train.make_train_step(family, tx, schedule, config.optim.ema_decay),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  key = jax.random.PRNGKey(1)
  batches = [batch_at(i) for i in range(4)]

  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0], key)
  jax.block_until_ready(metrics)
  first_step = time.perf_counter() - t0
  for i in range(2):  # warm-up
    state, metrics = step_fn(state, batches[i % 4], key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = step_fn(state, batches[i % 4], key)
  jax.block_until_ready(state)
  train_seconds = time.perf_counter() - t0

  eval_batch = batch_at(0, ebs)
  eval_fn = jax.jit(family.evaluate,
                    in_shardings=(replicated, batch_sharding, replicated),
                    out_shardings=replicated)
  t0 = time.perf_counter()
  jax.block_until_ready(eval_fn(state.ema_params, eval_batch, key))
  eval_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_EVAL_BATCHES.value):
    out = eval_fn(state.ema_params, eval_batch, key)
  jax.block_until_ready(out)
  eval_seconds = time.perf_counter() - t0

  if launch.is_main_process():
    steps = _STEPS.value
    print(f"devices:              {mesh.size} x {jax.devices()[0].device_kind}"
          f" ({jax.default_backend()})")
    print(f"model:                {config.model.family}, {num_params:,}"
          " parameters")
    print(f"global batch:         {bs} (eval {ebs})")
    print(f"first step (compile): {first_step:.2f} s")
    print(f"train:                {steps * bs / train_seconds:,.1f} images/s,"
          f" {steps / train_seconds:.2f} steps/s, loss"
          f" {float(metrics['loss']):.3f}")
    print(f"eval first batch:     {eval_first:.2f} s (with compilation)")
    print(f"eval:                 {_EVAL_BATCHES.value * ebs / eval_seconds:,.1f}"
          f" images/s ({eval_seconds / _EVAL_BATCHES.value:.3f} s per batch"
          f" of {ebs})")
    print(f"peak host memory:     {_peak_rss_gib():.2f} GiB (max RSS)")


if __name__ == "__main__":
  launch.run(main)
