"""Convolutions written the way XLA computes them fastest, same functions.

Transposed convolutions are computed as sub-pixel convolutions.

A stride-s transposed convolution produces output pixel ``s * m + a`` from
the input pixels near ``m``, through the kernel taps that line up with phase
``a``. Grouping the taps by phase turns it into one stride-1 convolution with
``s * s * features`` output channels followed by depth-to-space (the
"sub-pixel" convolution of Shi et al. 2016), which computes exactly the same
function. ``SubPixelConvTranspose`` keeps ``flax.linen.ConvTranspose``'s
parameters (same names, shapes, initialisers), so it is a drop-in
replacement: the same parameter count, the same initial values, and
checkpoints of either load into the other.

Why: on XLA:CPU the gradient of ``ConvTranspose`` (a convolution with an
input dilated by the stride) is several times slower than that of a stride-1
convolution (100 ms vs 20 ms for 64 -> 32 channels, 4x4, stride 2, batch 128,
2 cores); the stride-1 form wastes no multiplications on the dilation's
zeros. On GPUs cuDNN runs both forms natively, and the stride-1 convolution
with more output channels is the better-shaped one of the two. The stride-1
convolution itself is computed as ``Conv``'s is (``conv2d``, below).

``Conv`` is ``flax.linen.Conv`` (same parameters, names and initialisers)
with two changes in how XLA is asked to compute it, neither changing the
function:

* a 1x1 stride-1 convolution is a matrix product over the channel axis, and
  is written as one 2-D product over all positions (``dot_general``; its
  gradients are then 2-D products too, with no transposed copy);
* on the CPU backend, the gradient with respect to the kernel is a
  convolution over groups of images (``kernel_grad_group``), summed.
  XLA:CPU's kernel gradient falls off a cliff as the layer grows (a large
  reduction over batch x height x width): for a 3x3 64 -> 64 convolution
  at 28x28 it took 56 ms at batch 16, 710 ms at 32 and 914 ms at 64 on
  the machine of 2026-11-28, and 920 ms for 3x3 128 -> 128 at 32x32 batch
  128 on an AVX-512 machine on 2026-11-29, 260-275 ms in groups. The
  earlier remedy, the im2col matrix product (patches^T @ dy, 68 / 96 / 205
  ms in the first example), is kept as an option: ``$GM_JAX_CPU_KERNEL_GRAD``
  is "conv" (the default: grouped convolutions), "rule" (the matrix
  product where ``cpu_matmul_kernel_grad`` says the ungrouped convolution
  falls off its cliff: both channel counts >= 64, >= 16,384 output
  positions and positions x the smaller channel count >= 1.5e6, fitted to
  these figures, conv / matmul ms, 2 cores, 2026-11-29 morning: 3x3
  32 -> 32 at 14x14 B 32: 9.5 / 11.7, at 28x28 B 64: 66 / 158; 3x3 64 ->
  64 at 32x32 B 16: 59 / 125, at 28x28 B 32: 303 / 224, at 32x32 B 32:
  631 / 243; 3x3 128 -> 128 at 8x8 B 128: 104 / 153, at 32x32 B 16: 804
  / 308; 3x3 256 -> 256 at 32x32 B 16: 3,374 / 952; 4x4 stride 2 32 -> 64
  at 14x14 B 128: 18 / 30; 3x3 64 -> 2: 32 / 242; Gated PixelCNN's 1x2
  64 -> 128 at 28x28 B 64: 678 / 169, its 2x3 64 -> 128: 1,382 / 365) or
  "matmul" (every kernel gradient a matrix product). Groups are sized to
  stay under that machine's cliff (<= 1e6 positions x channels, where the
  convolution won there), and on the AVX-512 machine the grouped
  convolution beat the matrix product on every layer the rule sends to
  it, by 1.2-2.2x (benchmarks/README.md). The input gradient and the
  forward convolution stay whole convolutions (they are fast);
* on the CPU backend, the derivative is written out (``cpu_conv``) so that
  every gradient convolution is already in XLA:CPU's canonical NHWC / HWIO
  form. XLA canonicalises JAX's permuted gradient convolutions itself, but
  only in the entry computation; inside a loop (``lax.scan``: scanned
  layers, gradient accumulation) they ran on its naive emitter, 3-5x
  slower for a whole Glow step.

Accelerators keep XLA's convolutions unchanged (cuDNN's kernel gradients are
fast); the choice is made at trace time from ``jax.default_backend()``.

Which library runs the convolutions is a compile option, not a formulation:
XLA:CPU hands convolutions, matrix products and reductions to YNNPACK, and
for most of these models' convolutions its own (Eigen) convolution is
faster; without gradients (evaluation, sampling) XLA's own kernels for the
rest are faster too. ``cpu_compiler_options`` is what gm_jax's jits compile
with (``train.cpu_convolutions`` and ``train.cpu_forward_convolutions``,
see there).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def _transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
  """The (before, after) zero padding of the stride-dilated input that
  ``jax.lax.conv_transpose`` applies for ``padding`` (transpose_kernel=False)."""
  if padding == "SAME":
    pad_len = k + s - 2
    before = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
  elif padding == "VALID":
    pad_len = k + s - 2 + max(k - s, 0)
    before = k - 1
  else:
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
  return before, pad_len - before


def _phase_taps(k: int, s: int, n: int, padding: str):
  """For one spatial axis of input size n: the taps of each output phase.

  Output o = s * m + a reads, through tap t, the input pixel m + d with
  d = (a + t - before) / s whenever that is an integer. Returns (index, lo,
  num_windows, out_size): ``index[a, p]`` is the tap for phase a at window
  position p (window covering input pixels m + lo .. m + lo + P - 1), or k
  (a zero tap) where that phase has none; ``num_windows`` windows produce
  ``s * num_windows >= out_size`` outputs, cropped to ``out_size``.
  """
  before, after = _transpose_padding(k, s, padding)
  out_size = (n - 1) * s + 1 + before + after - k + 1
  offsets = {(a, t): (a + t - before) // s for a in range(s) for t in range(k)
             if (a + t - before) % s == 0}
  lo = min(offsets.values())
  width = max(offsets.values()) - lo + 1
  index = np.full((s, width), k, np.int32)
  for (a, t), d in offsets.items():
    index[a, d - lo] = t
  return index, lo, -(-out_size // s), out_size


# On CPU, a transposed convolution whose phases use fewer taps than their
# union (e.g. 4x4 stride 2: 2 x 2 taps per phase, a 3 x 3 union) runs one
# convolution per phase once it has this many output channels (see
# ``SubPixelConvTranspose``).
CPU_PHASE_MIN_FEATURES = 16


def _phase_windows(index: np.ndarray, k: int) -> list[tuple[int, int]]:
  """(first window position, number of taps) of each phase: a phase's
  taps are consecutive positions of the window (tap t of phase a sits at
  (a + t - before) / s - lo, and its taps are s apart)."""
  windows = []
  for row in index:
    valid = np.flatnonzero(row != k)
    windows.append((int(valid[0]), len(valid)) if len(valid) else (0, 0))
  return windows


class SubPixelConvTranspose(nn.Module):
  """``nn.ConvTranspose(features, kernel_size, strides, padding)`` as
  stride-1 convolutions and depth-to-space. NHWC; padding "SAME" or
  "VALID"; ``kernel_grad`` as ``Conv``'s (every convolution is computed by
  ``conv2d``).

  Two forms of the same function: one convolution to ``s_h * s_w *
  features`` channels over the union of the phases' windows, or one
  convolution per phase over its own taps (``by_phase``; None chooses:
  on CPU the per-phase form where the union holds taps some phase does not
  use and there are at least ``CPU_PHASE_MIN_FEATURES`` features, else the
  union). For the VAE's 4x4 stride-2 64 -> 32 layer the union is 3 x 3
  taps against 2 x 2 per phase, 2.25x the multiply-adds: its gradient took
  18 ms as the union and 10 ms per phase (batch 128, 2 cores), while for
  its 32 -> 1 head the four one-channel convolutions lost (7.1 against
  5.2 ms). Accelerators keep the single convolution, one larger kernel
  instead of s_h * s_w small ones.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (2, 2)
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  precision: Optional[jax.lax.Precision] = None
  kernel_grad: str = "auto"  # as Conv's
  by_phase: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    batch, h, w, cin = x.shape
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, cin, self.features), jnp.float32)
    kernel = kernel.astype(x.dtype)
    idx_h, lo_h, m_h, out_h = _phase_taps(kh, sh, h, self.padding)
    idx_w, lo_w, m_w, out_w = _phase_taps(kw, sw, w, self.padding)
    ph, pw = idx_h.shape[1], idx_w.shape[1]
    phases_h, phases_w = _phase_windows(idx_h, kh), _phase_windows(idx_w, kw)
    by_phase = self.by_phase
    if by_phase is None:
      used = (sum(n for _, n in phases_h) * sum(n for _, n in phases_w))
      by_phase = (jax.default_backend() == "cpu"
                  and self.features >= CPU_PHASE_MIN_FEATURES
                  and used < sh * sw * ph * pw)

    # Window m covers input pixels m + lo + first .. m + lo + first + n - 1
    # for m < num_windows: the padding of the input to exactly those
    # pixels (never negative for "SAME" and "VALID": tests/
    # test_convolutions.py sweeps kernels, strides and sizes).
    def window_padding(lo, first, n, windows, size):
      return -(lo + first), windows - 1 + lo + first + n - 1 - (size - 1)

    def convolve(sub, pads):
      assert min(min(p) for p in pads) >= 0, pads
      return conv2d(x, sub, (1, 1), pads, self.precision, self.kernel_grad)

    if by_phase:
      rows = []
      for a_h, (first_h, n_h) in enumerate(phases_h):
        row = []
        for a_w, (first_w, n_w) in enumerate(phases_w):
          if n_h == 0 or n_w == 0:  # a kernel smaller than the stride
            row.append(jnp.zeros((batch, m_h, m_w, self.features), x.dtype))
            continue
          taps_h = idx_h[a_h, first_h:first_h + n_h]
          taps_w = idx_w[a_w, first_w:first_w + n_w]
          row.append(convolve(
              kernel[taps_h[:, None], taps_w[None, :]],
              (window_padding(lo_h, first_h, n_h, m_h, h),
               window_padding(lo_w, first_w, n_w, m_w, w))))
        rows.append(jnp.stack(row, axis=3))  # [B, m_h, m_w, s_w, F]
      y = jnp.stack(rows, axis=2)  # [B, m_h, s_h, m_w, s_w, F]
    else:
      # A zero tap at index k on each axis, then gather per (phase,
      # position): [a_h, p_h, a_w, p_w, cin, f] -> [p_h, p_w, cin,
      # (a_h, a_w, f)].
      padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
      sub = padded[idx_h[:, :, None, None], idx_w[None, None, :, :]]
      sub = sub.transpose(1, 3, 4, 0, 2, 5).reshape(
          ph, pw, cin, sh * sw * self.features)
      # The stride-1 convolution is computed like ``Conv``'s: an earlier
      # im2col matrix product here cost 10x more than XLA:CPU's own
      # convolution for the VAE's 32 -> 1 head (benchmarks/README.md).
      y = convolve(sub, (window_padding(lo_h, 0, ph, m_h, h),
                         window_padding(lo_w, 0, pw, m_w, w)))
      y = y.reshape(batch, m_h, m_w, sh, sw, self.features)
      y = y.transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(batch, m_h * sh, m_w * sw, self.features)[:, :out_h, :out_w]
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


