"""The autoregressive family through its Family interface.

Exact normalisation of the whole model over every image of a tiny space,
samples that follow the model's own probabilities, deterministic sampling,
binarization, class conditioning, config errors and the paper config.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import autoregressive as ar
from gm_jax import config_lib, losses, schema
from gm_jax.autoregressive import layers as ar_layers


def apply_with_cache(net, params, cache, canvas, label, position, **kwargs):
  """One cached sampling call of ``net`` at ``position``: (outputs, the
  updated "cache" collection); ``cache`` None creates it."""
  variables = {"params": params}
  if cache is not None:
    variables["cache"] = cache
  out, variables = net.apply(variables, canvas, label, position=position,
                             mutable=["cache"], **kwargs)
  return out, variables["cache"]


def model_config(**overrides):
  config = ar.default_model_config()
  config.update(dict(width=6, num_layers=2, kernel_size=3,
                     first_kernel_size=3, num_output_filters=8, num_resnet=1,
                     num_mixtures=2))
  config.update(overrides)
  return config


def batch_of(images, labels=None):
  images = jnp.asarray(images, jnp.uint8)
  if labels is None:
    labels = jnp.zeros(images.shape[0], jnp.int32)
  return {"image": images, "label": jnp.asarray(labels, jnp.int32)}


def all_binary_images(shape):
  size = int(np.prod(shape))
  return np.array(list(itertools.product([0, 1], repeat=size)),
                  np.uint8).reshape((-1,) + shape)


@pytest.mark.parametrize("architecture", ["pixelcnn", "gated_pixelcnn"])
def test_model_is_normalised_over_all_binary_colour_images(architecture):
  """sum_x p(x) = 1 over all 2^12 binary 2x2 RGB images: the R -> G -> B and
  raster order make a proper distribution (a leak would inflate the sum)."""
  family = ar.make(model_config(architecture=architecture,
                                image_shape=(2, 2, 3), binarize="none"))
  images = all_binary_images((2, 2, 3))
  params = jax.jit(family.init)(jax.random.PRNGKey(0),
                                batch_of(images[:4]))
  nll = jax.jit(family.evaluate)(params, batch_of(images),
                                 jax.random.PRNGKey(1))["nll_nats"]
  np.testing.assert_allclose(jnp.exp(-nll).sum(), 1.0, rtol=1e-4)
  # Not the uniform distribution (the test would pass trivially).
  assert float(jnp.std(nll)) > 1e-3


def test_categorical_model_is_normalised_over_all_8bit_two_channel_pixels():
  """All 256^2 values of a 1x1 two-channel 8-bit image: channel 1's 256-way
  softmax is conditioned on channel 0 of the same pixel."""
  family = ar.make(model_config(image_shape=(1, 1, 2),
                                likelihood="categorical", binarize="none"))
  values = np.stack(np.meshgrid(np.arange(256), np.arange(256),
                                indexing="ij"), -1).reshape(-1, 1, 1, 2)
  params = jax.jit(family.init)(jax.random.PRNGKey(0),
                                batch_of(values[:4]))
  nll = jax.jit(family.evaluate)(params, batch_of(values),
                                 jax.random.PRNGKey(1))["nll_nats"]
  np.testing.assert_allclose(jnp.exp(-nll).sum(), 1.0, rtol=1e-4)
  # p(x_1 | x_0) changes with x_0: the within-pixel dependence is used.
  cond = jnp.exp(-nll).reshape(256, 256)
  cond = cond / cond.sum(1, keepdims=True)
  assert float(jnp.abs(cond[0] - cond[255]).sum()) > 1e-3


def test_samples_follow_the_model_probabilities():
  """Frequencies of 8,000 samples over the 16 binary 2x2 images match the
  probabilities evaluate() assigns (sampling and training agree)."""
  family = ar.make(model_config(image_shape=(2, 2, 1), binarize="none"))
  images = all_binary_images((2, 2, 1))
  params = jax.jit(family.init)(jax.random.PRNGKey(3), batch_of(images))
  # Sharpen the model so the distribution is far from uniform.
  params = jax.tree.map(lambda p: 3.0 * p, params)
  prob = np.exp(-np.asarray(jax.jit(family.evaluate)(
      params, batch_of(images), jax.random.PRNGKey(0))["nll_nats"]))
  samples = jax.jit(family.sample, static_argnums=2)(
      params, jax.random.PRNGKey(4), 8000)
  bits = np.asarray(samples).reshape(8000, 4).astype(int)
  freq = np.bincount(bits @ np.array([8, 4, 2, 1]), minlength=16) / 8000
  assert prob.max() > 2.0 / 16
  # Binomial standard error sqrt(p (1 - p) / n) <= 0.0056; allow 4.5.
  np.testing.assert_allclose(freq, prob, atol=0.025)


SAMPLING_CASES = [
    ("pixelcnn", "bernoulli", (4, 4, 1)),
    # Gated PixelCNN's sampler also runs in the class-conditioning test.
    pytest.param("gated_pixelcnn", "categorical", (2, 3, 3),
                 marks=pytest.mark.slow),
    ("pixelcnnpp", "logistic_mixture", (4, 4, 3)),
]


@pytest.mark.parametrize("architecture,likelihood,shape", SAMPLING_CASES)
def test_sampling_is_deterministic_and_scored_finite(architecture, likelihood,
                                                     shape):
  family = ar.make(model_config(
      architecture=architecture, likelihood=likelihood, image_shape=shape,
      binarize="threshold" if likelihood == "bernoulli" else "none",
      dropout=0.5))
  images = jax.random.randint(jax.random.PRNGKey(0), (2,) + shape, 0, 256)
  params = jax.jit(family.init)(jax.random.PRNGKey(1), batch_of(images))
  sample = jax.jit(family.sample, static_argnums=2)
  first = sample(params, jax.random.PRNGKey(5), 3)
  again = sample(params, jax.random.PRNGKey(5), 3)
  other = sample(params, jax.random.PRNGKey(6), 3)
  assert first.shape == (3,) + shape and first.dtype == jnp.float32
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  levels = np.asarray(first) * 255.0
  np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
  assert levels.min() >= 0.0 and levels.max() <= 255.0
  # Score the samples as data: finite, with a loss that matches evaluate.
  scored = batch_of(np.rint(levels).astype(np.uint8))
  nll = jax.jit(family.evaluate)(params, scored, jax.random.PRNGKey(0))
  assert bool(jnp.all(jnp.isfinite(nll["nll_nats"])))
  np.testing.assert_allclose(
      nll["bpd"], nll["nll_nats"] / (np.prod(shape) * np.log(2.0)), rtol=1e-5)
  if architecture != "pixelcnnpp":  # (Saves a compile of the big net.)
    loss, metrics = jax.jit(family.loss)(params, scored,
                                         jax.random.PRNGKey(2), jnp.int32(0))
    # No dropout and deterministic binarization: loss = mean evaluate NLL.
    np.testing.assert_allclose(loss, nll["nll_nats"].mean(), rtol=1e-5)
    assert set(metrics) == {"nll_nats", "bpd"}


@pytest.mark.parametrize("architecture", ["pixelcnn", "gated_pixelcnn"])
def test_fast_sampling_window_is_exact_and_tight(architecture):
  """The output at row r equals the output computed on the receptive_rows
  rows ending at r alone; one row fewer changes it. And the cached sampler
  draws exactly the naive sampler's images."""
  shape = (7, 3, 2)
  config = model_config(architecture=architecture, image_shape=shape,
                        likelihood="categorical", binarize="none",
                        num_layers=2)
  spec = schema.parse(ar.PixelCNNConfig, config)
  window = ar.receptive_rows(spec)
  assert window == 4  # 1 + 1 + 2 * 1 rows for both nets here.
  net = ar.build_network(spec)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1,) + shape, minval=-1.0)
  params = jax.jit(net.init)(ar.rbg_key(jax.random.PRNGKey(1)), x)["params"]
  apply = jax.jit(lambda x: net.apply({"params": params}, x))
  full = apply(x)
  for rows, exact in ((window, True), (window - 1, False)):
    last = apply(x[:, shape[0] - rows:])[:, -1]
    close = np.allclose(last, full[:, -1], atol=1e-5)
    assert close == exact, (rows, exact)

  fast = ar.make(config)
  naive = ar.make(model_config(architecture=architecture, image_shape=shape,
                               likelihood="categorical", binarize="none",
                               num_layers=2, fast_sampling=False))
  sample_args = (params, jax.random.PRNGKey(7), 2)
  np.testing.assert_array_equal(
      jax.jit(fast.sample, static_argnums=2)(*sample_args),
      jax.jit(naive.sample, static_argnums=2)(*sample_args))


