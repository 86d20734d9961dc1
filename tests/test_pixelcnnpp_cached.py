"""PixelCNN++'s cached sampler (``fast_sampling``).

Each step computes the u stream's newly computable rows and the ul stream's
newly computable pixels at the three resolutions, from caches; the tests
check that every step's outputs equal the full network's on the same
canvas, that whole samples equal the full-pass sampler's, and that a
sample really costs about one network pass (not one per pixel).
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import autoregressive as ar
from gm_jax import schema
from gm_jax.autoregressive import layers as ar_layers
from gm_jax.autoregressive import networks
from tests.test_pixelcnn import apply_with_cache

STAGES = networks.PIXELCNNPP_STAGES


def model_config(**overrides):
  config = ar.default_model_config()
  config.update(dict(architecture="pixelcnnpp", width=4, num_resnet=1,
                     num_mixtures=2, binarize="none", dropout=0.3))
  config.update(overrides)
  return config


def network_and_params(config, shape, seed=0):
  """The network, a batch of 2 random images in [-1, 1], labels (or None)
  and random parameters: LeCun-normal kernels, weight-norm scales near 1
  and non-zero biases (a zero bias could hide a misplaced zero padding),
  drawn with NumPy on the abstract shapes (compiling the init would take
  longer than the test)."""
  spec = schema.parse(ar.PixelCNNConfig, config)
  net = ar.build_network(spec)
  x = jax.random.uniform(jax.random.PRNGKey(seed), (2,) + shape, minval=-1.0)
  label = jnp.array([0, 2]) if spec.num_classes else None
  shapes = jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, label), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if len(leaf.shape) > 1:  # kernel: fan-in = all axes but the last
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return 1.0 + 0.1 * rng.normal(size=leaf.shape)
    return 0.1 * rng.normal(size=leaf.shape)

  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), jnp.float32), shapes)
  return spec, net, x, label, params


def zero_cache(step, x):
  """The sampler's caches, zero (their shapes from a first step)."""
  shapes = jax.eval_shape(lambda x: step(None, x, 0, 0, 0)[1], x)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cached_step_fn(net, params, label, shape, channel_head):
  """step(cache, canvas, row, col, channel) -> (outputs [B, G * K], cache),
  the sampler's step; and run(cache, canvas, row, col, stack, stage)."""
  height, width, _ = shape

  def run(cache, canvas, row, col, stack, stage):
    return apply_with_cache(net, params, cache, canvas, label,
                            ar_layers.Position(row, col, height, width),
                            stack=stack, stage=stage)

  def step(cache, canvas, row, col, channel):
    out, cache = networks.pixelcnnpp_cached_step(
        lambda c, stack, stage: run(c, canvas, row, col, stack, stage),
        cache, row, col, channel, channel_head=channel_head)
    return out[:, 0, 0], cache

  return step, run


@pytest.mark.parametrize("likelihood,shape,overrides", [
    ("logistic_mixture", (8, 8, 1), {"num_classes": 3}),  # grey, labels
    ("logistic_mixture", (8, 8, 3), {"weight_norm": True}),  # RGB
    # Per-channel: the channel-masked head, rerun alone at channels 1, 2.
    ("categorical", (8, 8, 3), {"weight_norm": True, "num_classes": 3}),
], ids=["grey-conditional", "rgb-weight_norm", "rgb-per_channel"])
def test_cached_steps_equal_the_full_pass(likelihood, shape, overrides):
  """The sampler's procedure on a random image: at every step (pixel, and
  channel for per-channel models) the canvas holds the earlier pixels and
  the pixel's earlier channels; the cached step's outputs equal the full
  network's at that pixel on that canvas. 8 x 8 images give 2 x 2 pixels
  at the quarter resolution, so every level's caches are read back on a
  later row."""
  config = model_config(likelihood=likelihood, image_shape=shape,
                        **overrides)
  spec, net, x, label, params = network_and_params(config, shape)
  full = jax.jit(lambda canvas: net.apply({"params": params}, canvas, label))
  step, _ = cached_step_fn(net, params, label, shape,
                           channel_head=spec.num_groups > 1)
  cache = zero_cache(step, x)
  step = jax.jit(step)
  height, width, channels = shape
  steps_per_pixel = channels if spec.per_channel else 1
  order = np.arange(height * width * channels).reshape(shape)
  for row in range(height):
    for col in range(width):
      for ch in range(steps_per_pixel):
        canvas = jnp.where(order < order[row, col, ch], x, 0.0)
        out, cache = step(cache, canvas, row, col, ch)
        expected = full(canvas)[:, row, col]
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5,
                                   err_msg=f"step {(row, col, ch)}")