# The environment variable that chooses the kernel gradient of every
# "auto" layer on CPU: "conv" (the default; grouped convolutions), "rule"
# (the im2col matrix product past ``cpu_matmul_kernel_grad``'s cliff) or
# "matmul" (always the matrix product); see the module docstring.
CPU_KERNEL_GRAD_ENV = "GM_JAX_CPU_KERNEL_GRAD"
CPU_KERNEL_GRAD_CHOICES = ("conv", "rule", "matmul")


def cpu_kernel_grad_choice() -> str:
  """The kernel-gradient choice of the CPU backend's "auto" layers, from
  ``$GM_JAX_CPU_KERNEL_GRAD`` (read when a layer is traced)."""
  value = os.environ.get(CPU_KERNEL_GRAD_ENV, "conv") or "conv"
  if value not in CPU_KERNEL_GRAD_CHOICES:
    raise ValueError(f"{CPU_KERNEL_GRAD_ENV}={value!r}: expected one of"
                     f" {CPU_KERNEL_GRAD_CHOICES}.")
  return value


# Where, with $GM_JAX_CPU_KERNEL_GRAD=rule, a kernel gradient is computed as
# an im2col matrix product (see the module docstring for the measurements
# behind these).
CPU_MATMUL_MIN_CHANNELS = 64
CPU_MATMUL_MIN_POSITIONS = 16_384
CPU_MATMUL_MIN_POSITION_CHANNELS = 1.5e6


