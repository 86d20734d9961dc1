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

from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gm_jax import trees
from gm_jax.autoregressive import layers
from gm_jax.convolutions import Conv, dot_general

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

  With ``position`` (cached sampling, no dropout): x and skip are one row
  (``position.col`` None) or one pixel of the block's input, and the
  result is the block's output there; both convolutions keep their earlier
  inputs in the "cache" collection (see ``layers.DownShiftedConv``).
  """

  shift: str  # "down" or "down_right"
  dropout: float = 0.0
  num_classes: int = 0
  weight_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, skip: Optional[Array], label: Optional[Array],
               train: bool, position: Optional[layers.Position] = None
               ) -> Array:
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
    if position is not None and train:
      raise ValueError("GatedResnet: cached steps are for sampling only"
                       " (train=False).")
    if position is None:
      y = conv1(layers.concat_elu(x))
    else:  # The cache keeps x; concat_elu(0) = 0 keeps the padding zero.
      y = conv1(x, position, activation=layers.concat_elu)
    if skip is not None:
      y = y + layers.weight_normed(nn.Dense, wn, n, dot_general=dot_general)(
          layers.concat_elu(skip))
    if position is None:
      y = layers.concat_elu(y)
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
      y = conv2(y)
    else:
      y = conv2(y, position, activation=layers.concat_elu)
    y = y + layers.label_embedding(label, self.num_classes, 2 * n, "label")
    a, b = jnp.split(y, 2, axis=-1)
    return x + a * jax.nn.sigmoid(b)


class _GatedResnetStep(nn.Module):
  """One ``GatedResnet`` as the body of a stage's ``nn.scan``: (x, skip,
  label) -> (y, y), or (y, None) without ``emit``. Its parameters sit under
  "block", stacked over the stage's blocks by the scan."""

  shift: str
  dropout: float
  num_classes: int
  weight_norm: bool
  train: bool
  emit: bool = True

  @nn.compact
  def __call__(self, x: Array, skip: Optional[Array], label: Optional[Array]
               ) -> Tuple[Array, Optional[Array]]:
    y = GatedResnet(self.shift, self.dropout, self.num_classes,
                    self.weight_norm, name="block")(x, skip, label,
                                                    self.train)
    return y, (y if self.emit else None)