@pytest.mark.parametrize("likelihood,shape,overrides", [
    # (The default run samples a mixture model in test_pixelcnn.)
    pytest.param("logistic_mixture", (8, 8, 1), {}, marks=pytest.mark.slow),
    ("categorical", (4, 8, 3), {"num_classes": 2}),
], ids=["grey-mixture", "rgb-per_channel"])
def test_cached_sampler_draws_the_full_pass_samplers_images(
    likelihood, shape, overrides):
  """Same key, same images, with fast_sampling on and off."""
  config = model_config(likelihood=likelihood, image_shape=shape, **overrides)
  _, _, _, _, params = network_and_params(config, shape)
  fast = ar.make(config)
  naive = ar.make(model_config(likelihood=likelihood, image_shape=shape,
                               fast_sampling=False, **overrides))
  args = (params, jax.random.PRNGKey(7), 3)
  images = np.asarray(jax.jit(fast.sample, static_argnums=2)(*args))
  expected = np.asarray(jax.jit(naive.sample, static_argnums=2)(*args))
  # The same 8-bit levels; the floats (level / 255, computed in differently
  # fused programs) may differ in the last bit.
  np.testing.assert_array_equal(np.rint(images * 255), np.rint(expected * 255))
  np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)
  assert len(np.unique(np.rint(images * 255))) > 10  # not a constant image


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def conv_output_sizes(fn, *args):
  """Spatial output sizes (h, w) of every convolution in fn's jaxpr."""
  sizes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        sizes.append(tuple(eqn.outvars[0].aval.shape[1:3]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return sizes


def test_a_cached_sample_costs_about_one_network_pass():
  """FLOPs (XLA's cost analysis) of every stage, weighted by how often the
  sampler runs it (u stages once per image row, the coarse ones every
  second / fourth; ul stages once per pixel, the coarse ones at one pixel
  in 4 / 16), add up to about one full pass -- a full-pass sampler costs
  H * W = 64 passes. And no convolution of the per-pixel ul stages
  produces more than a pixel's window of outputs."""
  shape = (8, 8, 3)
  config = model_config(likelihood="logistic_mixture", image_shape=shape,
                        width=8)
  _, net, x, label, params = network_and_params(config, shape)
  height, width, _ = shape
  step, run = cached_step_fn(net, params, label, shape, channel_head=False)
  cache = zero_cache(step, x)
  full = flops(lambda x: net.apply({"params": params}, x, label), x)

  per_sample = 0.0
  for stack, runs in (("u", height), ("ul", height * width)):
    for stage, fraction in zip(STAGES, (1, 1 / 2, 1 / 4, 1 / 2, 1),
                               strict=True):
      if stack == "ul":
        fraction = fraction ** 2  # rows and columns

      def stage_fn(cache, x, stack=stack, stage=stage):
        return run(cache, x, 3, 5, stack, stage)
      stage_flops = flops(stage_fn, cache, x)
      print(f"{stack} {stage}: {stage_flops / full:.4f} of a full pass")
      assert stage_flops < full / 4, (stack, stage, stage_flops, full)
      per_sample += runs * fraction * stage_flops
      if stack == "ul":
        sizes = conv_output_sizes(stage_fn, cache, x)
        assert sizes and max(h * w for h, w in sizes) <= 4, (stage, sizes)
  print(f"cached sample / full pass: {per_sample / full:.2f} FLOPs")
  assert 0.5 * full < per_sample < 2.0 * full, (per_sample, full)


def test_stage_names_are_checked():
  shape = (4, 4, 1)
  config = model_config(likelihood="logistic_mixture", image_shape=shape)
  _, net, x, label, params = network_and_params(config, shape)
  with pytest.raises(ValueError, match="stage"):
    net.apply({"params": params}, x, label,
              position=ar_layers.Position(0, 0, 4, 4), stack="ul",
              stage="up2", mutable=["cache"])
