"""Benchmark of the flow family: training throughput, compile time, sampling.

Times a jitted loss + grad + Adam step on a config's model (the batch
sharded over all devices, parameters replicated), its first-call compile
time, and the jitted sampler (``num`` samples at the config's temperature).

  python benchmarks/bench_flows.py                     # glow_mnist
  python benchmarks/bench_flows.py --config=realnvp_mnist --batch=64
  python benchmarks/bench_flows.py --config=glow_cifar10 --small  # CPU-sized

``--small`` keeps the config's architecture but shrinks it (K = 2 steps,
width 32) so a CPU run takes a minute or two.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gm_jax import config_lib, flows


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="glow_mnist",
                      help="a module in configs/, e.g. glow_cifar10")
  parser.add_argument("--batch", type=int, default=0,
                      help="global batch; 0 takes the config's")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--num_samples", type=int, default=64)
  parser.add_argument("--small", action="store_true",
                      help="shrink the model for CPU runs")
  args = parser.parse_args()

  config = config_lib.load(f"configs/{args.config}.py")
  model_config = config.model.copy_and_resolve_references()
  model_config.unlock()
  if args.small:
    model_config.steps_per_level = min(model_config.steps_per_level, 2)
    model_config.width = min(model_config.width, 32)
    model_config.num_res_blocks = min(model_config.num_res_blocks, 1)
  batch_size = args.batch or config.train.batch_size
  devices = jax.devices()
  batch_size = max(len(devices), batch_size - batch_size % len(devices))
  family = flows.make(model_config)
  mesh = Mesh(np.array(devices), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())

  h, w, c = model_config.image_shape
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, h, w, c), dtype=np.uint8)
  batch = {"image": jax.device_put(images, batch_sharding),
           "label": jax.device_put(np.zeros(batch_size, np.int32),
                                   batch_sharding)}
  tx = optax.adam(config.optim.learning_rate)
  params, init_time = _timed(
      jax.jit(family.init, out_shardings=replicated), jax.random.key(0), batch)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))

  @jax.jit
  def train_step(params, opt_state, batch, key):
    grad_fn = jax.value_and_grad(family.loss, has_aux=True)
    (loss, _), grads = grad_fn(params, batch, key, jnp.int32(0))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(1)
  (params, opt_state, loss), compile_time = _timed(
      train_step, params, opt_state, batch, key)
  start = time.perf_counter()
  for i in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, batch,
                                         jax.random.fold_in(key, i))
  jax.block_until_ready(loss)
  step_time = (time.perf_counter() - start) / args.steps

  sample = jax.jit(family.sample, static_argnums=2)
  _, sample_compile = _timed(sample, params, jax.random.key(2),
                             args.num_samples)
  _, sample_time = _timed(sample, params, jax.random.key(3), args.num_samples)

  print(f"config={args.config}{' (small)' if args.small else ''}"
        f" devices={len(devices)} x {devices[0].platform}"
        f" params={num_params:,} batch={batch_size}")
  print(f"init (incl. compile): {init_time:.2f} s")
  print(f"first train step (compile + run): {compile_time:.2f} s")
  print(f"train step: {step_time * 1e3:.1f} ms,"
        f" {batch_size / step_time:.1f} images/s (loss {float(loss):.3f})")
  print(f"sampling {args.num_samples} images: {sample_time:.3f} s"
        f" (first call incl. compile {sample_compile:.2f} s)")


if __name__ == "__main__":
  main()