PIXELCNNPP_STACKS = ("u", "ul", "head")
PIXELCNNPP_STAGES = ("up0", "up1", "quarter", "down1", "down0")


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

  Cached sampling (``position`` given; driven by ``pixelcnnpp_cached_step``)
  follows the dependencies. At each resolution, u at row r reads only image
  rows before r (at that resolution's scale) and ul at (r, c) only pixels
  before (r, c). The stride-2 down-sampling convolutions read a 2 x 3 (u)
  or 2 x 2 (ul) window ending at fine row 2r (and column 2c): coarse row r
  (pixel (r, c)) can be computed at fine row 2r (pixel (2r, 2c)). The
  transposed up-sampling convolutions' fine row R reads coarse row R // 2
  only, and the ul one's pixel (R, C) coarse pixel (R // 2, C // 2) only.

  Attributes:
    num_outputs, num_groups, num_classes: as in PixelCNN.
    width: channels of both streams (160 in the paper).
    num_resnet: gated residual blocks per stage (5 in the paper).
    dropout: dropout rate inside the residual blocks (0.5 in the paper).
    weight_norm: every shifted convolution, transposed convolution and
      1x1 ("nin") layer weight-normalised with data-dependent
      initialisation (``convolutions.WeightNormed``), as in the paper.
    scan_blocks: each stage's blocks of each stream as one ``nn.scan``,
      their parameters stacked (under "up{k}_u", "up{k}_ul", "down{k}_u",
      "down{k}_ul", level k = 0 the finest). The same function as the
      unrolled network (tested), compiled once per stage instead of once per
      block. Cached sampling needs the unrolled layout:
      ``pixelcnnpp_unrolled_params`` maps the parameters there.
  """

  num_outputs: int
  width: int
  num_resnet: int
  dropout: float
  num_groups: int = 1
  num_classes: int = 0
  weight_norm: bool = False
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, label: Optional[Array] = None,
               train: bool = False,
               position: Optional[layers.Position] = None,
               stack: Optional[str] = None, stage: Optional[str] = None
               ) -> Optional[Array]:
    """[B, H, W, C] in [-1, 1] -> [B, H, W, num_groups * num_outputs].

    Cached sampling: ``position`` is the pixel (R, C) being sampled, x the
    current canvas (the pixels before it, and, per channel, its earlier
    channels). One call computes one stage of one stream, from the
    caches of earlier calls (the mutable "cache" collection):

    * ``stack="u"``: rows of the u stream (once per image row, C = 0) at
      level k = 0, 1, 2 (full, half, quarter resolution): row R >> k.
    * ``stack="ul"``: one pixel of the ul stream at each level,
      (R >> k, C >> k); its blocks read the u stream's cached rows.
    * ``stage``: "up0" (the first layer and the full-resolution up blocks),
      "up1" (down-sampling and the half-resolution up blocks), "quarter"
      (down-sampling, the quarter-resolution up and down blocks), "down1"
      (up-sampling and the half-resolution down blocks) and "down0"
      (up-sampling and the full-resolution down blocks; for ul also the
      head: returns the outputs at (R, C), [B, 1, 1, G * K]; None
      otherwise). A coarse stage is due when its row (pixel) is final:
      see ``pixelcnnpp_cached_step``, which runs them in order.
    * ``stack="head"`` (``num_groups > 1``): only the channel-masked head,
      from the features that the last ul "down0" stage kept (they do not
      depend on pixel (R, C)), for the pixel's later channels.

    The parameters are the full network's: every submodule is created in
    the same order in each mode, so they share automatic names.
    """
    nf = self.width
    wn = 1.0 if self.weight_norm else None

    def block(shift):
      return GatedResnet(shift, self.dropout, self.num_classes,
                         self.weight_norm)

    # Every submodule, in the order the full pass has always created them
    # (their automatic names, hence the parameter tree, depend on it).
    first_u = layers.DownShiftedConv(nf, (2, 3), weight_norm=wn)
    first_ul_above = layers.DownShiftedConv(nf, (1, 3), weight_norm=wn)
    first_ul_left = layers.DownRightShiftedConv(nf, (2, 1), weight_norm=wn)
    # Scanned, the blocks are made by the stages' scans instead (the other
    # modules keep their names: Flax numbers each class on its own).
    blocks_per_stage = 0 if self.scan_blocks else self.num_resnet
    up_blocks, down_samplers = [], []
    for level in range(3):
      up_blocks.append([(block("down"), block("down_right"))
                        for _ in range(blocks_per_stage)])
      if level < 2:
        down_samplers.append((
            layers.DownShiftedConv(nf, (2, 3), 2, weight_norm=wn),
            layers.DownRightShiftedConv(nf, (2, 2), 2, weight_norm=wn)))
    down_blocks, up_samplers = [], []  # Coarsest first.
    for stage_index in range(3):
      down_blocks.append([
          (block("down"), block("down_right"))
          for _ in range(blocks_per_stage and
                         blocks_per_stage + (stage_index > 0))])
      if stage_index < 2:
        up_samplers.append((
            layers.DownShiftedConvTranspose(nf, weight_norm=wn),
            layers.DownRightShiftedConvTranspose(nf, weight_norm=wn)))
    total = self.num_groups * self.num_outputs
    if self.num_groups == 1:
      head = (layers.weight_normed(nn.Dense, wn, total,
                                   dot_general=dot_general),)
    else:
      head = (layers.weight_normed(nn.Dense, wn, nf, dot_general=dot_general),
              layers.MaskedConv(nf, (1, 1), "A", self.num_groups),
              layers.MaskedConv(total, (1, 1), "B", self.num_groups))

    def outputs(features, x):
      """The head: [B, h, w, nf] features (pixels < i) and x at the same
      pixels (read only by the channel-masked head) -> parameters."""
      if self.num_groups == 1:
        return head[0](features)
      hidden = head[0](features) + head[1](x)
      return head[2](jax.nn.elu(hidden))

    modules = _UNetModules(first_u, first_ul_above, first_ul_left, up_blocks,
                           down_samplers, down_blocks[::-1],
                           up_samplers[::-1], outputs)
    if position is not None:
      if self.scan_blocks:
        raise ValueError(
            "PixelCNNPlusPlus: cached sampling runs the unrolled network"
            " (scan_blocks=False) on pixelcnnpp_unrolled_params(params).")
      return self._cached(x, label, position, stack, stage, modules)
    if self.scan_blocks:
      return self._scanned(x, label, train, modules)

    x_pad = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    u_list = [layers.down_shift(first_u(x_pad))]
    ul_list = [layers.down_shift(first_ul_above(x_pad)) +
               layers.right_shift(first_ul_left(x_pad))]
    # Up pass: H -> H/2 -> H/4.
    for level in range(3):
      for u_block, ul_block in up_blocks[level]:
        u_list.append(u_block(u_list[-1], None, label, train))
        ul_list.append(ul_block(ul_list[-1], u_list[-1], label, train))
      if level < 2:
        u_list.append(down_samplers[level][0](u_list[-1]))
        ul_list.append(down_samplers[level][1](ul_list[-1]))
    # Down pass, consuming the up pass's activations in reverse.
    u, ul = u_list.pop(), ul_list.pop()
    for level in (2, 1, 0):
      for u_block, ul_block in modules.down_blocks[level]:
        u = u_block(u, u_list.pop(), label, train)
        ul = ul_block(ul, jnp.concatenate([u, ul_list.pop()], axis=-1),
                      label, train)
      if level > 0:
        u = modules.up_samplers[level - 1][0](u)
        ul = modules.up_samplers[level - 1][1](ul)
    assert not u_list and not ul_list, "unbalanced U-Net shortcuts"
    return outputs(jax.nn.elu(ul), x)  # features: pixels < i only.

  def _scanned(self, x: Array, label: Optional[Array], train: bool,
               m: _UNetModules) -> Array:
    """The full pass with every stage's blocks scanned (``scan_blocks``).

    Within a stage the u stream never reads ul, so each stage runs u's
    blocks as one scan, then ul's, which read u's outputs as their skip
    inputs: the same values as the unrolled pass, which alternates them.
    Each level's up-pass values (the entry and every block's output) are
    stacked, and the down pass scans over them in reverse.
    """
    def stage(name, shift, length, emit=True):
      return nn.scan(
          _GatedResnetStep, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=length)(
              shift, self.dropout, self.num_classes, self.weight_norm, train,
              emit, name=name)

    def stacked(entry, outputs):
      return jnp.concatenate([entry[None], outputs])

    n = self.num_resnet
    x_pad = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    u = layers.down_shift(m.first_u(x_pad))
    ul = (layers.down_shift(m.first_ul_above(x_pad)) +
          layers.right_shift(m.first_ul_left(x_pad)))
    up_values = []  # per level: (u's, ul's), [n + 1, B, h, w, nf] each
    for level in range(3):
      u_entry, ul_entry = u, ul
      u, u_out = stage(f"up{level}_u", "down", n)(u, None, label)
      ul, ul_out = stage(f"up{level}_ul", "down_right", n)(ul, u_out, label)
      up_values.append((stacked(u_entry, u_out), stacked(ul_entry, ul_out)))
      if level < 2:
        u = m.down_samplers[level][0](u)
        ul = m.down_samplers[level][1](ul)
    for level in (2, 1, 0):
      u_skips, ul_skips = up_values[level]
      if level == 2:  # Its last up value is the down pass's input itself.
        u_skips, ul_skips = u_skips[:-1], ul_skips[:-1]
      length = u_skips.shape[0]
      u, u_out = stage(f"down{level}_u", "down", length)(
          u, u_skips[::-1], label)
      ul, _ = stage(f"down{level}_ul", "down_right", length, emit=False)(
          ul, jnp.concatenate([u_out, ul_skips[::-1]], axis=-1), label)
      if level > 0:
        u = m.up_samplers[level - 1][0](u)
        ul = m.up_samplers[level - 1][1](ul)
    return m.outputs(jax.nn.elu(ul), x)

  def _cached(self, x, label, position, stack, stage, m) -> Optional[Array]:
    """One stage of one stream of a cached step (see ``__call__``); ``m``
    holds __call__'s modules.

    Values that outlive the call live in the "cache" collection: each
    level's up-pass values at this row / pixel (entry + block outputs, the
    down pass's shortcuts; the u stream's are also the ul blocks' inputs),
    the u stream's down-pass block outputs (ul's inputs), each coarse
    level's down-pass outputs, a whole row of them (the next finer level's
    up-sampling input; the ul stream's finer rows come back to the earlier
    pixels of the row), and, for the channel-masked head, the features.
    """
    if stack not in PIXELCNNPP_STACKS or (
        stack != "head" and stage not in PIXELCNNPP_STAGES):
      raise ValueError(f"stack={stack!r}, stage={stage!r}: expected one of "
                       f"{PIXELCNNPP_STACKS} and (but for the head) one of "
                       f"{PIXELCNNPP_STAGES}.")
    row, col, height, width = position
    batch, nf = x.shape[0], self.width
    rows = stack == "u"
    s = 0 if rows else 1  # which of each (u, ul) module pair
    # This step's row (u) or pixel (ul) at level k.
    at = [layers.Position(row // 2**k, None if rows else col // 2**k,
                          height // 2**k, width // 2**k) for k in range(3)]

    def kept(name, level=0, value=None, per_row=rows):
      """Cache variable ``name``: a row of ``level`` or one pixel, [B, 1,
      W >> level or 1, nf]; stores ``value`` if given. The variable."""
      var = self.variable(
          "cache", name, jnp.zeros,
          (batch, 1, width // 2**level if per_row else 1, nf), x.dtype)
      if value is not None:
        var.value = value
      return var

    def row_at(var, level):
      """A cached row's value (e.g. the u stream's) at this step's pixel of
      ``level``; ``var`` is the variable or its name."""
      if isinstance(var, str):
        var = kept(var, level, per_row=True)
      return jax.lax.dynamic_slice_in_dim(var.value, at[level].col, 1,
                                          axis=2)

    pixel = jax.lax.dynamic_slice(x, (0, row, col, 0),
                                  (batch, 1, 1, x.shape[-1]))
    if stack == "head":
      return m.outputs(kept("features", per_row=False).value, pixel)

    def up(level):
      """The level's up pass: its shortcut values, entry first."""
      if level == 0:
        x_pad = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        if rows:  # Row R of the down-shifted layer: its conv's row R - 1.
          entry = m.first_u(x_pad, at[0]._replace(row=row - 1),
                            whole_input=True)
          entry = jnp.where(row == 0, 0.0, entry)
        else:  # Conv over row R - 1, plus conv over (R - 1..R, C - 1).
          above = m.first_ul_above(x_pad, at[0]._replace(row=row - 1),
                                   whole_input=True)
          left = m.first_ul_left(x_pad, at[0]._replace(col=col - 1),
                                 whole_input=True)
          entry = (jnp.where(row == 0, 0.0, above) +
                   jnp.where(col == 0, 0.0, left))
      else:  # From the finer level's values, cached by the sampler.
        entry = m.down_samplers[level - 1][s](None, at[level - 1])
      values = [entry]
      for i, blocks in enumerate(m.up_blocks[level]):
        skip = None if rows else row_at(f"u_up_{level}_{i + 1}", level)
        values.append(blocks[s](values[-1], skip, label, False, at[level]))
      if level < 2:  # Every value goes into the down-sampler's cache.
        m.down_samplers[level][s](values[-1], at[level], read=False)
      if rows or level < 2:
        for i, value in enumerate(values):
          kept(f"{stack}_up_{level}_{i}", level, value)
      return values

    def down(level, values=None):
      """The level's down pass (values: its up pass's, else the cached)."""
      if values is None:
        values = [kept(f"{stack}_up_{level}_{i}", level).value
                  for i in range(self.num_resnet + 1)]
      if level == 2:
        value = values.pop()
      else:  # The coarser level's row (u) / pixel containing this one (ul).
        coarse = kept(f"{stack}_down_{level + 1}", level + 1, per_row=True)
        coarse = coarse.value if rows else row_at(coarse, level + 1)
        value = m.up_samplers[level][s](coarse, at[level])
      for i, blocks in enumerate(m.down_blocks[level]):
        skip = values.pop()
        if not rows:
          skip = jnp.concatenate([row_at(f"u_down_{level}_{i}", level),
                                  skip], axis=-1)
        value = blocks[s](value, skip, label, False, at[level])
        if rows:
          kept(f"u_down_{level}_{i}", level, value)
      assert not values, "unbalanced U-Net shortcuts"
      if level > 0:
        # A whole row (for ul, filled pixel by pixel): the next finer rows
        # come back to the earlier pixels of the row.
        var = kept(f"{stack}_down_{level}", level, per_row=True)
        var.value = value if rows else jax.lax.dynamic_update_slice_in_dim(
            var.value, value, at[level].col, axis=2)
      return value

    if stage == "up0":
      up(0)
    elif stage == "up1":
      up(1)
    elif stage == "quarter":
      down(2, up(2))
    elif stage == "down1":
      down(1)
    else:
      value = down(0)
      if not rows:
        features = jax.nn.elu(value)
        if self.num_groups > 1:
          kept("features", value=features)
        return m.outputs(features, pixel)
    return None


