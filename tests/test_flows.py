"""Flow family tests: full RealNVP / Glow bijections, the bits/dim
accounting, the key-less likelihood, sampling and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import flows
from gm_jax.flows import bijectors as bj
from tests.test_flows_bijectors import (
  _init,
  _key,
  _perturb,
  check_bijector,
)

LOG_256 = math.log(256.0)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def tiny_config(**overrides):
  """A ``config.model`` of a tiny flow on 4x4x2 images."""
  config = flows.default_model_config()
  config.image_shape = (4, 4, 2)
  config.num_levels = 2
  config.steps_per_level = 1
  config.width = 8
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_flow(**overrides):
  """The bijection of ``tiny_config``."""
  fields = dict(image_shape=(4, 4, 2), num_levels=2, steps_per_level=1,
                width=8)
  return flows.build_flow(flows.FlowConfig(**{**fields, **overrides}))


GLOW = dict(architecture="glow", permutation="lu", coupling="affine",
            scale_fn="sigmoid", preprocess="shift")
REALNVP = dict(architecture="realnvp", coupling="affine", scale_fn="tanh",
               num_res_blocks=0, preprocess="logit", logit_alpha=0.05,
               learned_split_prior=True)


def _images(shape, key=0):
  return jax.random.randint(_key(key), shape, 0, 256).astype(jnp.float32)


@pytest.mark.parametrize("overrides", [GLOW, REALNVP], ids=["glow", "realnvp"])
def test_full_model_is_a_bijection_with_exact_log_det(overrides):
  flow = tiny_flow(**overrides)
  x = _images((2, 4, 4, 2))
  variables = _init(flow, x)
  # Continuous inputs: log-det = slogdet of the jacfwd Jacobian, through
  # the preprocessing, and inverse log-det = -forward log-det. Integer
  # images come back exactly (the inverse ends with floor).
  z, _ = check_bijector(flow, x + 0.25, variables, exact_inverse=False,
                        integer_inputs=x)
  assert z.shape == (2, 32)
  body = flow.layers[-1]
  expected = ([(2, 2, 4), (1, 1, 16)] if overrides["architecture"] == "glow"
              else [(2, 2, 4), (2, 2, 4)])
  assert [tuple(s) for s in body.latent_shapes()] == expected


def test_bits_per_dim_of_an_identity_flow_on_dequantized_data():
  # The flow is only dequantization and the scale to [0, 1): z = (x + u) /
  # 256, so the NLL of the 8-bit data is D log 256 + sum -log N(z; 0, 1).
  flow = bj.Chain([bj.UniformDequantize(256), bj.ScalarAffine(1.0 / 256)])
  levels = np.array([0, 1, 128, 255], np.float32).reshape(1, 2, 2, 1)
  num_dims = 4

  def nll(images, key):
    return -flows.flow_log_prob(flow, {}, images, key)

  # Per pixel, z lies in [k / 256, (k + 1) / 256), so the NLL lies between
  # the values at the bin edges.
  value = nll(jnp.asarray(levels), _key(0))[0]
  lower = np.sum(0.5 * (levels / 256.0)**2 + HALF_LOG_2PI) + num_dims * LOG_256
  upper = (np.sum(0.5 * ((levels + 1) / 256.0)**2 + HALF_LOG_2PI) +
           num_dims * LOG_256)
  assert lower <= value <= upper
  # Averaged over the noise: E z^2 = (k^2 + k + 1/3) / 256^2.
  many = jnp.asarray(np.repeat(levels, 4000, axis=0))
  mean_nll = jnp.mean(nll(many, _key(1)))
  expected = np.sum(0.5 * (levels**2 + levels + 1 / 3) / 256.0**2 +
                    HALF_LOG_2PI) + num_dims * LOG_256
  np.testing.assert_allclose(mean_nll, expected, rtol=1e-4)
  # An all-zero image: z < 1/256, bpd = (log 256 + 0.5 log 2 pi) / ln 2
  # up to 1e-5.
  bpd = nll(jnp.zeros((1, 2, 2, 1)), _key(2))[0] / (num_dims * math.log(2))
  np.testing.assert_allclose(bpd, (LOG_256 + HALF_LOG_2PI) / math.log(2),
                             atol=1e-5)


def test_log_prob_needs_a_key_only_to_dequantize():
  """Without dequantization the likelihood is deterministic and needs no
  key; with it, a missing key is a clear error."""
  flow = bj.Chain([bj.ScalarAffine(0.5, 1.0), bj.ActNorm(data_init=False)])
  x = jax.random.normal(_key(0), (3, 2, 2, 1))
  params = flow.init(_key(1), x)["params"]
  log_p = flows.flow_log_prob(flow, params, x)
  # z = 0.5 x + 1 (actnorm at the identity): the Gaussian log-density of z
  # plus D log 0.5.
  z = 0.5 * x + 1.0
  want = (-0.5 * np.sum(np.square(z), axis=(1, 2, 3)) - 4 * HALF_LOG_2PI +
          4 * math.log(0.5))
  np.testing.assert_allclose(log_p, want, rtol=1e-5)
  np.testing.assert_array_equal(
      log_p, flows.flow_log_prob(flow, params, x, _key(2)))
  dequantizing = bj.Chain([bj.UniformDequantize(), bj.ScalarAffine(1 / 256)])
  with pytest.raises(ValueError, match="pass a key"):
    flows.flow_log_prob(dequantizing, {}, jnp.zeros((1, 2, 2, 1)))


def test_untrained_glow_on_uniform_noise_has_the_gaussian_fit_bpd():
  # At init (identity couplings and split priors, a rotation, actnorm fitted
  # to the data) Glow is a linear whitening of the shifted data. For
  # uniformly random bytes, the expected NLL is that of a Gaussian with the
  # uniform's variance: 8 + 0.5 log2(2 pi e / 12) bits/dim.
  family = flows.make(tiny_config(**GLOW))
  images = jax.random.randint(_key(3), (2000, 4, 4, 2), 0, 256).astype(
      jnp.uint8)
  params = jax.jit(family.init)(_key(4), {"image": images[:1000]})
  metrics = jax.jit(family.evaluate)(params, {"image": images[1000:]}, _key(5))
  expected = 8 + 0.5 * math.log2(2 * math.pi * math.e / 12)
  np.testing.assert_allclose(jnp.mean(metrics["bpd"]), expected, atol=0.01)
  np.testing.assert_allclose(metrics["bpd"],
                             metrics["nll_nats"] / (32 * math.log(2)),
                             rtol=1e-6)
  loss, scalars = jax.jit(family.loss)(params, {"image": images[1000:]},
                                       _key(5), jnp.int32(0))
  np.testing.assert_allclose(loss, jnp.mean(metrics["bpd"]), rtol=1e-6)
  assert set(scalars) == {"bpd", "nll_nats"}


def test_sample_and_visualize():
  config = tiny_config(**REALNVP)
  config.width = 4
  config.visualize_temperatures = (0.0, 1.0)
  family = flows.make(config)
  images = _images((4, 4, 4, 2)).astype(jnp.uint8)
  params = jax.jit(family.init)(_key(0), {"image": images})
  sample = jax.jit(family.sample, static_argnums=2)
  x = sample(params, _key(1), 3)
  assert x.shape == (3, 4, 4, 2) and x.dtype == jnp.float32
  assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
  np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-4)
  pictures = jax.jit(family.visualize)(params, {"image": images}, _key(2))
  # One row per temperature (0 then 1), one column per z direction.
  assert set(pictures) == {"temperatures"}
  rows = pictures["temperatures"]
  assert rows.shape == (2, 4, 4, 4, 2) and rows.dtype == jnp.float32
  # Temperature 0 is z = 0 whatever the key: every sample is the same.
  cold, warm = rows
  np.testing.assert_array_equal(cold, jnp.broadcast_to(cold[:1], cold.shape))
  assert float(jnp.std(warm)) > 0.0
  # Row 1 is the inverse of unit-temperature z: the same as sample's output
  # at temperature 1 for the same draw of z.
  config.sample_temperature = 1.0
  hot = jax.jit(flows.make(config).sample, static_argnums=2)(params, _key(2),
                                                             4)
  np.testing.assert_allclose(warm, hot, atol=1e-5)


# evaluate's nll_nats of the tiny models of ``_family_at_init`` before
# num_bits existed (commit 82fce71): 8 bits must keep giving them.
EIGHT_BIT_NLL = {
    "glow": [180.4048919678, 180.1784973145, 174.9398651123, 178.2861633301],
    "realnvp": [177.5044403076, 177.255859375, 178.7838745117,
                178.0248413086],
}


def _family_at_init(config, images, key=1):
  family = flows.make(config)
  batch = {"image": images, "label": jnp.arange(images.shape[0]) % 3}
  return family, jax.jit(family.init)(_key(key), batch), batch


@pytest.mark.parametrize("name, overrides", [("glow", GLOW),
                                             ("realnvp", REALNVP)])
def test_eight_bits_reproduces_the_previous_numbers(name, overrides):
  images = jax.random.randint(_key(0), (4, 4, 4, 2), 0, 256).astype(
      jnp.uint8)
  family, params, batch = _family_at_init(
      tiny_config(num_bits=8, **overrides), images)
  results = jax.jit(family.evaluate)(params, batch, _key(2))
  np.testing.assert_allclose(results["nll_nats"], EIGHT_BIT_NLL[name],
                             rtol=1e-6)


# At init with identity actnorms and a fixed permutation, Glow is only the
# preprocessing followed by permutations: z = perm((k + u) / 2^n - 0.5).
IDENTITY_GLOW = dict(GLOW, permutation="reverse", actnorm_data_init=False)


@pytest.mark.parametrize("num_bits", [1, 3, 5, 8])
def test_n_bit_bits_per_dim_match_a_hand_computation(num_bits):
  bins = 2**num_bits
  rng = np.random.RandomState(num_bits)
  image = rng.randint(0, 256, (1, 4, 4, 2)).astype(np.uint8)
  levels = np.floor(image / 2**(8 - num_bits))  # {0, ..., 2^n - 1}
  assert levels.max() <= bins - 1
  num_dims = 32
  repeats = 2000
  family, params, batch = _family_at_init(
      tiny_config(num_bits=num_bits, **IDENTITY_GLOW),
      jnp.asarray(np.repeat(image, repeats, axis=0)))
  results = jax.jit(family.evaluate)(params, batch, _key(2))
  nll = np.asarray(results["nll_nats"], np.float64)
  # Per subpixel, z lies in the bin [a, a + w) with a = k / 2^n - 0.5 and
  # w = 1 / 2^n; the density of the n-bit data carries D log 2^n.
  a, w = levels / bins - 0.5, 1.0 / bins
  const = num_dims * (num_bits * math.log(2) + HALF_LOG_2PI)
  edges = 0.5 * np.stack([a**2, (a + w)**2])
  assert np.all(nll >= np.sum(edges.min(0)) + const - 1e-4)
  assert np.all(nll <= np.sum(edges.max(0)) + const + 1e-4)
  # Averaged over the noise: E z^2 = a^2 + a w + w^2 / 3.
  expected = np.sum(0.5 * (a**2 + a * w + w**2 / 3)) + const
  np.testing.assert_allclose(nll.mean(), expected, rtol=2e-3)
  np.testing.assert_allclose(results["bpd"],
                             nll / (num_dims * math.log(2)), rtol=1e-6)
  # Samples are n-bit levels, shown as multiples of 1 / (2^n - 1).
  x = np.asarray(jax.jit(family.sample, static_argnums=2)(
      params, _key(3), 4)) * (bins - 1)
  np.testing.assert_allclose(x, np.round(x), atol=1e-4)
  assert x.min() >= 0 and x.max() <= bins - 1


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_learned_top_prior_starts_at_the_standard_normal_and_learns():
  images = _images((6, 4, 4, 2)).astype(jnp.uint8)
  fixed, fixed_params, batch = _family_at_init(tiny_config(**GLOW), images)
  learned, params, _ = _family_at_init(
      tiny_config(learned_top_prior=True, **GLOW), images)
  prior = {p: v for p, v in _paths(params).items() if "top_prior" in p}
  assert len(prior) == 3  # the ZeroConv's kernel, bias and logs
  assert len(_paths(params)) == len(_paths(fixed_params)) + 3
  # Exactly the fixed prior's likelihood at init.
  evaluate = jax.jit(lambda f, p: f.evaluate(p, batch, _key(2)),
                     static_argnums=0)
  for name in ("nll_nats", "bpd"):
    np.testing.assert_array_equal(evaluate(learned, params)[name],
                                  evaluate(fixed, fixed_params)[name])
  grads = jax.jit(jax.grad(
      lambda p: learned.loss(p, batch, _key(2), jnp.int32(0))[0]))(params)
  grads = {p: g for p, g in _paths(grads).items() if "top_prior" in p}
  for path, grad in grads.items():
    if path.endswith("logs"):
      # d/dlogs of 0 * exp(3 logs) vanishes while the output is 0.
      np.testing.assert_array_equal(grad, 0.0)
    else:
      assert float(jnp.abs(grad).max()) > 0.0, path


_CLASSIFIER_KERNEL = "layers_2/top_prior/classifier/dense/kernel"


def _class_config():
  # One level (no split) keeps the compilations short.
  return tiny_config(learned_top_prior=True, num_classes=3,
                     class_loss_weight=0.5, num_levels=1, **GLOW)


def _set(params, predicate, fn):
  """params with fn applied to the leaves whose path satisfies predicate."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: fn(v) if predicate(
          "/".join(str(getattr(k, "key", k)) for k in path)) else v, params)


