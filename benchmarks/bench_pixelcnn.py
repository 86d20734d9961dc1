"""Speed of the autoregressive family: training throughput and sampling time.

For each architecture (PixelCNN and Gated PixelCNN as in their MNIST
configs, PixelCNN++ as in pixelcnnpp_mnist or, with ``--cifar``, the paper's
CIFAR-10 net) prints the first train step's compile time, train images/s of
the jitted loss + grad + Adam step after warm-up, and the time to draw
``--num_samples`` images (64 by default) with the jitted pixel-by-pixel
sampler (compile excluded, reported separately).

  python benchmarks/bench_pixelcnn.py            # all three, 28x28 MNIST
  python benchmarks/bench_pixelcnn.py --small    # CPU: 8 samples, few steps
  python benchmarks/bench_pixelcnn.py --cifar    # PixelCNN++ at paper size
  python benchmarks/bench_pixelcnn.py --models=pixelcnn,gated_pixelcnn

Runs on whatever devices exist (the batch is split over all of them).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gm_jax import autoregressive, config_lib


def bench(name, model_config, batch_size, steps, num_samples):
  """Prints compile time, train images/s and sampling time for one model."""
  family = autoregressive.make(model_config)
  shape = tuple(model_config.image_shape)
  devices = jax.devices()
  batch_size = max(batch_size // len(devices), 1) * len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  batch = {
      "image": jax.device_put(
          rng.integers(0, 256, (batch_size,) + shape, np.uint8), split),
      "label": jax.device_put(np.zeros(batch_size, np.int32), split),
  }
  tx = optax.adam(1e-3)
  params = jax.jit(family.init, out_shardings=replicated)(
      jax.random.PRNGKey(0), batch)
  opt_state = tx.init(params)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  @jax.jit
  def train_step(params, opt_state, batch, key, step):
    (loss, _), grads = jax.value_and_grad(family.loss, has_aux=True)(
        params, batch, key, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  params, opt_state, loss = train_step(params, opt_state, batch, key,
                                       jnp.int32(0))
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  params, opt_state, loss = train_step(params, opt_state, batch, key,
                                       jnp.int32(1))
  loss.block_until_ready()
  start = time.perf_counter()
  for step in range(steps):
    params, opt_state, loss = train_step(
        params, opt_state, batch, jax.random.fold_in(key, step),
        jnp.int32(step))
  loss.block_until_ready()
  train_s = (time.perf_counter() - start) / steps

  start = time.perf_counter()
  sample = jax.jit(family.sample, static_argnums=2).lower(
      params, key, num_samples).compile()
  sample_compile_s = time.perf_counter() - start
  start = time.perf_counter()
  sample(params, jax.random.PRNGKey(2)).block_until_ready()
  sample_s = time.perf_counter() - start
  print(f"{name:16s} {shape} params={num_params:,} batch={batch_size}: "
        f"first step {compile_s:.1f}s, train {batch_size / train_s:,.1f} "
        f"img/s ({train_s * 1e3:.0f} ms/step), sample {num_samples} in "
        f"{sample_s:.2f}s (compile {sample_compile_s:.1f}s)", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="CPU-sized: 8 samples, 3 timed steps")
  parser.add_argument("--cifar", action="store_true",
                      help="only PixelCNN++ with the paper's CIFAR-10 config")
  parser.add_argument("--models", default="pixelcnn,gated_pixelcnn,pixelcnnpp",
                      help="comma-separated subset of the three")
  parser.add_argument("--naive_sampling", action="store_true",
                      help="run the whole canvas per step (fast_sampling=False)")
  parser.add_argument("--num_samples", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args()
  num_samples = args.num_samples or (8 if args.small else 64)
  steps = args.steps or (3 if args.small else 20)
  print(f"devices: {jax.devices()}")
  if args.cifar:
    names = [("pixelcnnpp_cifar10", "pixelcnnpp_cifar10")]
  else:
    names = [("pixelcnn", "pixelcnn_mnist"),
             ("gated_pixelcnn", "gated_pixelcnn_mnist"),
             ("pixelcnnpp", "pixelcnnpp_mnist")]
  wanted = set(args.models.split(","))
  for name, config_name in names:
    if not args.cifar and name not in wanted:
      continue
    config = config_lib.load(f"configs/{config_name}.py")
    if args.naive_sampling:
      config.model.fast_sampling = False
    bench(name, config.model, args.batch_size or config.train.batch_size,
          steps, num_samples)


if __name__ == "__main__":
  main()