def cpu_matmul_kernel_grad(positions: int, kernel_hw: Sequence[int],
                           in_channels: int, out_channels: int) -> bool:
  """Whether XLA:CPU computes this layer's kernel gradient faster as the
  im2col matrix product than as its own convolution: ``positions`` output
  positions (batch x height x width of the output) of a ``kernel_hw``
  kernel from ``in_channels`` to ``out_channels``."""
  del kernel_hw  # the cliff showed for 1x2, 2x3 and 3x3 kernels alike
  channels = min(in_channels, out_channels)
  return (channels >= CPU_MATMUL_MIN_CHANNELS
          and positions >= CPU_MATMUL_MIN_POSITIONS
          and positions * channels >= CPU_MATMUL_MIN_POSITION_CHANNELS)

# cpu_conv's kernel gradient as a convolution runs over images in groups
# of at most this many output positions (batch x height x width), and at
# most CPU_KERNEL_GRAD_GROUP_WORK / min(Cin, Cout): XLA:CPU's kernel
# gradient slows down per FLOP past that, and the sum of the groups'
# gradients is the same gradient. Kernel gradients alone (2 cores,
# AVX-512, 2026-11-29), whole / in groups: 3x3 128 -> 128 at 32x32 batch
# 128: 920 / 260-275 ms; 3x3 256 -> 256 at 16x16 batch 128: 417 ms in
# groups of 16,384 positions, 230-268 ms in groups of 2,048-8,192; 3x3
# 64 -> 64 at 28x28 batch 64: 56 / 28-31 ms. The second bound keeps each
# group under the cliff of the machine the im2col rule above was fitted on
# (positions x channels >= 1.5e6). The input gradient and the forward
# convolution do not gain, so they stay whole. Both cliffs are YNNPACK's:
# with the convolutions on XLA's own kernels (train.cpu_convolutions
# "eigen", the default) the groups are neutral, within 7% of one group on
# every layer measured (920 ms case: 786 grouped / 748 whole, forward and
# both gradients; benchmarks/README.md, eighth pass). They stay for
# "ynnpack".
CPU_KERNEL_GRAD_GROUP_POSITIONS = 16_384
CPU_KERNEL_GRAD_GROUP_WORK = 1e6
# Up to this many whole groups are unrolled, more run in a loop: unrolled,
# the groups of iddpm_cifar10's batch of 128 (19 per layer) took its train
# step's compilation from 27 to 39 s; a loop costs some speed (3x3 64 ->
# 64 at 28x28 batch 64, 4 groups: kernel gradient 29 ms unrolled, 47 ms
# looped).
CPU_KERNEL_GRAD_UNROLL = 4


