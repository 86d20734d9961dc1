"""Autoregressive structure of the networks, read off their Jacobians.

For an output o[i, g] (pixel i in raster order, channel group g) and input
x[j, c], the network respects the order iff d o[i, g] / d x[j, c] = 0 unless
j < i, or j = i and c < g (per-channel likelihoods; with one group per pixel,
as for the logistic mixture, only j < i). Masked weights and shifts give
exact zeros, so the check is exact; a non-zero entry is a real dependence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import autoregressive as ar

SMALL = {
    "pixelcnn": lambda **kw: ar.PixelCNN(
        width=12, num_layers=2, kernel_size=3, first_kernel_size=3,
        num_output_filters=16, **kw),
    "gated_pixelcnn": lambda **kw: ar.GatedPixelCNN(
        width=12, num_layers=3, kernel_size=3, first_kernel_size=3,
        num_output_filters=16, **kw),
    "pixelcnnpp": lambda **kw: ar.PixelCNNPlusPlus(
        width=6, num_resnet=1, dropout=0.0, **kw),
}


def dependence(net, shape, num_groups, seed=0, num_inputs=4, params=None):
  """Boolean [H*W, G, H*W, C]: does output (i, g) depend on input (j, c)?

  The union over ``num_inputs`` random images, so that a ReLU that happens
  to be off at one input does not hide a dependence the network has.
  """
  h, w, c = shape
  xs = jax.random.uniform(jax.random.PRNGKey(seed + 1),
                          (num_inputs, 1, h, w, c), minval=-1.0, maxval=1.0)
  if params is None:
    # LeCun-normal kernels and zero biases drawn with NumPy on the abstract
    # shapes: tracing the init without compiling it saves seconds per
    # network.
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(seed),
                            xs[0])["params"]
    params = jax.tree.map(
        lambda s: jnp.asarray(
            rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
            if len(s.shape) > 1 else np.zeros(s.shape), jnp.float32), shapes)

  def outputs(x):  # [1, H, W, C] -> [HW, G, K]
    return net.apply({"params": params}, x).reshape(h * w, num_groups, -1)

  jac = jax.jit(jax.vmap(jax.jacfwd(outputs)))(xs)  # [N, HW, G, K, 1, H, W, C]
  return np.asarray(jnp.abs(jac).sum(axis=(0, 3, 4)) > 0).reshape(
      h * w, num_groups, h * w, c)


def allowed_dependence(shape, num_groups):
  """The autoregressive order: [H*W, G, H*W, C] booleans."""
  h, w, c = shape
  i = np.arange(h * w)[:, None, None, None]
  g = np.arange(num_groups)[None, :, None, None]
  j = np.arange(h * w)[None, None, :, None]
  ch = np.arange(c)[None, None, None, :]
  within = (j == i) & (ch < g) if num_groups > 1 else np.zeros((), bool)
  return np.broadcast_to((j < i) | within, (h * w, num_groups, h * w, c))


# (channels, groups): grey, colour with per-channel likelihoods (R -> G -> B
# inside a pixel), colour with a whole-pixel likelihood (mixture).
# The grey cases of the two bigger nets are slow-marked: Gated PixelCNN's is
# also checked by the blind-spot test, PixelCNN++'s by its colour cases.
CASES = [
    (arch, channels, groups)
    for arch in sorted(SMALL) for channels, groups in [(1, 1), (3, 3), (3, 1)]
    if arch == "pixelcnn" or channels == 3
] + [pytest.param("gated_pixelcnn", 1, 1, marks=pytest.mark.slow),
     pytest.param("pixelcnnpp", 1, 1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("architecture,channels,num_groups", CASES)
def test_output_depends_only_on_earlier_pixels_and_channels(
    architecture, channels, num_groups):
  shape = (4, 4, channels)
  net = SMALL[architecture](num_outputs=2, num_groups=num_groups)
  dep = dependence(net, shape, num_groups)
  allowed = allowed_dependence(shape, num_groups)
  violations = np.argwhere(dep & ~allowed)
  assert violations.size == 0, f"forbidden dependences (i, g, j, c): " \
      f"{violations[:5].tolist()}"
  # Not vacuous: every pixel reads its left and upper neighbours, and each
  # colour reads the earlier colours of its own pixel.
  w = shape[1]
  for i in range(1, 16):
    if i % w:
      assert dep[i, :, i - 1].any(axis=-1).all(), (i, "left")
    if i >= w:
      assert dep[i, :, i - w].any(axis=-1).all(), (i, "above")
  if num_groups > 1:
    for g in range(num_groups):
      assert dep[5, g, 5, :g].all(), f"group {g} ignores earlier channels"
  if architecture != "pixelcnn":
    # Gated PixelCNN and PixelCNN++ see every earlier pixel (no blind spot).
    np.testing.assert_array_equal(dep, allowed)


def test_weight_normed_pixelcnnpp_keeps_the_order():
  """Weight norm's data-dependent init reads a whole batch (its statistics),
  but the initialised network is still autoregressive, with no blind spot."""
  shape = (4, 4, 3)
  net = SMALL["pixelcnnpp"](num_outputs=2, num_groups=3, weight_norm=True)
  batch = jax.random.uniform(jax.random.PRNGKey(7), (8,) + shape,
                             minval=-1.0, maxval=1.0)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), batch)["params"]
  dep = dependence(net, shape, 3, params=params)
  np.testing.assert_array_equal(dep, allowed_dependence(shape, 3))


def test_gated_pixelcnn_has_no_blind_spot_unlike_masked_stack():
  """Stacked masked 3x3 convolutions never reach up-and-to-the-right beyond
  the diagonal: pixel (r, c) cannot see (r - 1, c + 2), however deep. The
  gated vertical + horizontal stacks see every earlier pixel."""
  shape = (5, 5, 1)
  h, w, _ = shape
  allowed = allowed_dependence(shape, 1)
  gated = ar.GatedPixelCNN(num_outputs=1, width=8, num_layers=4,
                           kernel_size=3, first_kernel_size=3,
                           num_output_filters=16)
  np.testing.assert_array_equal(dependence(gated, shape, 1), allowed)

  plain = ar.PixelCNN(num_outputs=1, width=8, num_layers=4,
                      kernel_size=3, first_kernel_size=3,
                      num_output_filters=16)
  dep = dependence(plain, shape, 1)
  assert not (dep & ~allowed).any()
  i = 2 * w + 1  # pixel (2, 1)
  assert dep[i, 0, 1 * w + 2, 0], "sees (1, 2), the up-right diagonal"
  assert not dep[i, 0, 1 * w + 3, 0], "(1, 3) is in the blind spot"
  assert not dep[i, 0, 1 * w + 4, 0], "(1, 4) is in the blind spot"
  assert not dep[i, 0, 0 * w + 4, 0] or h < 5  # (0, 4): still blind
  assert (dep[i] != allowed[i]).sum() >= 3


def test_masks_of_a_colour_3x3_conv():
  """Type A: R sees nothing of the centre, G sees R, B sees R and G; type B
  adds each channel to itself. Taps before the centre are open."""
  mask_a = ar.causal_mask((3, 3), (1, 1), 3, 3, 3, "A")
  mask_b = ar.causal_mask((3, 3), (1, 1), 3, 3, 3, "B")
  lower = np.tril(np.ones((3, 3)), -1)  # [in, out]: in < out
  np.testing.assert_array_equal(mask_a[1, 1], lower.T)
  np.testing.assert_array_equal(mask_b[1, 1], lower.T + np.eye(3))
  for mask in (mask_a, mask_b):
    assert mask[0].all() and mask[1, 0].all()  # row above, pixel left
    assert not mask[2].any() and not mask[1, 2].any()  # below, right
  # Gated halves [a, b]: a_j and b_j share a group.
  np.testing.assert_array_equal(ar.channel_groups(12, 3, repeats=2),
                                [0, 0, 1, 1, 2, 2] * 2)
  with pytest.raises(ValueError, match="mask_type"):
    ar.causal_mask((3, 3), (1, 1), 3, 3, 3, "C")