class _UNetModules(NamedTuple):
  """PixelCNNPlusPlus's submodules, for its cached stages: (u, ul) pairs
  per level (0 = full resolution); down_samplers[k] goes from level k to
  k + 1, up_samplers[k] from level k + 1 to k."""

  first_u: nn.Module
  first_ul_above: nn.Module
  first_ul_left: nn.Module
  up_blocks: list
  down_samplers: list
  down_blocks: list
  up_samplers: list
  outputs: Callable


def pixelcnnpp_cached_step(run: Callable, cache: Optional[dict], row: Array,
                           col: Array, channel: Array = 0,
                           channel_head: bool = False):
  """One step of PixelCNN++'s cached sampler, at pixel (row, col).

  ``run(cache, stack, stage)`` must apply the network with ``position``
  (row, col) to the current canvas, the given stack and stage and the
  "cache" collection (None: none yet) mutable, returning (outputs, the
  updated cache). Runs, in this order:

  * at the first step of each image row (col = 0, channel 0), the u
    stream's rows: full resolution row R always, then, when R is even,
    half resolution row R / 2 ("up1"), when R % 4 = 0 quarter resolution
    row R / 4 ("quarter"), then "down1", and the full-resolution down pass.
    Row R at a level needs the image rows above R at that scale only.
  * the ul stream's pixels the same way: (R, C); when R and C are even
    the half-resolution pixel (R / 2, C / 2), from the 2 x 2 window of full
    resolution values ending at (R, C), all known now; when both are
    multiples of 4 the quarter-resolution pixel; then the down pass back
    to (R, C), each level up-sampled from the cached coarser pixel that
    contains this one, and the head.
  * with ``channel_head`` (per-channel likelihoods of colour images), only
    the head at later channels (``channel`` > 0): the U-Net's features do
    not read the pixel itself.

  The coarse stages run under ``lax.cond``. Computing them at every step
  instead (the same numbers: their inputs are final by then) costs more
  than the full-resolution stages, as the coarse levels have more blocks,
  each about as costly per pixel: on pixelcnnpp_mnist (2 CPU cores, 8
  samples) a ul step took 0.68 ms that way, against 0.25 ms for the full
  resolution stages alone. With ``cache`` None, every stage runs once,
  unconditionally, to create the caches (then zero them to start).

  Returns (outputs at (row, col), [B, 1, 1, G * K]; the updated cache).
  """
  first = cache is None

  def when(pred, fn, cache):
    """fn(cache) if pred, else cache; always fn when creating caches."""
    return fn(cache) if first else jax.lax.cond(pred, fn, lambda c: c, cache)

  def stages(stack, half_due, quarter_due):
    """All stages of one stream, each coarse one when due."""
    def go(stage):
      return lambda cache: run(cache, stack, stage)[1]

    def coarse(cache):
      cache = go("up1")(cache)
      return go("down1")(when(quarter_due, go("quarter"), cache))

    return lambda cache: run(when(half_due, coarse, go("up0")(cache)),
                             stack, "down0")

  u_rows = stages("u", row % 2 == 0, row % 4 == 0)
  ul_pixel = stages("ul", (row % 2 == 0) & (col % 2 == 0),
                    (row % 4 == 0) & (col % 4 == 0))
  cache = when((col == 0) & (channel == 0), lambda c: u_rows(c)[1], cache)
  if channel_head and not first:
    return jax.lax.cond(channel == 0, ul_pixel,
                        lambda c: run(c, "head", None), cache)
  return ul_pixel(cache)