@pytest.mark.parametrize("architecture,likelihood,shape", [
    ("pixelcnn", "categorical", (4, 5, 3)),  # colour groups, per channel
    ("pixelcnn", "logistic_mixture", (3, 4, 3)),  # one step per pixel
    ("gated_pixelcnn", "categorical", (4, 5, 3)),
    ("gated_pixelcnn", "logistic_mixture", (3, 4, 3)),
])
def test_cached_outputs_equal_the_full_pass(architecture, likelihood, shape):
  """The sampler's procedure on a random image: at every step (pixel, and
  channel for per-channel models) the canvas holds the earlier pixels and
  the pixel's earlier channels; the cached step's outputs (after the
  vertical stack's row at each row start, for Gated PixelCNN) equal the
  full network's outputs at that pixel on that canvas."""
  config = model_config(architecture=architecture, image_shape=shape,
                        likelihood=likelihood, binarize="none", num_layers=3,
                        first_kernel_size=5)
  gated = architecture == "gated_pixelcnn"
  net = ar.build_network(schema.parse(ar.PixelCNNConfig, config))
  x = jax.random.uniform(jax.random.PRNGKey(0), (2,) + shape, minval=-1.0)
  params = jax.jit(net.init)(ar.rbg_key(jax.random.PRNGKey(1)), x)["params"]
  full = jax.jit(lambda x: net.apply({"params": params}, x))
  height, width, channels = shape
  steps_per_pixel = channels if likelihood == "categorical" else 1

  def step(cache, canvas, row, col, **stack):
    out, cache = apply_with_cache(
        net, params, cache, canvas, None,
        ar_layers.Position(row, col, height, width), **stack)
    return out[:, 0, 0], cache

  cache = step(None, x, 0, 0, stack="vertical")[1] if gated else None
  cache = jax.tree.map(jnp.zeros_like, step(cache, x, 0, 0)[1])
  # PixelCNN: the 3x3 layers' inputs (the 1x1 ones need none). Gated: the
  # inputs of the horizontal 1 x 2 and the vertical 2 x 3 layers after the
  # first (which read the canvas), and each vertical layer's
  # pre-activation row.
  assert len(jax.tree.leaves(cache)) == (2 + 2 + 3 if gated else 3)
  cached_step = jax.jit(step)
  vertical = jax.jit(functools.partial(step, stack="vertical"))
  order = np.arange(height * width * channels).reshape(shape)
  for row in range(height):
    for col in range(width):
      for ch in range(steps_per_pixel):
        known = order < order[row, col, ch]  # earlier pixels and channels
        canvas = jnp.where(known, x, 0.0)
        if gated and col == 0 and ch == 0:
          cache = vertical(cache, canvas, row, col)[1]
        out, cache = cached_step(cache, canvas, row, col)
        np.testing.assert_allclose(out, full(canvas)[:, row, col], atol=2e-5,
                                   err_msg=f"step {(row, col, ch)}")


