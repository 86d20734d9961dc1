"""Benchmarks the diffusion family: train throughput, FLOPs/MFU, DDIM sampling.

Builds the model of configs/diffusion_cifar10.py (DDPM's 35.7M U-Net on
32x32x3) and measures, on the default device:

* the first train step (compile + run) time;
* train images/s of a jitted L_simple loss + grad + clip + Adam step, over a
  few timed steps after a warm-up, with block_until_ready;
* the model FLOPs of one train step, counted from its jaxpr
  (benchmarks/flops.py; XLA:GPU's own cost analysis leaves out the cuDNN and
  cuBLAS calls), hence achieved TFLOP/s and, given ``--peak_tflops`` (the
  device's dense peak for the compute dtype, e.g. 989 for an H100 SXM in
  bf16), the MFU;
* DDIM sampling time (``--sample_steps`` 50 by default) for ``--num_samples``
  images.

  python benchmarks/bench_diffusion.py                      # CPU-sized
  python benchmarks/bench_diffusion.py --small              # seconds on CPU
  python benchmarks/bench_diffusion.py --batch 128 --bf16 --num_samples 64 \
      --peak_tflops 989                                     # paper, on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops as flops_lib  # noqa: E402

from gm_jax import config_lib, diffusion  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4,
                      help="train batch (the paper uses 128)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed steps after the compiling one")
  parser.add_argument("--bf16", action="store_true",
                      help="bfloat16 compute, float32 parameters")
  parser.add_argument("--small", action="store_true",
                      help="width 32 instead of 128 (a quick CPU check)")
  parser.add_argument("--num_samples", type=int, default=1)
  parser.add_argument("--sample_steps", type=int, default=50)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak TFLOP/s for the MFU (0: not shown)")
  args = parser.parse_args()

  config = config_lib.load(
      "configs/diffusion_cifar10.py" + (":bf16" if args.bf16 else ""))
  model = config.model
  model.unlock()
  model.sampler = "ddim"
  model.sample_steps = args.sample_steps
  if args.small:
    model.width = 32
  family = diffusion.make(model)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), dtype"
        f" {model.dtype}, width {model.width}, batch {args.batch}")

  key = jax.random.key(0)
  batch = {
      "image": jax.random.randint(key, (args.batch,) + tuple(
          model.image_shape), 0, 256).astype(jnp.uint8),
      "label": jnp.zeros((args.batch,), jnp.int32),
  }
  params = jax.jit(family.init)(key, batch)
  print(f"parameters: {diffusion.count_params(params):,}")
  tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                   optax.adam(config.optim.learning_rate))
  opt_state = tx.init(params)

  def train_step(params, opt_state, batch, key):
    (loss, _), grads = jax.value_and_grad(family.loss, has_aux=True)(
        params, batch, key, jnp.int32(0))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.perf_counter()
  jitted = jax.jit(train_step, donate_argnums=(0, 1))
  flops, _ = flops_lib.traced_flops(
      jitted.trace(params, opt_state, batch, key))
  compiled = jitted.lower(params, opt_state, batch, key).compile()
  params, opt_state, loss = compiled(params, opt_state, batch, key)
  jax.block_until_ready(loss)
  print(f"first train step (compile + run): {time.perf_counter() - t0:.1f} s")
  for i in range(args.warmup):
    params, opt_state, loss = compiled(params, opt_state, batch,
                                       jax.random.fold_in(key, i))
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for i in range(args.steps):
    params, opt_state, loss = compiled(params, opt_state, batch,
                                       jax.random.fold_in(key, 100 + i))
  jax.block_until_ready(loss)
  step_time = (time.perf_counter() - t0) / args.steps
  print(f"train: {step_time * 1e3:.1f} ms/step, "
        f"{args.batch / step_time:.2f} images/s")
  if flops > 0:
    achieved = flops / step_time / 1e12
    print(f"train step FLOPs (products and convolutions): {flops / 1e9:.1f}"
          " GFLOP"
          f" ({flops / args.batch / 1e9:.2f} GFLOP/image); achieved"
          f" {achieved:.3f} TFLOP/s")
    if args.peak_tflops > 0:
      print(f"MFU: {100 * achieved / args.peak_tflops:.1f}% of"
            f" {args.peak_tflops:g} TFLOP/s")

  sample = jax.jit(family.sample, static_argnums=2)
  t0 = time.perf_counter()
  jax.block_until_ready(sample(params, key, args.num_samples))
  print(f"DDIM-{args.sample_steps} first call (compile + run):"
        f" {time.perf_counter() - t0:.1f} s")
  t0 = time.perf_counter()
  jax.block_until_ready(sample(params, jax.random.key(1), args.num_samples))
  elapsed = time.perf_counter() - t0
  print(f"DDIM-{args.sample_steps} sampling: {elapsed:.2f} s for"
        f" {args.num_samples} image(s) ({elapsed / args.num_samples:.2f}"
        " s/image)")


if __name__ == "__main__":
  main()
