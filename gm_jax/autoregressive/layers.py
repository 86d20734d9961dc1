"""Causal convolutions for autoregressive image models.

Pixels are ordered in raster order (row by row, left to right) and, inside a
pixel, channel by channel (R -> G -> B). Two ways of keeping a convolution
causal live here:

* Masked convolutions (PixelCNN, van den Oord et al. 2016): the kernel is
  multiplied by a fixed 0/1 mask that zeroes every tap at or after the
  current pixel. Feature channels are split into as many contiguous groups as
  the image has channels; at the current pixel, output group g may read input
  group g' only if g' < g (mask "A", the first layer: the current channel is
  never seen) or g' <= g (mask "B", later layers: a feature of group g may
  already depend on channel g's earlier-layer features, which themselves saw
  only channels < g). With one group, mask A excludes the whole current pixel.
* Shifted convolutions (PixelCNN++, Salimans et al. 2017): pad on the top
  (and left) only, so a (2, 3) kernel sees the row above and a (2, 2) kernel
  the row above and the pixel to the left; ``down_shift``/``right_shift``
  then move the result one pixel so the current pixel is excluded. No mask,
  no wasted multiplications by zero.

Masks are built with NumPy at trace time (static), so they cost nothing at
run time beyond one element-wise product with the kernel.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gm_jax.convolutions import Conv, SubPixelConvTranspose, WeightNormed

Array = jax.Array

MASK_TYPES = ("A", "B")


def channel_groups(num_features: int, num_groups: int,
                   repeats: int = 1) -> np.ndarray:
  """Assigns feature channels to colour groups in contiguous blocks.

  Channel j of n = num_features / repeats belongs to group floor(j * G / n);
  the pattern is tiled ``repeats`` times, so that for a gated unit whose
  2n pre-activations are split into halves [a, b], a_j and b_j share a group.

  Args:
    num_features: number of channels (a multiple of ``repeats``).
    num_groups: G, the number of colour channels being ordered (1 = none).
    repeats: how many times the block pattern repeats.

  Returns:
    [num_features] int array of group indices in {0..G-1}.
  """
  if num_features % repeats:
    raise ValueError(
        f"channel_groups: num_features={num_features} is not a multiple of"
        f" repeats={repeats}.")
  n = num_features // repeats
  return np.tile((np.arange(n) * num_groups) // n, repeats)


def causal_mask(kernel_size: Tuple[int, int], center: Tuple[int, int],
                in_features: int, out_features: int, num_groups: int,
                mask_type: str, out_repeats: int = 1) -> np.ndarray:
  """The 0/1 kernel mask of a raster-order causal convolution.

  Taps strictly before ``center`` in raster order of the kernel window are
  open; taps after it are closed; at the centre, output group g reads input
  group g' iff g' < g (type "A") or g' <= g (type "B").

  Args:
    kernel_size: (kh, kw).
    center: (cy, cx), the tap aligned with the output pixel.
    in_features, out_features: channel counts of the convolution.
    num_groups: colour groups (see ``channel_groups``).
    mask_type: "A" or "B".
    out_repeats: output channels form this many tiled group blocks.

  Returns:
    [kh, kw, in_features, out_features] float32 mask.
  """
  if mask_type not in MASK_TYPES:
    raise ValueError(f"mask_type={mask_type!r}, expected one of {MASK_TYPES}.")
  kh, kw = kernel_size
  cy, cx = center
  mask = np.zeros((kh, kw, in_features, out_features), np.float32)
  mask[:cy] = 1.0
  mask[cy, :cx] = 1.0
  in_group = channel_groups(in_features, num_groups)[:, None]
  out_group = channel_groups(out_features, num_groups, out_repeats)[None, :]
  if mask_type == "A":
    mask[cy, cx] = in_group < out_group
  else:
    mask[cy, cx] = in_group <= out_group
  return mask


class MaskedConv(nn.Module):
  """A raster-causal masked convolution ('same' output size).

  With ``kernel_size=(kh, kw)`` and the default centre (kh // 2, kw // 2),
  this is PixelCNN's masked k x k convolution; the rows below the centre are
  always masked, so they are cropped from the kernel instead of computed.
  Pass ``center`` for one-sided kernels, e.g. Gated PixelCNN's horizontal
  (1, k // 2 + 1) kernel with centre (0, k // 2).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    mask_type: "A" (excludes the current channel) or "B" (includes it).
    num_groups: colour groups being ordered inside a pixel.
    out_repeats: output channels form this many tiled group blocks.
    center: the tap aligned with the output pixel; None = the middle.
    kernel_init: kernel initializer.
  """

  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  mask_type: str = "B"
  num_groups: int = 1
  out_repeats: int = 1
  center: Optional[Tuple[int, int]] = None
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, position: Optional[Position] = None
               ) -> Array:
    """[B, H, W, Cin] -> [B, H, W, features].

    With ``position`` (cached sampling, pixels visited in raster order):
    x is either the whole current image, [B, H, W, Cin] (the first layer:
    the canvas itself), whose window around the pixel is read directly, or
    the input at that one pixel, [B, 1, 1, Cin] (deeper layers), which is
    written into this layer's "cache" collection (its zero-padded input,
    [B, cy + H, W + kw - 1, Cin]) before the window is read from there.
    Returns the output at that pixel, [B, 1, 1, features]: the number the
    full convolution gives there once every earlier pixel has been visited
    -- later pixels are masked out or lie in rows the kernel does not have.
    """
    kh, kw = self.kernel_size
    cy, cx = self.center if self.center is not None else (kh // 2, kw // 2)
    # Rows below the centre are all closed: drop them from the kernel.
    kh = cy + 1
    mask = causal_mask((kh, kw), (cy, cx), x.shape[-1], self.features,
                       self.num_groups, self.mask_type, self.out_repeats)
    padding = ((cy, 0), (cx, kw - 1 - cx))
    conv = lambda pad: Conv(  # noqa: E731
        self.features, (kh, kw), padding=pad, mask=jnp.asarray(mask),
        kernel_init=self.kernel_init)
    if position is None:
      return conv(padding)(x)
    batch, channels = x.shape[0], x.shape[-1]
    if tuple(x.shape[1:3]) == (position.height, position.width):
      padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    elif (kh, kw) == (1, 1):  # Reads only the pixel itself: nothing to keep.
      return conv("VALID")(x)
    else:
      cache = self.variable(
          "cache", "inputs", jnp.zeros,
          (batch, cy + position.height, position.width + kw - 1, channels),
          x.dtype)
      cache.value = jax.lax.dynamic_update_slice(
          cache.value, x.astype(cache.value.dtype),
          (0, position.row + cy, position.col + cx, 0))
      padded = cache.value
    window = jax.lax.dynamic_slice(padded, (0, position.row, position.col, 0),
                                   (batch, kh, kw, channels))
    return conv("VALID")(window)


class Position(NamedTuple):
  """One pixel of a height x width image, for cached sampling: row and col
  may be traced integers; height and width are static. The shifted
  convolutions also take col=None: the whole row ``row``."""

  row: Array
  col: Array
  height: int
  width: int


def down_shift(x: Array) -> Array:
  """Moves an image one row down, filling the top row with zeros.

  [B, H, W, C] -> [B, H, W, C]; out[:, r] = x[:, r - 1].
  """
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def right_shift(x: Array) -> Array:
  """Moves an image one column right, filling column 0 with zeros.

  [B, H, W, C] -> [B, H, W, C]; out[:, :, c] = x[:, :, c - 1].
  """
  return jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def concat_elu(x: Array) -> Array:
  """PixelCNN++'s concat_elu: elu([x, -x]) on the channel axis (doubles C)."""
  return jax.nn.elu(jnp.concatenate([x, -x], axis=-1))


class DownShiftedConv(nn.Module):
  """Convolution over the current row and the kh - 1 rows above it.

  Output (r, c) reads rows r - kh + 1..r and columns c - (kw - 1) / 2 ..
  c + (kw - 1) / 2 (odd kw). Follow with ``down_shift`` to exclude row r.
  With stride 2 it halves H and W (even sizes).
  """

  features: int
  kernel_size: Tuple[int, int] = (2, 3)
  strides: int = 1
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  weight_norm: Optional[float] = None  # init_scale of ``WeightNormed``

  def _column_padding(self) -> tuple[int, int]:
    """Zero columns added (left, right): the window is centred."""
    kw = self.kernel_size[1]
    return (kw - 1) // 2, (kw - 1) // 2

  @nn.compact
  def __call__(self, x: Optional[Array], position: Optional[Position] = None,
               activation: Optional[Callable[[Array], Array]] = None,
               whole_input: bool = False, read: bool = True
               ) -> Optional[Array]:
    """[B, H, W, Cin] -> [B, H / s, W / s, features] (s the stride).

    ``activation`` (optional) is applied to the input before the zero
    padding; it must map 0 to 0 (e.g. ``concat_elu``), so that applying it
    after the padding, as the cached path does, gives the same numbers.

    With ``position`` (cached sampling), one step of a raster scan over the
    input's resolution, ``position.height`` x ``position.width``:

    * ``position.col`` is None (whole rows, for the down-shifted stream):
      x is row ``position.row`` of the input, [B, 1, W, Cin]; the result is
      row ``position.row // s`` of the output, [B, 1, W / s, features].
    * otherwise (single pixels): x is the input at (row, col), [B, 1, 1,
      Cin]; the result is the output at (row // s, col // s), [B, 1, 1,
      features].

    x is first written into this layer's "cache" collection (the zero-padded
    input, [B, kh - 1 + H, pad + W, Cin], before ``activation``), and the
    output's window is read from there: it equals the full convolution's
    output as soon as every input position of its window has been written.
    A strided layer's input usually arrives at steps where no output is
    due: ``read=False`` only writes x (and returns None), x=None only
    reads. With ``whole_input``, x is instead the whole input (e.g. the
    canvas) and ``position`` the output position wanted (stride 1): nothing
    is cached.
    """
    kh, kw = self.kernel_size
    left, right = self._column_padding()
    padding = ((0, 0), (kh - 1, 0), (left, right), (0, 0))
    conv = weight_normed(Conv, self.weight_norm, self.features, (kh, kw),
                         strides=self.strides, padding="VALID",
                         kernel_init=self.kernel_init)
    if activation is None:
      activation = _identity
    if position is None:
      return conv(jnp.pad(activation(x), padding))
    s, rows_only = self.strides, position.col is None
    if whole_input:
      padded = jnp.pad(x, padding)
    elif x is None:
      if not self.has_variable("cache", "inputs"):
        raise ValueError(f"{self.name}: read from an empty cache.")
      padded = self.get_variable("cache", "inputs")
    else:
      cache = self.variable(
          "cache", "inputs", jnp.zeros,
          (x.shape[0], kh - 1 + position.height,
           left + position.width + right, x.shape[-1]), x.dtype)
      cache.value = jax.lax.dynamic_update_slice(
          cache.value, x.astype(cache.value.dtype),
          (0, position.row + kh - 1, left + (0 if rows_only else position.col),
           0))
      padded = cache.value
    if not read:
      return None
    batch, channels = padded.shape[0], padded.shape[-1]
    # Output row r' reads padded rows s r'..s r' + kh - 1 (likewise columns).
    top = (position.row // s) * s
    if rows_only:
      window = jax.lax.dynamic_slice_in_dim(padded, top, kh, axis=1)
    else:
      window = jax.lax.dynamic_slice(
          padded, (0, top, (position.col // s) * s, 0),
          (batch, kh, kw, channels))
    return conv(activation(window))


def _identity(x: Array) -> Array:
  return x


class DownRightShiftedConv(DownShiftedConv):
  """Convolution over the kh x kw window ending at the current pixel.

  Output (r, c) reads rows r - kh + 1..r and columns c - kw + 1..c. Follow
  with ``right_shift`` (kh = 1 rows) or ``down_shift`` to exclude (r, c).
  """

  kernel_size: Tuple[int, int] = (2, 2)

  def _column_padding(self) -> tuple[int, int]:
    """The window ends at the current column."""
    return self.kernel_size[1] - 1, 0


class _ShiftedConvTranspose(nn.Module):
  """Stride-s transposed convolution cropped to (s H, s W), keeping causality.

  The 'VALID' transposed convolution writes input (i, j) to outputs
  (s i + a, s j + b) for kernel taps a < kh, b < kw. Keeping output rows
  [0, s H) and columns [left, left + s W) means an output pixel only receives
  coarse pixels at or above / left of it (left = (kw - 1) // 2 for the
  centred down-shifted kernel, 0 for the down-right one), as in PixelCNN++.
  """

  features: int
  kernel_size: Tuple[int, int]
  left: int
  strides: int = 2
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  weight_norm: Optional[float] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, h, w, _ = x.shape
    s = self.strides
    # ConvTranspose's function and parameters, computed as a sub-pixel conv
    # (gm_jax.convolutions: several times faster to differentiate on CPU).
    # Weight norm is per output channel, so cropping after it is the same.
    y = weight_normed(SubPixelConvTranspose, self.weight_norm, self.features,
                      self.kernel_size, strides=(s, s), padding="VALID",
                      kernel_init=self.kernel_init,
                      name="ConvTranspose_0")(x)
    return y[:, :s * h, self.left:self.left + s * w]


class DownShiftedConvTranspose(nn.Module):
  """Up-sampling counterpart of ``DownShiftedConv`` (kernel (2, 3)): the
  output is cropped to the kernel's centre column."""

  features: int
  kernel_size: Tuple[int, int] = (2, 3)
  strides: int = 2
  weight_norm: Optional[float] = None

  def _left(self) -> int:
    """Columns cropped on the left of the transposed convolution's output."""
    return (self.kernel_size[1] - 1) // 2

  @nn.compact
  def __call__(self, x: Array, position: Optional[Position] = None
               ) -> Array:
    """[B, H, W, Cin] -> [B, s H, s W, features].

    With ``position`` (cached sampling; a position of the *output*): output
    row R reads input row R // s only, so with ``position.col`` None, x is
    input row ``position.row // s`` and the result output row
    ``position.row``, [B, 1, s W, features]. With a column (the
    down-right-shifted kernel only, whose output (R, C) reads input
    (R // s, C // s) alone), x is that input pixel and the result the output
    pixel, [B, 1, 1, features]. No cache is needed.
    """
    y = _ShiftedConvTranspose(self.features, self.kernel_size,
                              self._left(), self.strides,
                              weight_norm=self.weight_norm)(x)
    if position is None:
      return y
    s = self.strides
    if position.col is None:
      return jax.lax.dynamic_slice_in_dim(y, position.row % s, 1, axis=1)
    if self._left() or x.shape[1:3] != (1, 1):
      raise ValueError("DownShiftedConvTranspose: single-pixel steps need the"
                       " down-right kernel and a [B, 1, 1, C] input pixel.")
    return jax.lax.dynamic_slice(
        y, (0, position.row % s, position.col % s, 0),
        (y.shape[0], 1, 1, y.shape[-1]))


def weight_normed(layer_cls, init_scale: Optional[float], *args,
                  name: Optional[str] = None, **kwargs) -> nn.Module:
  """``layer_cls(*args, **kwargs, name=name)``, or, with an ``init_scale``,
  the same layer without bias inside ``WeightNormed`` (which takes the
  name; the layer's own parameters move under "layer")."""
  if init_scale is None:
    return layer_cls(*args, name=name, **kwargs)
  return WeightNormed(layer_cls(*args, use_bias=False, **kwargs),
                      init_scale, name=name)


class DownRightShiftedConvTranspose(DownShiftedConvTranspose):
  """Up-sampling counterpart of ``DownRightShiftedConv`` (kernel (2, 2)):
  nothing is cropped on the left."""

  kernel_size: Tuple[int, int] = (2, 2)

  def _left(self) -> int:
    return 0


def gate(x: Array) -> Array:
  """Gated activation tanh(a) * sigmoid(b) for x = [a, b] on the last axis."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * jax.nn.sigmoid(b)


def label_embedding(label: Optional[Array], num_classes: int,
                    features: int, name: str) -> Array:
  """A learned per-class bias [B, 1, 1, features], or 0 when unconditional.

  Must be called inside a compact Flax module (it creates a Dense there).
  """
  if num_classes == 0 or label is None:
    return jnp.zeros(())
  one_hot = jax.nn.one_hot(label, num_classes)
  return nn.Dense(features, use_bias=False, name=name)(one_hot)[:, None, None]

