"""The probability-flow ODE likelihood against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses
from gm_jax.diffusion import ode
from gm_jax.diffusion import schedules as sched

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) in every dimension


def gaussian_model(schedule, prediction="eps"):
  """The exact network for Gaussian data: x_tau ~ N(a MU, a^2 S^2 +
  sigma^2), eps = sigma (x - a MU) / (a^2 S^2 + sigma^2), converted to the
  ``prediction`` parameterisation."""
  def model(x, tau):
    shape = (-1,) + (1,) * (x.ndim - 1)
    log_abar = ode.continuous_log_alpha_bar(schedule, tau).reshape(shape)
    a, var = jnp.exp(0.5 * log_abar), -jnp.expm1(log_abar)
    sigma = jnp.sqrt(var)
    eps = sigma * (x - a * MU) / (a**2 * S**2 + var)
    if prediction == "eps":
      return eps
    x0 = (x - sigma * eps) / a
    return x0 if prediction == "x0" else a * eps - sigma * x0
  return model


def analytic_log_prob(schedule, x, index=0):
  """log p_tau(x): the data marginal at an integer index tau."""
  log_abar = float(jnp.log(schedule.alphas_cumprod[index]))
  a2, var = math.exp(log_abar), -math.expm1(log_abar)
  return losses.sum_except_batch(losses.gaussian_log_prob(
      x, math.sqrt(a2) * MU, 0.5 * math.log(a2 * S**2 + var)))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_exact_divergence_gives_the_analytic_density(prediction):
  schedule = sched.noise_schedule("linear", 1000)
  x = MU + S * jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2, 1))
  run = jax.jit(lambda x: ode.ode_log_likelihood(
      gaussian_model(schedule, prediction), schedule, x,
      jax.random.PRNGKey(1), prediction, divergence="exact"))
  out = run(x)
  # With the true marginal at tau = T - 1 in place of N(0, I), the only
  # approximation is the solver's (float32 over some hundred steps: about
  # 1e-3 nats; a wrong drift or divergence is off by nats).
  transported = (out["log_prob"] - out["prior_log_prob"] +
                 analytic_log_prob(schedule, out["latent"], 999))
  np.testing.assert_allclose(transported, analytic_log_prob(schedule, x),
                             atol=3e-3)
  # N(0, I) itself is off by little (abar = 4e-5 at T - 1).
  np.testing.assert_allclose(out["log_prob"], analytic_log_prob(schedule, x),
                             atol=2e-2)
  assert 10 < float(out["num_steps"][0]) < 4096


def correlated_model(schedule, cov):
  """The exact eps of data ~ N(MU, cov) in [B, D]: sigma (a^2 cov +
  sigma^2 I)^-1 (x - a MU). Its Jacobian has off-diagonal entries, so
  Rademacher probes are not exact (for a diagonal one they would be)."""
  def model(x, tau):
    log_abar = ode.continuous_log_alpha_bar(schedule, tau)[:, None, None]
    a2, var = jnp.exp(log_abar), -jnp.expm1(log_abar)
    marginal = a2 * cov + var * jnp.eye(cov.shape[0])  # [B, D, D]
    centred = x - jnp.sqrt(a2[:, :, 0]) * MU
    return jnp.sqrt(var[:, :, 0]) * jnp.linalg.solve(
        marginal, centred[..., None])[..., 0]
  return model


def test_hutchinson_agrees_with_exact_within_its_standard_error():
  schedule = sched.noise_schedule("linear", 1000)
  factor = jnp.array([[0.6, 0.0, 0.0], [0.4, 0.5, 0.0], [-0.3, 0.2, 0.3]])
  cov = factor @ factor.T
  x = MU + jax.random.normal(jax.random.PRNGKey(2), (1, 3)) @ factor.T
  model = correlated_model(schedule, cov)
  exact = ode.ode_log_likelihood(model, schedule, x, jax.random.PRNGKey(0),
                                 divergence="exact")["log_prob"]
  for probe in ("hutchinson_rademacher", "hutchinson_gaussian"):
    draws = jax.jit(jax.vmap(lambda key, probe=probe: ode.ode_log_likelihood(
        model, schedule, x, key, divergence=probe)["log_prob"][0]))(
            jax.random.split(jax.random.PRNGKey(3), 64))
    se = float(jnp.std(draws)) / math.sqrt(draws.size)
    assert float(jnp.std(draws)) > 1e-3  # the probes do vary
    assert abs(float(jnp.mean(draws)) - float(exact[0])) < 4 * se, probe


def test_dequantized_bits_are_a_bound_with_the_bin_volume():
  """-log p(x + u) - D log h: for a density that is flat across a bin the
  bound equals -log(density * h^D); checked against the Gaussian's exact
  bin probabilities on a coarse grid."""
  schedule = sched.noise_schedule("linear", 1000)
  levels = jnp.array([3, 5, 4, 6]).reshape(1, 2, 2, 1)
  x0 = 2.0 * levels / 8 - 1.0  # a 9-level grid, bins of width 0.25
  x0 = jnp.broadcast_to(x0, (256, 2, 2, 1))
  out = jax.jit(lambda x, key: ode.dequantized_nll(
      gaussian_model(schedule), schedule, x, key, num_bins=9,
      divergence="exact"))(x0, jax.random.PRNGKey(4))
  log_abar = float(jnp.log(schedule.alphas_cumprod[0]))
  mean = math.exp(0.5 * log_abar) * MU
  std = math.sqrt(math.exp(log_abar) * S**2 - math.expm1(log_abar))
  cdf = lambda z: 0.5 * (1 + math.erf((z - mean) / (std * math.sqrt(2))))  # noqa: E731
  exact_nll = -sum(math.log(cdf(v + 0.125) - cdf(v - 0.125))
                   for v in np.asarray(x0[0]).ravel())
  bound = float(jnp.mean(out["nll_nats"]))
  se = float(jnp.std(out["nll_nats"])) / math.sqrt(256)
  assert bound >= exact_nll - 4 * se  # a bound (Jensen)...
  assert bound - exact_nll < 0.05  # ...and a tight one for a smooth density


def test_bad_divergence_is_named():
  schedule = sched.noise_schedule("linear", 10, 0.01, 0.2)
  with pytest.raises(ValueError, match="Unknown divergence 'trace'"):
    ode.ode_log_likelihood(lambda x, t: x, schedule, jnp.zeros((1, 2)),
                           jax.random.PRNGKey(0), divergence="trace")