def test_class_conditional_prior_and_auxiliary_classifier():
  images = _images((6, 4, 4, 2)).astype(jnp.uint8)
  family, params, batch = _family_at_init(_class_config(), images)
  evaluate = jax.jit(family.evaluate)
  results = evaluate(params, batch, _key(2))
  assert set(results) == {"nll_nats", "bpd", "class_bits", "class_error"}
  # Uniform predictions at init: log2(3) bits; the likelihood does not
  # depend on the labels yet.
  np.testing.assert_allclose(results["class_bits"], math.log2(3), rtol=1e-6)
  other = dict(batch, label=(batch["label"] + 1) % 3)
  np.testing.assert_array_equal(results["nll_nats"],
                                evaluate(params, other, _key(2))["nll_nats"])
  # The objective adds weight * class_bits; bpd is reported without it.
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p: family.loss(p, batch, _key(2), jnp.int32(0)), has_aux=True))
  (loss, metrics), grads = loss_and_grad(params)
  np.testing.assert_allclose(
      loss, jnp.mean(results["bpd"]) + 0.5 * math.log2(3), rtol=1e-6)
  np.testing.assert_allclose(metrics["bpd"], jnp.mean(results["bpd"]),
                             rtol=1e-6)
  # The classifier is trained: its weights get gradients.
  assert float(jnp.abs(_paths(grads)[_CLASSIFIER_KERNEL]).max()) > 0.0

  # After a few training steps the labels matter, only through the class
  # prior: zeroing it makes the likelihood label-independent again.
  step = jax.jit(lambda p, g: jax.tree.map(lambda v, d: v - 0.05 * d, p, g))
  for _ in range(3):
    params = step(params, grads)
    grads = loss_and_grad(params)[1]
  nll = evaluate(params, batch, _key(2))["nll_nats"]
  assert np.all(np.abs(nll - evaluate(params, other, _key(2))["nll_nats"])
                > 1e-4)
  no_class = _set(params, lambda p: "class_prior" in p, jnp.zeros_like)
  np.testing.assert_array_equal(
      evaluate(no_class, batch, _key(2))["nll_nats"],
      evaluate(no_class, other, _key(2))["nll_nats"])

  # A proper cross-entropy: over the possible labels of an image, the
  # classifier's probabilities 2^-class_bits sum to one.
  classifier = _set(params, lambda p: p == _CLASSIFIER_KERNEL,
                    lambda k: jax.random.normal(_key(5), k.shape))
  probs = [2.0**-evaluate(classifier,
                          dict(batch, label=jnp.full((6,), k, jnp.int32)),
                          _key(2))["class_bits"] for k in range(3)]
  np.testing.assert_allclose(sum(probs), 1.0, rtol=1e-5)
  assert float(jnp.std(probs[0])) > 0.0


