"""The shared likelihoods: normalisation, closed forms, stability, errors."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses


def _levels(num_bins):
  return losses.scale_to_symmetric(jnp.arange(num_bins), num_bins)


@pytest.mark.parametrize("fn", [losses.discretized_logistic_log_prob,
                                losses.discretized_gaussian_log_prob])
@pytest.mark.parametrize("num_bins", [2, 8, 256])
def test_discretized_likelihoods_sum_to_one(fn, num_bins):
  x = _levels(num_bins)[:, None]  # [K, 1], one column per (mean, scale)
  means = jnp.array([-1.3, -1.0, -0.2, 0.0, 0.5, 1.0, 2.0, 0.01])[None]
  log_scales = jnp.array([-7.0, -4.0, -2.0, 0.0, 1.0, -5.0, -1.0, 3.0])[None]
  log_p = fn(x, means, log_scales, num_bins)
  assert np.all(np.isfinite(log_p))
  np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, atol=2e-5)


def test_discretized_logistic_matches_cdf_difference():
  x = _levels(256)[100]
  mean, log_scale = 0.1, -3.0
  s = math.exp(log_scale)
  h = 1 / 255
  def sig(v):
    return 1 / (1 + math.exp(-v))
  want = math.log(sig((x + h - mean) / s) - sig((x - h - mean) / s))
  got = losses.discretized_logistic_log_prob(x, mean, log_scale)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_discretized_gaussian_far_tail_is_finite_and_has_gradients():
  # The DDPM decoder at tiny noise: the mean is far from x in units of std.
  x = _levels(256)[128]
  grad = jax.grad(lambda m: losses.discretized_gaussian_log_prob(x, m, -6.0))
  for mean in (-0.9, 0.9):
    value = losses.discretized_gaussian_log_prob(x, mean, -6.0)
    assert np.isfinite(value) and value < -1e3
    assert np.isfinite(grad(mean))


@pytest.mark.parametrize("num_channels", [1, 3])
def test_logistic_mixture_sums_to_one(num_channels):
  num_bins, num_mix = 8, 3
  levels = np.asarray(_levels(num_bins))
  pixels = np.array(list(itertools.product(levels, repeat=num_channels)))
  rng = np.random.default_rng(0)
  params = rng.normal(size=losses.mixture_num_params(num_channels, num_mix))
  params = jnp.broadcast_to(jnp.asarray(params, jnp.float32),
                            (len(pixels), params.size))
  log_p = losses.discretized_logistic_mixture_log_prob(
      jnp.asarray(pixels, jnp.float32), params, num_mix, num_bins)
  np.testing.assert_allclose(jnp.exp(log_p).sum(), 1.0, atol=1e-5)


def test_logistic_mixture_grey_256_sums_to_one():
  params = jnp.array([0.3, -0.2, 0.5, -0.4, 0.1, -3.0], jnp.float32)  # M=2
  x = _levels(256)[:, None]
  log_p = losses.discretized_logistic_mixture_log_prob(
      x, jnp.broadcast_to(params, (256, 6)), 2)
  np.testing.assert_allclose(jnp.exp(log_p).sum(), 1.0, atol=1e-5)


def test_mixture_sampler_matches_probabilities():
  num_bins, num_mix, c = 4, 2, 2
  levels = np.asarray(_levels(num_bins))
  params = jnp.array([0.5, -0.5, 0.2, -0.6, 0.3, 0.1, -0.5, -1.0, -0.8, -0.3,
                      1.5, -2.0], jnp.float32)
  assert params.size == losses.mixture_num_params(c, num_mix)
  n = 40_000
  draws = losses.sample_discretized_logistic_mixture(
      jnp.broadcast_to(params, (n, params.size)), jax.random.PRNGKey(0), c,
      num_mix, num_bins)
  codes = np.rint((np.asarray(draws) + 1) / 2 * (num_bins - 1)).astype(int)
  freq = np.bincount(codes[:, 0] * num_bins + codes[:, 1],
                     minlength=num_bins**2) / n
  pixels = np.array(list(itertools.product(levels, repeat=c)), np.float32)
  probs = jnp.exp(losses.discretized_logistic_mixture_log_prob(
      jnp.asarray(pixels), jnp.broadcast_to(params, (len(pixels), params.size)),
      num_mix, num_bins))
  np.testing.assert_allclose(freq, probs, atol=0.01)


def test_mixture_rejects_wrong_parameter_count():
  with pytest.raises(ValueError, match="needs 30 parameters"):
    losses.discretized_logistic_mixture_log_prob(
        jnp.zeros((2, 3)), jnp.zeros((2, 29)), 3)
  # Without the optional check: not a multiple of one RGB component's 10.
  with pytest.raises(ValueError, match="multiple of 10 parameters"):
    losses.discretized_logistic_mixture_log_prob(
        jnp.zeros((2, 3)), jnp.zeros((2, 29)))
  with pytest.raises(ValueError, match="do not broadcast"):
    losses.discretized_logistic_mixture_log_prob(
        jnp.zeros((2, 3)), jnp.zeros((4, 30)))


def test_mixture_size_is_inferred_from_the_parameters():
  """M = P / (1 + 2C + C(C-1)/2): giving it changes nothing; the sampler
  infers it too, and the log-prob broadcasts one parameter set over
  pixels."""
  rng = np.random.default_rng(1)
  log_prob = losses.discretized_logistic_mixture_log_prob
  sample = losses.sample_discretized_logistic_mixture

  @jax.jit
  def compare(x, params, key):  # One program per shape: one compilation.
    c, m = x.shape[-1], losses.mixture_num_components(params.shape[-1],
                                                      x.shape[-1])
    return (log_prob(x, params), log_prob(x, params, m),
            log_prob(x, params[0]),
            log_prob(x, jnp.broadcast_to(params[0], params.shape)),
            sample(params, key, c), sample(params, key, c, m))

  for c, m in ((1, 4), (3, 2)):
    p = losses.mixture_num_params(c, m)
    assert losses.mixture_num_components(p, c) == m
    x = losses.scale_to_symmetric(jnp.asarray(rng.integers(0, 256, (6, c))))
    params = jnp.asarray(rng.normal(size=(6, p)), jnp.float32)
    inferred, given, shared, broadcast, drawn, drawn_given = compare(
        x, params, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(inferred, given)
    np.testing.assert_allclose(shared, broadcast, rtol=1e-6)
    np.testing.assert_array_equal(drawn, drawn_given)


def test_bernoulli_and_categorical():
  logits = jnp.array([-2.0, 0.0, 3.0])
  x = jnp.array([1.0, 0.0, 1.0])
  p = jax.nn.sigmoid(logits)
  want = jnp.log(jnp.where(x > 0, p, 1 - p))
  np.testing.assert_allclose(losses.bernoulli_log_prob(x, logits), want,
                             rtol=1e-6)
  big = losses.bernoulli_log_prob(jnp.array([0.0]), jnp.array([100.0]))
  np.testing.assert_allclose(big, -100.0)

  cat_logits = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
  all_values = jnp.arange(7)[:, None] * jnp.ones((1, 5), jnp.int32)
  log_p = jax.vmap(lambda v: losses.categorical_log_prob(v, cat_logits))(
      all_values)
  np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="do not broadcast"):
    losses.categorical_log_prob(jnp.zeros((4,), jnp.int32), cat_logits)
  with pytest.raises(ValueError, match="do not broadcast"):
    losses.bernoulli_log_prob(jnp.zeros(3), jnp.zeros(4))


def test_data_comes_first():
  """x first, then the parameters: swapping them gives other numbers, and
  the documented order gives the closed forms."""
  x = jnp.array([1.0, 1.0, 0.0])
  logits = jnp.array([2.0, -1.0, 0.5])
  want = np.log([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(1.0)),
                 1 - 1 / (1 + np.exp(-0.5))])
  np.testing.assert_allclose(losses.bernoulli_log_prob(x, logits), want,
                             rtol=1e-6)
  assert not np.allclose(losses.bernoulli_log_prob(logits, x), want)
  classes = jnp.array([2, 0])
  cat_logits = jnp.log(jnp.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]))
  np.testing.assert_allclose(
      losses.categorical_log_prob(classes, cat_logits), np.log([0.7, 0.5]),
      rtol=1e-6)


def test_element_wise_functions_broadcast():
  """One parameter set against a batch (and a batch against a scalar x)
  gives what the explicitly broadcast arrays give."""
  x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (4, 3)),
                  jnp.float32)
  logits = jnp.array([-1.0, 0.3, 2.0])
  np.testing.assert_allclose(
      losses.bernoulli_log_prob(x, logits),
      losses.bernoulli_log_prob(x, jnp.broadcast_to(logits, x.shape)))
  assert losses.bernoulli_log_prob(1.0, logits).shape == (3,)
  cat_logits = jax.random.normal(jax.random.PRNGKey(0), (7,))
  classes = jnp.array([[0, 6], [3, 3]])
  np.testing.assert_allclose(
      losses.categorical_log_prob(classes, cat_logits),
      jax.nn.log_softmax(cat_logits)[classes], rtol=1e-6)
  mean = jnp.array([[0.5], [-1.0]])  # [2, 1] against log_std [3]
  log_std = jnp.array([-0.5, 0.0, 0.7])
  kl = losses.standard_normal_kl(mean, log_std)
  assert kl.shape == (2, 3)
  np.testing.assert_allclose(kl, losses.standard_normal_kl(
      jnp.broadcast_to(mean, (2, 3)), jnp.broadcast_to(log_std, (2, 3))))


def test_per_example_gaussian_kl_matches_monte_carlo():
  """gaussian_kl(q, p) [B] against E_q[log q(z) - log p(z)] from 200,000
  draws per example, with p broadcast over the batch."""
  key_q, key_z = jax.random.split(jax.random.PRNGKey(3))
  mean_q = jax.random.normal(key_q, (3, 4))
  log_std_q = jnp.linspace(-0.6, 0.4, 12).reshape(3, 4)
  mean_p, log_std_p = jnp.array([0.2, -0.1, 0.0, 0.5]), jnp.float32(0.3)
  kl = losses.gaussian_kl(mean_q, log_std_q, mean_p, log_std_p)
  assert kl.shape == (3,)

  @jax.jit
  def monte_carlo():
    z = mean_q + jnp.exp(log_std_q) * jax.random.normal(key_z,
                                                        (200_000, 3, 4))
    log_ratio = (losses.gaussian_log_prob(z, mean_q, log_std_q) -
                 losses.gaussian_log_prob(z, mean_p, log_std_p)).sum(-1)
    return log_ratio.mean(0), log_ratio.std(0) / np.sqrt(200_000)

  mc, std_error = monte_carlo()
  assert np.all(np.abs(mc - kl) < 4 * std_error + 1e-4), (mc, kl)
  # p = N(0, I) by default, and KL(q || q) = 0.
  np.testing.assert_allclose(
      losses.gaussian_kl(mean_q, log_std_q),
      losses.gaussian_kl(mean_q, log_std_q, 0.0, 0.0), rtol=1e-5)
  np.testing.assert_allclose(
      losses.gaussian_kl(mean_q, log_std_q, mean_q, log_std_q), 0.0,
      atol=1e-6)
  with pytest.raises(ValueError, match="both mean_p and log_std_p"):
    losses.gaussian_kl(mean_q, log_std_q, mean_p)


def test_kl_closed_forms_match_monte_carlo():
  key = jax.random.PRNGKey(1)
  mean1, log_var1, mean2, log_var2 = 0.7, -0.5, -0.3, 0.4
  z = mean1 + jnp.exp(0.5 * log_var1) * jax.random.normal(key, (400_000,))
  log_q = losses.gaussian_log_prob(z, mean1, 0.5 * log_var1)
  log_p = losses.gaussian_log_prob(z, mean2, 0.5 * log_var2)
  mc = float(jnp.mean(log_q - log_p))
  exact = float(losses.normal_kl(mean1, log_var1, mean2, log_var2))
  assert abs(mc - exact) < 0.01
  np.testing.assert_allclose(
      losses.standard_normal_kl(jnp.array(mean1), jnp.array(0.5 * log_var1)),
      losses.normal_kl(mean1, log_var1, 0.0, 0.0), rtol=1e-6)


def test_bits_per_dim_and_dequantization():
  np.testing.assert_allclose(losses.bits_per_dim(jnp.array(784 * math.log(2)),
                                                 784), 1.0)
  with pytest.raises(ValueError, match="num_dims"):
    losses.bits_per_dim(jnp.array(1.0), 0)
  x = jnp.array([0, 1, 255], jnp.uint8)
  y = losses.uniform_dequantize(x, jax.random.PRNGKey(0))
  assert np.all((y >= x / 256) & (y < (x.astype(np.float32) + 1) / 256))
