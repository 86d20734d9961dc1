"""Training and evaluation throughput of any config, on whatever devices exist.

  python benchmarks/bench_train.py --config=configs/vae_mnist.py
  python benchmarks/bench_train.py --config=configs/vae_mnist.py \
      --config.train.batch_size=256 --steps=50

Prints: devices, parameter count, first-step time (compilation included),
train images/s and steps/s over --steps timed steps (after warm-up), the
step's model FLOPs (counted from its jaxpr: benchmarks/flops.py) and the
FLOP/s achieved, eval images/s of ``family.evaluate`` (with the config's
settings, e.g. the IWAE k), with ``--samples=N`` the time and FLOPs of
``family.sample`` for N images, and the peak resident host memory of the
process. The data are real batches from the config's source, already on
the device, so the figures measure the jitted computation, not the input
pipeline.
"""

import resource
import time

import flops as flops_lib
from absl import flags

from gm_jax import launch

launch.define_config_flag(required=True, help_text="Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 2, "Timed eval batches.")
_SAMPLES = flags.DEFINE_integer(
    "samples", 0, "Also time family.sample for this many images (0: no).")
launch.define_distributed_flags()


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def offline(config):
  """``config`` reading the embedded images of the same shape where it would
  download a dataset (benchmarks time the computation, not the data)."""
  with config.unlocked():
    if config.data.source == "tfds":
      config.data.source = (
          "embedded_rgb" if tuple(config.model.image_shape)[-1] == 3
          else "embedded_mnist")
      config.data.name = ""
  return config


def _large_enough(source, size: int):
  """``source``, its examples repeated when it holds fewer than ``size``: the
  embedded colour patches are 420, and glow_cifar10's batch is 512. The
  benchmark times the computation, which repeats do not change."""
  if len(source) >= size or not hasattr(source, "images"):
    return source
  import numpy as np

  from gm_jax import data
  reps = -(-size // len(source))
  return data.ArraySource(images=np.tile(source.images, (reps, 1, 1, 1)),
                          labels=np.tile(source.labels, reps))


def measure(config, steps: int = 20, eval_batches: int = 2) -> dict:
  """Builds ``config``'s trainer on all devices and times it. Returns
  first_step_s (compile + run), step_s, train_images_s, loss, eval_first_s,
  eval_batch_s, eval_images_s, num_params, flops_per_step (the matrix
  products' and convolutions' FLOPs in the step's jaxpr), flops_exact
  (False when a while loop, whose trip count the jaxpr does not hold, made
  them a lower bound) and batch sizes."""
  import jax

  from gm_jax import data, input_pipeline, train

  built = train.build(config)
  bs, ebs = config.train.batch_size, config.train.eval_batch_size
  source = _large_enough(
      data.load_source(config.data, config.data.train_split),
      max(bs, ebs, config.train.init_batch_size))

  def batch_at(step, size=bs):
    indices = input_pipeline.train_indices(len(source), size, config.seed,
                                           step)
    return input_pipeline.global_batch(source, indices, built.mesh)

  state = built.init(jax.random.PRNGKey(0), input_pipeline.init_batch(
      source, input_pipeline.train_indices(len(source), bs, config.seed, 0),
      config.train.init_batch_size, built.mesh))
  key = jax.random.PRNGKey(1)
  batches = [batch_at(i) for i in range(4)]

  t0 = time.perf_counter()
  state, metrics = built.train_step(state, batches[0], key)
  jax.block_until_ready(metrics)
  first_step = time.perf_counter() - t0
  # Model FLOPs from the step's jaxpr (benchmarks/flops.py): the same on
  # every backend, with scanned layers and accumulated micro-batches
  # counted as often as they run. Tracing again costs no compilation.
  flops, flops_exact = flops_lib.traced_flops(
      built.train_step.trace(state, batches[0], key))
  for i in range(2):  # warm-up
    state, metrics = built.train_step(state, batches[i % 4], key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = built.train_step(state, batches[i % 4], key)
  jax.block_until_ready(state)
  train_seconds = time.perf_counter() - t0

  result = dict(num_params=built.num_params, batch=bs, eval_batch=ebs,
                first_step_s=first_step, step_s=train_seconds / steps,
                train_images_s=steps * bs / train_seconds,
                loss=float(metrics["loss"]), flops_per_step=flops,
                flops_exact=flops_exact,
                built=built, state=state, first_batch=batches[0],
                step_key=key)
  if eval_batches:
    eval_batch = batch_at(0, ebs)
    t0 = time.perf_counter()
    jax.block_until_ready(built.evaluate(state.ema_params, eval_batch, key))
    result["eval_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(eval_batches):
      out = built.evaluate(state.ema_params, eval_batch, key)
    jax.block_until_ready(out)
    result["eval_batch_s"] = (time.perf_counter() - t0) / eval_batches
    result["eval_images_s"] = ebs / result["eval_batch_s"]
  return result


def main(argv):
  del argv
  config = launch.load_config(flags.FLAGS.config)
  launch.initialize_distributed()
  import jax

  r = measure(config, _STEPS.value, _EVAL_BATCHES.value)
  sample_line = ""
  if _SAMPLES.value:  # every process: the sampler is one sharded program
    built, params = r["built"], r["state"].ema_params
    t0 = time.perf_counter()
    jax.block_until_ready(built.sample(params, jax.random.PRNGKey(2),
                                       _SAMPLES.value))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(built.sample(params, jax.random.PRNGKey(3),
                                       _SAMPLES.value))
    seconds = time.perf_counter() - t0
    sample_flops, exact = flops_lib.traced_flops(
        built.sample.trace(params, jax.random.PRNGKey(3), _SAMPLES.value))
    sample_line = (f"sample:               {_SAMPLES.value} images in"
                   f" {seconds:.2f} s (first call {first:.2f} s, with"
                   f" compilation), {sample_flops / 1e9:,.1f} GFLOP,"
                   f" {sample_flops / seconds / 1e9:,.1f} GFLOP/s"
                   + ("" if exact else " (lower bounds: a while loop)"))
  if launch.is_main_process():
    print(f"devices:              {r['built'].mesh.size} x"
          f" {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"model:                {config.model.family},"
          f" {r['num_params']:,} parameters")
    print(f"global batch:         {r['batch']} (eval {r['eval_batch']})")
    print(f"first step (compile): {r['first_step_s']:.2f} s")
    print(f"train:                {r['train_images_s']:,.1f} images/s,"
          f" {1 / r['step_s']:.2f} steps/s, loss {r['loss']:.3f}")
    if r["flops_per_step"]:
      bound = ("" if r["flops_exact"] else
               "; a while loop's body counted once: lower bounds")
      print(f"train step FLOPs:     {r['flops_per_step'] / 1e9:,.1f} GFLOP"
            " (products and convolutions, from the jaxpr),"
            f" {r['flops_per_step'] / r['step_s'] / 1e9:,.1f}"
            f" GFLOP/s achieved{bound}")
    if _EVAL_BATCHES.value:
      print(f"eval first batch:     {r['eval_first_s']:.2f} s (with"
            " compilation)")
      print(f"eval:                 {r['eval_images_s']:,.1f} images/s"
            f" ({r['eval_batch_s']:.3f} s per batch of {r['eval_batch']})")
    if sample_line:
      print(sample_line)
    print(f"peak host memory:     {_peak_rss_gib():.2f} GiB (max RSS)")


if __name__ == "__main__":
  launch.run(main)