def test_class_conditional_samples_cycle_through_the_classes():
  images = _images((3, 4, 4, 2)).astype(jnp.uint8)
  config = _class_config()
  family, params, _ = _family_at_init(config, images)
  params = _perturb(params, _key(4), scale=0.1)
  flow = flows.build_flow(flows.FlowConfig(
      **{k: v for k, v in config.to_dict().items() if k != "family"}))

  @jax.jit
  def run(params):
    def by_hand(labels):
      levels = flows.flow_sample(flow, params, _key(1), 6, 32, 0.7, labels)
      return jnp.clip(levels, 0, 255) / 255.0
    return (family.sample(params, _key(1), 6),
            by_hand(jnp.arange(6) % 3), by_hand((jnp.arange(6) + 1) % 3))

  x, cycling, shifted = run(params)
  assert x.shape == (6, 4, 4, 2)
  np.testing.assert_array_equal(x, cycling)
  assert not np.allclose(x, shifted)
  with pytest.raises(ValueError, match="needs 'label'"):
    family.evaluate(params, {"image": images}, _key(0))


@pytest.mark.parametrize("overrides, message", [
    (dict(architecture="maf"), "model.architecture='maf'"),
    (dict(image_shape=(6, 6, 2)), "divisible by 4"),
    (dict(architecture="realnvp", num_levels=3, image_shape=(6, 6, 1)),
     "divisible by 4"),
    (dict(permutation="random"), "model.permutation='random'"),
    (dict(coupling="nonsense"), "model.coupling='nonsense'"),
    (dict(coupling="spline", spline_bins=1), "model.spline_bins=1"),
    (dict(scale_fn="exp"), "model.scale_fn='exp'"),
    (dict(preprocess="none"), "model.preprocess='none'"),
    (dict(logit_alpha=0.5), "model.logit_alpha=0.5"),
    (dict(steps_per_level=0), "model.steps_per_level=0"),
    (dict(sample_temperature=-1.0), "model.sample_temperature=-1.0"),
    (dict(num_steps=4), r"Unknown config.model key\(s\) \['num_steps'\]"),
    (dict(num_bits=0), "model.num_bits=0 must be in 1..8"),
    (dict(num_bits=9), "model.num_bits=9 must be in 1..8"),
    (dict(num_classes=-1), "model.num_classes=-1"),
    (dict(class_loss_weight=0.1), "needs num_classes >= 2"),
    (dict(class_loss_weight=-1.0, num_classes=3),
     "model.class_loss_weight=-1.0 must be >= 0"),
    (dict(conditioner="resnet"), "model.conditioner='resnet'"),
])
def test_make_rejects_bad_configs(overrides, message):
  with pytest.raises(ValueError, match=message):
    flows.make(tiny_config(**overrides))
