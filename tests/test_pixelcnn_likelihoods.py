"""The discrete likelihoods the autoregressive family uses sum to one.

Each check enumerates every value of the discrete variable and sums the
probabilities given by the shared ``gm_jax.losses`` functions, for
parameters drawn at random and for edge cases (means far outside [-1, 1],
tiny and huge scales), where a sloppy edge-bin treatment leaks mass.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses

# Jitted once per shape: eager op-by-op dispatch is the slow part on CPU.
mixture_log_prob = jax.jit(losses.discretized_logistic_mixture_log_prob,
                           static_argnums=(2, 3))
logistic_log_prob = jax.jit(losses.discretized_logistic_log_prob,
                            static_argnums=3)


def test_bernoulli_sums_to_one():
  logits = jnp.array([-50.0, -3.0, 0.0, 0.7, 40.0])
  total = (jnp.exp(losses.bernoulli_log_prob(jnp.zeros(5), logits)) +
           jnp.exp(losses.bernoulli_log_prob(jnp.ones(5), logits)))
  np.testing.assert_allclose(total, 1.0, rtol=1e-6)
  # And it is the sigmoid: p(1) = 1 / (1 + e^-l).
  np.testing.assert_allclose(
      jnp.exp(losses.bernoulli_log_prob(jnp.ones(5), logits)),
      1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))), rtol=1e-5)


def test_categorical_sums_to_one_over_256_levels():
  logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 256))
  levels = jnp.broadcast_to(jnp.arange(256), (4, 256))
  log_p = losses.categorical_log_prob(
      levels, jnp.broadcast_to(logits[:, None], (4, 256, 256)))  # [4, 256]
  np.testing.assert_allclose(jnp.exp(log_p).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mean,log_scale", [
    (0.0, -2.0), (0.3, -7.0), (-0.999, -5.0), (1.0, -6.0), (2.5, -1.0),
    (-3.0, 0.5), (0.1, 3.0), (0.5, -12.0)])
def test_discretized_logistic_sums_to_one(mean, log_scale):
  x = losses.scale_to_symmetric(jnp.arange(256), 256)
  log_p = logistic_log_prob(
      x, jnp.float32(mean), jnp.float32(log_scale), 256)
  assert bool(jnp.all(jnp.isfinite(log_p)))
  np.testing.assert_allclose(jnp.exp(log_p).sum(), 1.0, rtol=1e-4)


def test_grey_logistic_mixture_sums_to_one_over_256_levels():
  num_mixtures = 5
  params = 2.0 * jax.random.normal(
      jax.random.PRNGKey(1),
      (3, losses.mixture_num_params(1, num_mixtures)))  # 3 parameter sets.
  x = losses.scale_to_symmetric(jnp.arange(256), 256)[:, None, None]
  log_p = mixture_log_prob(
      jnp.broadcast_to(x, (256, 3, 1)),
      jnp.broadcast_to(params, (256,) + params.shape), num_mixtures)  # [256, 3]
  assert bool(jnp.all(jnp.isfinite(log_p)))
  np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, rtol=1e-4)


@pytest.mark.parametrize("scale_shift", [0.0, -4.0])
def test_rgb_logistic_mixture_sums_to_one_over_all_colours(scale_shift):
  """All 8^3 = 512 colours of an 8-level RGB pixel (coupled means)."""
  num_bins, num_mixtures = 8, 3
  num_params = losses.mixture_num_params(3, num_mixtures)
  params = 1.5 * jax.random.normal(jax.random.PRNGKey(2), (2, num_params))
  # Shift the log-scales (the block after logits and means) to probe
  # near-deterministic components.
  m = num_mixtures
  params = params.at[:, 4 * m:7 * m].add(scale_shift)
  colours = np.array(list(itertools.product(range(num_bins), repeat=3)))
  x = losses.scale_to_symmetric(jnp.asarray(colours), num_bins)  # [512, 3]
  log_p = mixture_log_prob(
      jnp.broadcast_to(x[:, None], (512, 2, 3)),
      jnp.broadcast_to(params, (512, 2, num_params)), num_mixtures,
      num_bins)  # [512, 2]
  np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, rtol=1e-4)


def test_mixture_sampler_matches_the_log_prob():
  """Empirical colour frequencies of the sampler match exp(log_prob)."""
  num_bins, num_mixtures, n = 4, 2, 40_000
  params = jax.random.normal(jax.random.PRNGKey(3),
                             (losses.mixture_num_params(3, num_mixtures),))
  sampler = jax.jit(losses.sample_discretized_logistic_mixture,
                    static_argnums=(2, 3, 4))
  samples = sampler(jnp.broadcast_to(params, (n, params.shape[0])),
                    jax.random.PRNGKey(4), 3,
                    num_mixtures, num_bins)  # [n, 3]
  levels = np.rint((np.asarray(samples) + 1.0) * (num_bins - 1) / 2.0)
  index = (levels @ np.array([num_bins**2, num_bins, 1])).astype(int)
  freq = np.bincount(index, minlength=num_bins**3) / n
  colours = np.array(list(itertools.product(range(num_bins), repeat=3)))
  prob = jnp.exp(mixture_log_prob(
      losses.scale_to_symmetric(jnp.asarray(colours), num_bins),
      jnp.broadcast_to(params, (num_bins**3, params.shape[0])), num_mixtures,
      num_bins))
  # Binomial standard error sqrt(p (1 - p) / n) <= 0.0025; allow 5 of them.
  np.testing.assert_allclose(freq, prob, atol=0.0125)


def test_mixture_gradients_are_finite_at_the_edge_bins():
  """Levels 0 and 255 use the open edge bins; neither they nor the unused
  interior branch may produce NaN gradients, even for extreme parameters."""
  num_mixtures = 2
  params = jnp.array([[0.0, 1.0, -5.0, 5.0, -7.0, 3.0],
                      [2.0, -1.0, 1.0, -1.0, -12.0, -12.0]])  # [2, 3 M]
  x = jnp.array([[-1.0], [1.0]])  # levels 0 and 255

  def total(params):
    return mixture_log_prob(x, params, num_mixtures, 256).sum()

  value, grad = jax.value_and_grad(total)(params)
  assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
