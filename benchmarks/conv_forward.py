"""Forward 3x3 convolutions on this machine: XLA's convolution against the
im2col formulation (the nine shifted copies concatenated, one matrix
product), under each CPU kernel library of ``train.cpu_convolutions``.

It answers whether a forward-only function (DDIM sampling, evaluation)
could go faster by rewriting its convolutions, and how close XLA's own
kernels run to the machine's peak: the figure a sampler's GFLOP/s (printed
by ``bench_train.py --samples``) is compared with.

  python benchmarks/conv_forward.py
  python benchmarks/conv_forward.py --shapes=8x32x64x64,128x32x64x64 --reps=20
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gm_jax import convolutions

# (batch, size, in channels, out channels): the DDIM side-by-side U-Net's
# 3x3 layers (width 64, 8 images) and one training batch.
SHAPES = ("8x32x64x64,8x32x64x128,8x16x128x128,8x8x128x128,8x32x128x128,"
          "128x32x64x64")


def conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col(x, k):
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([padded[:, i:i + h, j:j + w, :]
                          for i in range(3) for j in range(3)], axis=-1)
  return (cols.reshape(-1, 9 * c) @ k.reshape(9 * c, -1)).reshape(
      b, h, w, -1)


def median_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=SHAPES,
                      help="comma-separated BxSxCxO (batch, size, in, out)")
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}; median of {args.reps}")
  print("| shape (B, S, C, O) | GFLOP | library | conv ms (GFLOP/s) |"
        " im2col ms (GFLOP/s) |\n|---|---|---|---|---|")
  for spec in args.shapes.split(","):
    b, s, c, o = (int(v) for v in spec.split("x"))
    x = jax.random.normal(jax.random.PRNGKey(0), (b, s, s, c))
    k = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o))
    gflop = 2 * b * s * s * 9 * c * o / 1e9
    np.testing.assert_allclose(jax.jit(conv)(x, k), jax.jit(im2col)(x, k),
                               rtol=1e-3, atol=1e-3)
    for library in convolutions.CPU_CONVOLUTIONS:
      options = convolutions.cpu_compiler_options(library)
      a = median_ms(jax.jit(conv, compiler_options=options), x, k,
                    reps=args.reps)
      m = median_ms(jax.jit(im2col, compiler_options=options), x, k,
                    reps=args.reps)
      print(f"| {b}x{s}x{c}x{o} | {gflop:.3f} | {library} | {a:.2f}"
            f" ({gflop / a * 1e3:.0f}) | {m:.2f} ({gflop / m * 1e3:.0f}) |",
            flush=True)


if __name__ == "__main__":
  main()