def _pixelcnnpp_stage_blocks(num_resnet: int):
  """(scanned stage name, stream index) for the unrolled network's blocks in
  creation order: block k is "GatedResnet_{2 j + stream}" for the j-th
  (u, ul) pair, up levels 0..2, then down levels 2..0."""
  pairs = [(f"up{level}", i) for level in range(3) for i in range(num_resnet)]
  pairs += [(f"down{level}", i) for level in (2, 1, 0)
            for i in range(num_resnet + (level < 2))]
  return pairs


def pixelcnnpp_unrolled_params(params: dict, num_resnet: int) -> dict:
  """Parameters of a ``PixelCNNPlusPlus`` built with ``scan_blocks=True``,
  laid out as the same network built unrolled (the same function: tested);
  e.g. for the cached sampler, which runs the unrolled network."""
  stages = {f"{stage}_{suffix}" for stage, _ in
            _pixelcnnpp_stage_blocks(num_resnet) for suffix in ("u", "ul")}
  out = {k: v for k, v in params.items() if k not in stages}
  for j, (stage, i) in enumerate(_pixelcnnpp_stage_blocks(num_resnet)):
    for stream, suffix in ((0, "u"), (1, "ul")):
      out[f"GatedResnet_{2 * j + stream}"] = trees.index(
          params[f"{stage}_{suffix}"]["block"], i)
  return out


def pixelcnnpp_scanned_params(params: dict, num_resnet: int) -> dict:
  """The inverse of ``pixelcnnpp_unrolled_params``: an unrolled network's
  parameters (e.g. an unrolled run's checkpoint) laid out for
  ``scan_blocks=True``. Optimizer state maps the same way."""
  out = {k: v for k, v in params.items() if not k.startswith("GatedResnet_")}
  blocks: dict = {}
  for j, (stage, _) in enumerate(_pixelcnnpp_stage_blocks(num_resnet)):
    for stream, suffix in ((0, "u"), (1, "ul")):
      blocks.setdefault(f"{stage}_{suffix}", []).append(
          params[f"GatedResnet_{2 * j + stream}"])
  for name, stacked in blocks.items():
    out[name] = {"block": trees.stack(stacked)}
  return out
