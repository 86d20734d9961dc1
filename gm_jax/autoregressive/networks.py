"""The three autoregressive networks: PixelCNN, Gated PixelCNN, PixelCNN++.

Every network maps an image scaled to [-1, 1], ``[B, H, W, C]``, to
``[B, H, W, num_groups * num_outputs]`` per-pixel distribution parameters
such that the parameters at pixel i (and, with ``num_groups = C``, of
channel group c, the c-th block of ``num_outputs``) depend only on pixels
before i in raster order (and on channels < c of pixel i). The family turns
them into Bernoulli logits, 256-way logits or mixture parameters.

* ``num_groups = C``: per-channel likelihoods (Bernoulli, categorical); the
  output block c is channel c's parameters, the R -> G -> B order is built
  into the masks (PixelCNN, Gated PixelCNN) or into a channel-masked output
  head (PixelCNN++).
* ``num_groups = 1``: one block per pixel (the discretized logistic mixture,
  whose coupled means handle the order inside a pixel); the output at pixel
  i sees only pixels < i.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax.autoregressive import layers
from gm_jax.convolutions import Conv

Array = jax.Array


def _output_head(h: Array, num_output_filters: int, num_groups: int,
                 num_outputs: int, position=None) -> Array:
  """ReLU -> masked 1x1 (B) -> ReLU -> masked 1x1 (B) to the parameters."""
  h = layers.MaskedConv(num_output_filters, (1, 1), "B", num_groups)(
      jax.nn.relu(h), position)
  return layers.MaskedConv(num_groups * num_outputs, (1, 1), "B", num_groups)(
      jax.nn.relu(h), position)


class _MaskedNetwork(nn.Module):
  """The hyper-parameters PixelCNN and Gated PixelCNN share (see theirs)."""

  num_outputs: int
  width: int
  num_layers: int
  kernel_size: int
  first_kernel_size: int
  num_output_filters: int
  num_groups: int = 1
  num_classes: int = 0


class PixelCNN(_MaskedNetwork):
  """PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks").

  A masked k1 x k1 type-A convolution to 2h features, ``num_layers``
  residual blocks (ReLU, 1x1 to h, ReLU, masked k x k type B, ReLU, 1x1 back
  to 2h; all 1x1s are type-B masked so colour groups stay separate), then
  ReLU, 1x1, ReLU, 1x1 to the outputs. Stacked k x k masks have a blind spot
  above-right of each pixel (see ``GatedPixelCNN``).

  Attributes:
    num_outputs: parameters per group (e.g. 1 Bernoulli logit, 256 logits).
    num_groups: colour groups ordered inside a pixel (C or 1).
    width: h; the residual stream has 2h channels.
    num_layers: residual blocks.
    kernel_size: k of the hidden masked convolutions.
    first_kernel_size: k1 of the type-A input convolution.
    num_output_filters: width of the 1x1 output layers.
    num_classes: 0, or the number of classes for a per-class bias per block.
  """


  @nn.compact
  def __call__(self, x: Array, label: Optional[Array] = None,
               train: bool = False,
               position: Optional[layers.Position] = None) -> Array:
    """[B, H, W, C] in [-1, 1] -> [B, H, W, num_groups * num_outputs].

    With ``position``: cached sampling, one pixel at a time in raster order
    (x is the current canvas; the output is the pixel's parameters, [B, 1,
    1, G * K]); the deeper masked convolutions keep their inputs in the
    mutable "cache" collection. Each pixel then costs one position of every
    layer instead of a pass over the image. Exact for per-channel models
    too: no feature at a pixel depends on the pixel's last channel, so the
    caches written at its last channel's step are final.
    """
    del train  # No dropout.
    g, k = self.num_groups, self.kernel_size
    h = layers.MaskedConv(2 * self.width,
                          (self.first_kernel_size, self.first_kernel_size),
                          "A", g)(x, position)  # [B, H, W, 2h]
    for i in range(self.num_layers):
      y = layers.MaskedConv(self.width, (1, 1), "B", g)(jax.nn.relu(h),
                                                         position)
      y = layers.MaskedConv(self.width, (k, k), "B", g)(jax.nn.relu(y),
                                                         position)
      y = layers.MaskedConv(2 * self.width, (1, 1), "B", g)(
          jax.nn.relu(y), position)
      h = h + y + layers.label_embedding(label, self.num_classes,
                                         2 * self.width, f"label_{i}")
    return _output_head(h, self.num_output_filters, g, self.num_outputs,
                        position)


class GatedPixelCNN(_MaskedNetwork):
  """Gated PixelCNN (van den Oord et al., 2016, "Conditional Image
  Generation with PixelCNN Decoders").

  Two stacks without a blind spot:

  * vertical: v at row r sees every pixel of rows < r within its (growing)
    width: a (k // 2 + 1) x k convolution over rows r - k // 2..r of the
    previous v, which itself sees only rows < r; the first layer reads x and
    is shifted one row down.
  * horizontal: h at (r, c) sees (r, < c) through a one-sided 1 x (k // 2 + 1)
    masked convolution (type A first, B after), plus a 1x1 link from the
    vertical stack's pre-activations at (r, c) (rows < r only, so every
    colour group may read it); residual from the second layer on.

  Both use gated units tanh(a) * sigmoid(b), with an optional per-class bias
  on the pre-activations (class conditioning).

  Attributes:
    num_outputs, num_groups, num_output_filters, num_classes: as in PixelCNN.
    width: channels of each stack.
    num_layers: gated layers (the first included).
    kernel_size: k of the hidden layers; first_kernel_size of the first.
  """


  @nn.compact
  def __call__(self, x: Array, label: Optional[Array] = None,
               train: bool = False,
               position: Optional[layers.Position] = None,
               stack: str = "horizontal") -> Array:
    """[B, H, W, C] in [-1, 1] -> [B, H, W, num_groups * num_outputs].

    Cached sampling (``position`` given, x the current canvas): the vertical
    stack at row r depends on rows < r only, so ``stack="vertical"``
    computes row ``position.row`` of every vertical layer once per image
    row (from cached rows of their inputs) and keeps the pre-activations in
    the "cache" collection; ``stack="horizontal"`` then computes one pixel
    of every horizontal layer and the outputs there, [B, 1, 1, G * K].
    Modules carry explicit names equal to their automatic ones, so both
    passes and the full network share parameters (and old checkpoints).
    """
    del train  # No dropout.
    n, g, num_layers = self.width, self.num_groups, self.num_layers
    decode = position is not None
    v, h = x, x
    for i in range(num_layers):
      first = i == 0
      k = self.first_kernel_size if first else self.kernel_size
      if not decode or stack == "vertical":
        v_pre = self._vertical(v, i, k, position)
        v_pre = v_pre + layers.label_embedding(label, self.num_classes, 2 * n,
                                               f"label_v_{i}")
        v = layers.gate(v_pre)  # [B, H, W, n] (decode: [B, 1, W, n])
        if decode:
          row = self.variable("cache", f"v_pre_{i}", jnp.zeros, v_pre.shape,
                              v_pre.dtype)
          row.value = v_pre
          continue
      else:
        row = self.variable("cache", f"v_pre_{i}", jnp.zeros,
                            (x.shape[0], 1, position.width, 2 * n), x.dtype)
        v_pre = jax.lax.dynamic_slice_in_dim(row.value, position.col, 1,
                                             axis=2)  # [B, 1, 1, 2n]
      h_pre = layers.MaskedConv(2 * n, (1, k // 2 + 1), "A" if first else "B",
                                g, out_repeats=2, center=(0, k // 2),
                                name=f"MaskedConv_{2 * i}")(h, position)
      h_pre = (h_pre + Conv(2 * n, (1, 1), name=f"Conv_{2 * i + 1}")(v_pre) +
               layers.label_embedding(label, self.num_classes, 2 * n,
                                      f"label_h_{i}"))
      h_out = layers.MaskedConv(n, (1, 1), "B", g,
                                name=f"MaskedConv_{2 * i + 1}")(
                                    layers.gate(h_pre), position)
      h = h_out if first else h + h_out
    if decode and stack == "vertical":
      return v
    h = layers.MaskedConv(self.num_output_filters, (1, 1), "B", g,
                          name=f"MaskedConv_{2 * num_layers}")(
                              jax.nn.relu(h), position)
    return layers.MaskedConv(g * self.num_outputs, (1, 1), "B", g,
                             name=f"MaskedConv_{2 * num_layers + 1}")(
                                 jax.nn.relu(h), position)

  def _vertical(self, v: Array, i: int, k: int,
                position: Optional[layers.Position]) -> Array:
    """Pre-activations of vertical layer i: a (k // 2 + 1) x k convolution
    over rows r - k // 2..r (the first layer's result moved one row down).
    With ``position``: only row ``position.row``, [B, 1, W, 2n], from the
    canvas (first layer) or from this layer's cache of earlier input rows
    (v is then the previous layer's row r)."""
    conv = lambda pad: Conv(2 * self.width, (k // 2 + 1, k), padding=pad,  # noqa: E731
                            name=f"Conv_{2 * i}")
    if position is None:
      v_pre = conv(((k // 2, 0), (k // 2, k // 2)))(v)
      return layers.down_shift(v_pre) if i == 0 else v_pre
    r, rows = position.row, k // 2 + 1
    if i == 0:
      # Row r of the shifted result is row r - 1 of the convolution (zero at
      # r = 0): canvas rows r - 1 - k // 2..r - 1, zero-padded above.
      padded = jnp.pad(v, ((0, 0), (rows, 0), (k // 2, k // 2), (0, 0)))
      window = jax.lax.dynamic_slice_in_dim(padded, r, rows, axis=1)
      return jnp.where(r == 0, 0.0, conv("VALID")(window))
    cache = self.variable(
        "cache", f"v_in_{i}", jnp.zeros,
        (v.shape[0], k // 2 + position.height, position.width + 2 * (k // 2),
         v.shape[-1]), v.dtype)
    cache.value = jax.lax.dynamic_update_slice(
        cache.value, v.astype(cache.value.dtype), (0, r + k // 2, k // 2, 0))
    window = jax.lax.dynamic_slice_in_dim(cache.value, r, rows, axis=1)
    return conv("VALID")(window)


class GatedResnet(nn.Module):
  """PixelCNN++'s gated residual block.

  y = x + a * sigmoid(b), [a, b] = conv2(dropout(concat_elu(conv1(
  concat_elu(x)) + nin(concat_elu(skip))))) (+ class bias), where conv is
  down-shifted or down-right-shifted and ``skip`` is the optional input from
  the other stream / the up pass.
  """

  shift: str  # "down" or "down_right"
  dropout: float = 0.0
  num_classes: int = 0
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, skip: Optional[Array], label: Optional[Array],
               train: bool) -> Array:
    n = x.shape[-1]
    # With weight norm, the data-dependent init scales of PixelCNN++: 1 for
    # conv1 and nin, 0.1 for conv2 (the residual branch starts small).
    wn, wn_out = (1.0, 0.1) if self.weight_norm else (None, None)
    if self.shift == "down":
      conv1 = layers.DownShiftedConv(n, (2, 3), weight_norm=wn)
      conv2 = layers.DownShiftedConv(
          2 * n, (2, 3), kernel_init=nn.initializers.variance_scaling(
              0.1, "fan_in", "truncated_normal"), weight_norm=wn_out)
    else:
      conv1 = layers.DownRightShiftedConv(n, (2, 2), weight_norm=wn)
      conv2 = layers.DownRightShiftedConv(
          2 * n, (2, 2), kernel_init=nn.initializers.variance_scaling(
              0.1, "fan_in", "truncated_normal"), weight_norm=wn_out)
    y = conv1(layers.concat_elu(x))
    if skip is not None:
      y = y + layers.weight_normed(nn.Dense, wn, n)(layers.concat_elu(skip))
    y = layers.concat_elu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = conv2(y) + layers.label_embedding(label, self.num_classes, 2 * n,
                                          "label")
    a, b = jnp.split(y, 2, axis=-1)
    return x + a * jax.nn.sigmoid(b)


class PixelCNNPlusPlus(nn.Module):
  """PixelCNN++ (Salimans et al., 2017).

  Two streams of shifted convolutions: u (down-shifted: rows above) and ul
  (down-right-shifted: rows above and pixels to the left), in a U-Net of three
  resolutions (H, H/2, H/4) with ``num_resnet`` gated residual blocks per
  stage on the way up and num_resnet (+ 1 below the top) on the way down,
  every up-pass activation fed to the matching down-pass block as a
  shortcut. The input gets a channel of ones so that zero padding is
  distinguishable from black pixels.

  The final features at pixel i see only pixels < i. For per-channel
  likelihoods of colour images (``num_groups > 1``) a channel-masked head
  adds the current pixel's earlier channels: out_c = W2_c elu(W1 f_i +
  A (x_i)_{<c}), with A a type-A masked 1x1 and W2 a type-B masked 1x1.

  Attributes:
    num_outputs, num_groups, num_classes: as in PixelCNN.
    width: channels of both streams (160 in the paper).
    num_resnet: gated residual blocks per stage (5 in the paper).
    dropout: dropout rate inside the residual blocks (0.5 in the paper).
    weight_norm: every shifted convolution, transposed convolution and
      1x1 ("nin") layer weight-normalised with data-dependent
      initialisation (``convolutions.WeightNormed``), as in the paper.
  """

  num_outputs: int
  width: int
  num_resnet: int
  dropout: float
  num_groups: int = 1
  num_classes: int = 0
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, label: Optional[Array] = None,
               train: bool = False) -> Array:
    """[B, H, W, C] in [-1, 1] -> [B, H, W, num_groups * num_outputs]."""
    nf = self.width

    wn = 1.0 if self.weight_norm else None

    def block(shift):
      return GatedResnet(shift, self.dropout, self.num_classes,
                         self.weight_norm)

    x_pad = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    u_list = [layers.down_shift(layers.DownShiftedConv(
        nf, (2, 3), weight_norm=wn)(x_pad))]
    ul_list = [
        layers.down_shift(layers.DownShiftedConv(
            nf, (1, 3), weight_norm=wn)(x_pad)) +
        layers.right_shift(layers.DownRightShiftedConv(
            nf, (2, 1), weight_norm=wn)(x_pad))
    ]
    # Up pass: H -> H/2 -> H/4.
    for stage in range(3):
      for _ in range(self.num_resnet):
        u_list.append(block("down")(u_list[-1], None, label, train))
        ul_list.append(block("down_right")(ul_list[-1], u_list[-1], label,
                                           train))
      if stage < 2:
        u_list.append(layers.DownShiftedConv(nf, (2, 3), 2, weight_norm=wn)(
            u_list[-1]))
        ul_list.append(layers.DownRightShiftedConv(
            nf, (2, 2), 2, weight_norm=wn)(ul_list[-1]))
    # Down pass, consuming the up pass's activations in reverse.
    u, ul = u_list.pop(), ul_list.pop()
    for stage in range(3):
      for _ in range(self.num_resnet + (stage > 0)):
        u = block("down")(u, u_list.pop(), label, train)
        ul = block("down_right")(
            ul, jnp.concatenate([u, ul_list.pop()], axis=-1), label, train)
      if stage < 2:
        u = layers.DownShiftedConvTranspose(nf, weight_norm=wn)(u)
        ul = layers.DownRightShiftedConvTranspose(nf, weight_norm=wn)(ul)
    assert not u_list and not ul_list, "unbalanced U-Net shortcuts"

    features = jax.nn.elu(ul)  # [B, H, W, nf], pixels < i only.
    total = self.num_groups * self.num_outputs
    if self.num_groups == 1:
      return layers.weight_normed(nn.Dense, wn, total)(features)
    hidden = (layers.weight_normed(nn.Dense, wn, nf)(features) +
              layers.MaskedConv(nf, (1, 1), "A", self.num_groups)(x))
    return layers.MaskedConv(total, (1, 1), "B", self.num_groups)(
        jax.nn.elu(hidden))