def kernel_grad_group(positions_per_image: int, in_channels: int,
                      out_channels: int) -> int:
  """Images per group of cpu_conv's kernel gradient as a convolution."""
  limit = min(CPU_KERNEL_GRAD_GROUP_POSITIONS,
              CPU_KERNEL_GRAD_GROUP_WORK / min(in_channels, out_channels))
  return max(1, int(limit) // positions_per_image)


_DIMS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, strides, padding, precision):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_DIMS,
      precision=precision)


def _patches(x, kernel_shape, strides, padding, out_hw):
  """im2col: [B, Ho, Wo, kh * kw * Cin], taps in the kernel's (kh, kw)
  order, each tap the strided window of the zero-padded input it meets."""
  (kh, kw), (sh, sw), (ho, wo) = kernel_shape, strides, out_hw
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  return jnp.concatenate([
      jax.lax.slice(x, (0, i, j, 0),
                    (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                     x.shape[3]), (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)], axis=-1)


def _conv_specs(x, kernel, strides, padding, precision, specs):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=specs,
      precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def cpu_conv(x, kernel, strides, padding, precision=None,
             kernel_tangent="conv"):
  """``lax.conv_general_dilated`` (NHWC, HWIO) whose reverse-mode
  derivatives XLA:CPU runs on its fast path wherever the layer is, loops
  included; ``kernel_tangent`` "matmul" takes the kernel gradient as the
  im2col matrix product, "conv" as a convolution.

  Why the derivative is written out: JAX transposes a convolution into
  convolutions with permuted dimension numbers (the input gradient with the
  kernel's I and O swapped, the kernel gradient with batch and feature
  swapped). XLA:CPU's ``convolution-canonicalization`` pass rewrites those
  into its fast NHWC / HWIO form with explicit transposes, but it only
  visits the entry computation: inside a while loop (``lax.scan``: scanned
  layers, gradient accumulation) they stay on the naive loop emitter, which
  was 3.6x slower for a whole Glow step. Here the tangents are
  convolutions laid out so that their transposes are already canonical:
  the input tangent reads the kernel as [kh, kw, O, I] ("HWOI"), so its
  transpose reads [kh, kw, O, I] as HWIO of the reversed kernel; the kernel
  tangent computes on the input as [C, H, W, N] and writes [Ho, Wo, N, C],
  so its transpose is a convolution of the input (batch = C, features = N)
  with the output gradient (window Ho x Wo, I = N, O = C) into
  [Cin, kh, kw, Cout], what the canonicalisation pass would have built.
  Forward mode gets the same tangents (correct, computed off the fast path
  inside loops; nothing here uses forward mode in a loop).
  """
  del kernel_tangent
  return _lax_conv(x, kernel, strides, padding, precision)


@functools.partial(cpu_conv.defjvp, symbolic_zeros=True)
def _cpu_conv_jvp(strides, padding, precision, kernel_tangent, primals,
                  tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = _lax_conv(x, kernel, strides, padding, precision)
  dy = jnp.zeros_like(y)
  if not isinstance(dx, SymbolicZero):
    dy = dy + _conv_specs(dx, kernel.transpose(0, 1, 3, 2), strides,
                          padding, precision, ("NHWC", "HWOI", "NHWC"))
  if not isinstance(dkernel, SymbolicZero):
    kh, kw, cin, cout = kernel.shape
    if kernel_tangent == "matmul":
      patches = _patches(x, (kh, kw), strides, padding, y.shape[1:3])
      # Linear in dkernel; reverse mode transposes it into patches^T @ dy.
      dy = dy + dot_general(patches, dkernel.reshape(kh * kw * cin, cout),
                            (((3,), (0,)), ((), ())), precision=precision)
    else:
      def kernel_tangent(images):
        return _conv_specs(
            images.transpose(3, 1, 2, 0), dkernel.transpose(2, 0, 1, 3),
            strides, padding, precision,
            ("CHWN", "IHWO", "HWNC")).transpose(2, 0, 1, 3)
      # In groups of images (see CPU_KERNEL_GRAD_GROUP_POSITIONS): reverse
      # mode sums the groups' kernel gradients. Up to
      # CPU_KERNEL_GRAD_UNROLL groups are separate convolutions; more are a
      # loop over the whole groups (one compiled convolution, so that large
      # batches do not lengthen the compilation) and one more for the rest.
      group = kernel_grad_group(y.shape[1] * y.shape[2], cin, cout)
      whole = x.shape[0] // group * group
      parts = []
      if whole // group > CPU_KERNEL_GRAD_UNROLL:
        grouped = x[:whole].reshape((-1, group) + x.shape[1:])
        parts.append(jax.lax.map(kernel_tangent, grouped).reshape(
            (whole,) + y.shape[1:]))
      else:
        parts += [kernel_tangent(x[start:start + group])
                  for start in range(0, whole, group)]
      if whole < x.shape[0]:
        parts.append(kernel_tangent(x[whole:]))
      dy = dy + (parts[0] if len(parts) == 1
                 else jnp.concatenate(parts, axis=0))
  return y, dy


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
  """``lax.dot_general``, with a layer's product over images computed as one
  2-D matrix product: where ``lhs`` contracts its trailing axes with
  ``rhs``'s leading ones and has no batch axes (a dense layer or a 1x1
  convolution on [B, H, W, C]), the leading axes are merged first.

  The same function. Why: JAX's derivative of the 4-D product takes the
  kernel gradient as a contraction over (batch, height, width), and XLA:CPU
  computed it with a transposed copy of the output gradient, off its fast
  path. 1x1 convolution at 28x28, batch 64, forward and both gradients, 2
  cores (AVX-512, 2026-11-30): 64 -> 128 43-61 ms -> 20 ms, 128 -> 64 29 ->
  22 ms, 64 -> 64 16.6 -> 12.5 ms. Merging leading axes of a contiguous
  array is free on every backend, and on a GPU the product is the same
  cuBLAS call either way. Flax's ``Dense`` and ``DenseGeneral`` take this
  as ``dot_general=``.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  free = lhs.ndim - n
  if (lhs_batch or rhs_batch or free < 2
      or tuple(lhs_contract) != tuple(range(free, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers,
                               precision=precision,
                               preferred_element_type=preferred_element_type,
                               **kwargs)
  inner = int(np.prod(lhs.shape[free:], dtype=np.int64))
  out = jax.lax.dot_general(
      lhs.reshape(-1, inner), rhs.reshape(inner, -1),
      (((1,), (0,)), ((), ())), precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(lhs.shape[:free] + rhs.shape[n:])


KERNEL_GRADS = ("auto", "matmul", "conv", "xla")


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: Sequence[tuple[int, int]], precision=None,
           kernel_grad: str = "auto") -> jax.Array:
  """``lax.conv_general_dilated`` of NHWC ``x`` with an HWIO ``kernel``
  (explicit, non-negative padding), computed the way each backend runs it
  best: a 1x1 stride-1 unpadded layer as a matrix product; elsewhere a
  convolution whose kernel gradient on CPU follows ``kernel_grad`` ("auto":
  ``$GM_JAX_CPU_KERNEL_GRAD`` and ``cpu_matmul_kernel_grad``; "matmul",
  "conv"; "xla": JAX's own derivative). ``Conv`` and
  ``SubPixelConvTranspose`` both compute their convolution here."""
  if kernel_grad not in KERNEL_GRADS:
    raise ValueError("kernel_grad must be 'auto', 'matmul', 'conv' or "
                     f"'xla', got {kernel_grad!r}.")
  kh, kw = kernel.shape[:2]
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if (kh, kw) == (1, 1) and strides == (1, 1) and padding == ((0, 0),) * 2:
    return dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())),
                       precision=precision)
  mode = kernel_grad
  if mode == "auto":
    out_hw = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(
        x.shape[1:3], padding, (kh, kw), strides, strict=True)]
    choice = (cpu_kernel_grad_choice() if jax.default_backend() == "cpu"
              else "conv")
    mode = ("matmul" if choice == "matmul" or (
        choice == "rule" and cpu_matmul_kernel_grad(
            x.shape[0] * out_hw[0] * out_hw[1], (kh, kw), x.shape[-1],
            kernel.shape[-1])) else "conv")
  if mode == "xla" or (mode == "conv" and jax.default_backend() != "cpu"):
    return _lax_conv(x, kernel, strides, padding, precision)
  return cpu_conv(x, kernel, strides, padding, precision, mode)


class Conv(nn.Module):
  """``nn.Conv`` for NHWC images, computed the way each backend runs best
  (see the module docstring). Same parameters ("kernel" [kh, kw, Cin,
  features], "bias" [features]), initialisers and auto-name ("Conv_i").

  Attributes beyond ``nn.Conv``'s usual ones: ``mask`` multiplies the kernel
  (as in ``nn.Conv``); ``kernel_grad`` is "auto" (backend rule), "matmul" or
  "conv" (force one formulation), or "xla" (``lax.conv_general_dilated``
  with JAX's own derivative: the reference, for tests and measurements).
  """

  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int], None] = (1, 1)
  padding: Union[str, Sequence[tuple[int, int]]] = "SAME"
  use_bias: bool = True
  mask: Optional[jax.Array] = None
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  precision: Optional[jax.lax.Precision] = None
  kernel_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input, got shape {x.shape}.")
    kh, kw = self.kernel_size
    strides = self.strides if self.strides is not None else 1
    strides = ((int(strides),) * 2 if isinstance(strides, int)
               else tuple(int(s) for s in strides))
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    if self.mask is not None:
      kernel = kernel * self.mask
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    if isinstance(self.padding, str):
      padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides,
                                        self.padding)
    else:
      padding = self.padding
    y = conv2d(x, kernel, strides, padding, self.precision, self.kernel_grad)
    if bias is not None:
      y = y + bias
    return y


class WeightNormed(nn.Module):
  """Weight normalisation (Salimans & Kingma, 2016) of a linear layer, with
  its data-dependent initialisation.

  y = g * layer(x; v) / ||v|| + b, the norm per output channel over every
  other axis of v (the layer's "kernel"; layer(x; v) is linear in v, so this
  is the layer with kernel g v / ||v||). ``layer`` must be bias-free, with
  its output channels last: ``Conv``, ``SubPixelConvTranspose`` or
  ``nn.Dense`` with ``use_bias=False``.

  Initialisation: g and b are set from the batch that ``init`` sees, so
  that every output channel starts with mean 0 and standard deviation
  ``init_scale`` over that batch (g = init_scale / std(t), b = -mean(t) g,
  t = layer(x; v) / ||v||; g = init_scale where t is constant). Parameters: the layer's own ("layer/kernel"),
  "scale" g and "bias" b, each [features].
  """

  layer: nn.Module
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.layer(x)
    v = self.layer.variables["params"]["kernel"]
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1))))
    t = y / norm.astype(y.dtype)
    features = y.shape[-1]
    if self.is_initializing():
      axes = tuple(range(t.ndim - 1))
      mean = jnp.mean(t, axis=axes).astype(jnp.float32)
      var = jnp.var(t, axis=axes).astype(jnp.float32)
      # A channel constant on the init batch (e.g. a shifted conv at a
      # resolution where it only sees padding) keeps the unit scale
      # instead of 1 / sqrt(0).
      std = jnp.where(var > 1e-8, jnp.sqrt(var), 1.0)
      scale = self.param("scale", lambda *_: self.init_scale / std)
      bias = self.param("bias", lambda *_: -mean * self.init_scale / std)
    else:
      scale = self.param("scale", nn.initializers.ones, (features,),
                         jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (features,),
                        jnp.float32)
    return t * scale.astype(t.dtype) + bias.astype(t.dtype)


# ----------------------------------------------------------------------------
# Which library runs XLA:CPU's convolutions.

# "eigen": XLA:CPU's own convolution, with YNNPACK kept for matrix products
# and reductions; "ynnpack": XLA's default, YNNPACK for all three; "xla":
# YNNPACK off, XLA's own kernels for all three. Forward / forward + both
# gradients, ms, 2 cores (AMD EPYC, AVX-512, 2026-11-29), YNNPACK -> Eigen:
# 3x3 64 -> 64 at 32x32 batch 16: 12.8 / 40.3 -> 7.1 / 22.9; at 28x28 batch
# 64: 39.5 / 137 -> 21.5 / 83.4; 4x4 64 -> 64 at 14x14 batch 128: 34.4 /
# 111 -> 18.5 / 59.2; 3x3 128 -> 128 at 32x32 batch 16: 25.7 / 84.3 -> 24.9
# / 77.0. Eigen loses where few output channels meet many inputs, as in
# every coupling layer's output convolution of a flow: 3x3 128 -> 4 at
# 14x14 batch 32: 1.0 / 4.7 -> 2.1 / 7.0. Without gradients, YNNPACK's
# matrix products and reductions stop paying as well: "xla" evaluated the
# IWAE bound (k = 1000, conv VAE) in 5.46 s against "eigen"'s 5.94 s, and
# ran DDIM-50 in 7.94 against 8.88 s. Whole steps are in
# benchmarks/README.md ("seventh pass", "eighth pass").
CPU_CONVOLUTIONS = ("eigen", "ynnpack", "xla")
_YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSION_TYPES = {
    "eigen": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla": "",  # no fusion type: nothing goes to YNNPACK
}


def cpu_compiler_options(convolutions: str) -> Optional[dict[str, str]]:
  """The ``compiler_options`` of a ``jax.jit`` whose convolutions run on
  ``convolutions`` ("eigen", "ynnpack" or "xla", see ``CPU_CONVOLUTIONS``);
  None (XLA's defaults) off CPU, for "ynnpack", when ``$XLA_FLAGS`` already
  sets the library fusions (the user's own choice wins), or when this
  jaxlib does not take the option (a warning says so, once)."""
  if convolutions not in CPU_CONVOLUTIONS:
    raise ValueError(f"cpu_convolutions={convolutions!r}: expected one of"
                     f" {CPU_CONVOLUTIONS}.")
  if (convolutions == "ynnpack" or jax.default_backend() != "cpu"
      or _YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", "")):
    return None
  return _library_options(_YNN_FUSION_TYPES[convolutions])


@functools.cache
def _library_options(fusion_types: str) -> Optional[dict[str, str]]:
  """The option that gives YNNPACK only ``fusion_types``, if this jaxlib
  compiles with it (an experimental option that a release may rename)."""
  options = {_YNN_FUSION_OPTION: fusion_types}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(
        np.float32(0)).compile()
  except Exception as e:  # noqa: BLE001 -- any refusal means: not supported
    logging.warning("This jaxlib does not take the compile option %s (%s);"
                    " the kernels stay XLA's default ones.",
                    _YNN_FUSION_OPTION, str(e).splitlines()[0])
    return None
  return options