def test_binarization_modes():
  image = jnp.array([0, 1, 127, 128, 200, 255], jnp.uint8).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(
      losses.binarize_images(image, "threshold").ravel(), [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(losses.binarize_images(image, "none").ravel(),
                                [0, 1, 127, 128, 200, 255])
  grey = jnp.full((20_000,), 64, jnp.uint8)
  draws = losses.binarize_images(grey, "dynamic", jax.random.PRNGKey(0))
  assert set(np.unique(draws)) == {0.0, 1.0}
  np.testing.assert_allclose(draws.mean(), 64 / 255, atol=0.015)
  with pytest.raises(ValueError, match="needs a key"):
    losses.binarize_images(grey, "dynamic")


def test_dynamic_binarization_draws_from_the_evaluation_key():
  family = ar.make(model_config(image_shape=(4, 4, 1), binarize="dynamic"))
  batch = batch_of(jnp.full((2, 4, 4, 1), 128, jnp.uint8))
  params = jax.jit(family.init)(jax.random.PRNGKey(0), batch)
  evaluate = jax.jit(family.evaluate)
  a = evaluate(params, batch, jax.random.PRNGKey(1))["nll_nats"]
  b = evaluate(params, batch, jax.random.PRNGKey(1))["nll_nats"]
  c = evaluate(params, batch, jax.random.PRNGKey(2))["nll_nats"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_class_conditioning_changes_the_likelihood():
  family = ar.make(model_config(architecture="gated_pixelcnn",
                                image_shape=(4, 4, 1), num_classes=3))
  images = jax.random.randint(jax.random.PRNGKey(0), (3, 4, 4, 1), 0, 256)
  params = jax.jit(family.init)(jax.random.PRNGKey(1),
                                batch_of(images, [0, 1, 2]))
  params = jax.tree.map(lambda p: p + 0.5, params)  # Non-zero embeddings.
  evaluate = jax.jit(family.evaluate)
  nll0 = evaluate(params, batch_of(images, [0, 0, 0]), jax.random.PRNGKey(2))
  nll1 = evaluate(params, batch_of(images, [1, 1, 1]), jax.random.PRNGKey(2))
  assert float(jnp.abs(nll0["nll_nats"] - nll1["nll_nats"]).max()) > 1e-3
  samples = jax.jit(family.sample, static_argnums=2)(
      params, jax.random.PRNGKey(3), 4)
  assert samples.shape == (4, 4, 4, 1)


@pytest.mark.parametrize("overrides,message", [
    (dict(architecture="pixelrnn"), "architecture='pixelrnn'"),
    (dict(likelihood="gaussian"), "likelihood='gaussian'"),
    (dict(binarize="otsu"), "binarize='otsu'"),
    (dict(likelihood="categorical"), "needs likelihood='bernoulli'"),
    (dict(architecture="pixelcnnpp", image_shape=(28, 30, 1)),
     "divisible by 4"),
    (dict(kernel_size=4), "kernel_size=4"),
    (dict(image_shape=(8, 8, 3), width=2), "width=2"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(num_classes=-1), "num_classes=-1"),
    (dict(image_shape=(8, 8)), "image_shape"),
])
def test_bad_model_config_is_rejected_with_the_key(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    ar.make(model_config(**overrides))


def test_batch_of_the_wrong_shape_is_rejected():
  family = ar.make(model_config(image_shape=(4, 4, 1)))
  with pytest.raises(ValueError, match="image_shape"):
    family.init(jax.random.PRNGKey(0), batch_of(np.zeros((1, 5, 4, 1))))


def test_paper_config_keeps_the_paper_hyper_parameters():
  config = config_lib.load("configs/pixelcnnpp_cifar10.py")
  assert (config.model.width, config.model.num_resnet,
          config.model.num_mixtures, config.model.dropout) == (160, 5, 10, 0.5)
  assert config.optim.ema_decay == 0.9995
  assert config.optim.learning_rate == 1e-3
  assert config.optim.schedule == "exponential"


def test_default_model_config_is_valid():
  spec = schema.parse(ar.PixelCNNConfig, ar.default_model_config())
  assert (spec.architecture, spec.likelihood, spec.binarize) == (
      "pixelcnn", "bernoulli", "threshold")
  assert spec.num_groups == 1 and spec.num_outputs == 1
