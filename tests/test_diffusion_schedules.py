"""Closed-form checks of the diffusion schedules and q's marginals/posteriors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax.diffusion import schedules as sched


def test_linear_betas_closed_form():
  betas = sched.linear_betas(1000, 1e-4, 0.02)
  assert betas.shape == (1000,)
  np.testing.assert_allclose(betas[0], 1e-4)
  np.testing.assert_allclose(betas[-1], 0.02)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
  s = sched.noise_schedule("linear", 1000)
  # abar_t = prod (1 - beta_s), checked via the sum of logs.
  want = np.exp(np.cumsum(np.log1p(-betas)))
  np.testing.assert_allclose(s.alphas_cumprod, want, rtol=1e-5)
  # DDPM's schedule leaves abar_T ~ 4e-5 (x_T is almost pure noise).
  assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_cosine_alpha_bar_closed_form():
  t_max = 1000
  s = sched.noise_schedule("cosine", t_max)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  ts = np.arange(t_max)
  want = np.array([f((t + 1) / t_max) / f(0.0) for t in ts])
  betas = np.asarray(s.betas, np.float64)
  unclipped = betas < 0.999 - 1e-6
  # Exact wherever the 0.999 clip is inactive (all but the very end).
  assert unclipped[:-1].all() and not unclipped[-1]
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[:-1], want[:-1],
                             rtol=1e-5, atol=1e-9)
  assert float(s.betas[-1]) == pytest.approx(0.999)


def test_posterior_tables_closed_form():
  s = sched.noise_schedule("linear", 50, 1e-3, 0.2)
  betas = sched.linear_betas(50, 1e-3, 0.2)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  var = betas * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-5)
  assert float(s.posterior_variance[0]) == 0.0
  # The log variance is clipped at t = 0 to beta~_1.
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0],
                             math.log(var[1]), rtol=1e-6)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:],
                             np.log(var[1:]), rtol=1e-5)
  np.testing.assert_allclose(s.fixed_large_log_variance[1:], np.log(betas[1:]),
                             rtol=1e-5)
  # At t = 0 the posterior mean is x_0 itself: c1 = 1, c2 = 0.
  assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0)
  assert float(s.posterior_mean_coef2[0]) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_gaussian_conditioning(name):
  """c1, c2, beta~ equal the conditional of the joint (x_{t-1}, x_t) | x_0."""
  t_max = 100
  s = sched.noise_schedule(name, t_max, 1e-3, 0.05)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  for t in (1, 7, 50, t_max - 1):
    # x_{t-1} = sqrt(abar_{t-1}) x0 + N(0, 1 - abar_{t-1});
    # x_t = sqrt(alpha_t) x_{t-1} + N(0, beta_t).
    var_prev = 1 - abar[t - 1]
    cov = math.sqrt(1 - betas[t]) * var_prev
    var_t = 1 - abar[t]
    gain = cov / var_t  # coefficient of x_t in E[x_{t-1} | x_t, x_0]
    # E = sqrt(abar_{t-1}) x0 + gain (x_t - sqrt(abar_t) x0)
    c1 = math.sqrt(abar[t - 1]) - gain * math.sqrt(abar[t])
    cond_var = var_prev - cov * cov / var_t
    assert float(s.posterior_mean_coef1[t]) == pytest.approx(c1, rel=1e-4)
    assert float(s.posterior_mean_coef2[t]) == pytest.approx(gain, rel=1e-4)
    assert float(s.posterior_variance[t]) == pytest.approx(cond_var, rel=1e-4)


def test_q_marginal_matches_repeated_single_step_noising():
  t_max = 200
  s = sched.noise_schedule("linear", t_max, 1e-3, 0.05)
  betas = np.asarray(s.betas, np.float64)
  x0 = jnp.linspace(-1.0, 1.0, 5).reshape(5, 1)  # 5 data points
  num = 20_000
  x = jnp.broadcast_to(x0, (5, num))

  def step(x, inputs):
    beta, key = inputs
    x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(
        key, x.shape)
    return x, (jnp.mean(x, axis=1), jnp.var(x, axis=1))

  keys = jax.random.split(jax.random.key(0), t_max)
  _, (means, variances) = jax.lax.scan(step, x, (s.betas, keys))  # [T, 5]
  for t in (0, 10, 99, t_max - 1):
    tt = jnp.full((5,), t)
    want_mean, want_var = sched.q_mean_variance(s, x0, tt)
    np.testing.assert_allclose(means[t], want_mean[:, 0], atol=0.025)
    np.testing.assert_allclose(variances[t], want_var[:, 0], rtol=0.04,
                               atol=1e-4)
  # The exact moment recursion (no sampling) reproduces abar to float64.
  m, v = 1.0, 0.0
  for t in range(t_max):
    m, v = math.sqrt(1 - betas[t]) * m, (1 - betas[t]) * v + betas[t]
  assert m == pytest.approx(float(s.sqrt_alphas_cumprod[-1]), rel=1e-5)
  assert v == pytest.approx(1 - float(s.alphas_cumprod[-1]), rel=1e-5)
  # q_sample draws from that marginal.
  tt = jnp.full((5,), 60)
  noise = jax.random.normal(jax.random.key(1), (5, num))
  xt = sched.q_sample(s, x0, tt, noise)
  want_mean, want_var = sched.q_mean_variance(s, x0, tt)
  np.testing.assert_allclose(jnp.mean(xt, 1), want_mean[:, 0], atol=0.025)
  np.testing.assert_allclose(jnp.var(xt, 1), want_var[:, 0], rtol=0.04)


def test_parameterization_round_trips():
  s = sched.noise_schedule("cosine", 100)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (6, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 20, 50, 90, 99])
  xt = sched.q_sample(s, x0, t, eps)
  np.testing.assert_allclose(sched.predict_eps_from_x0(s, xt, t, x0), eps,
                             atol=2e-3)
  np.testing.assert_allclose(sched.predict_x0_from_eps(s, xt[:5], t[:5],
                                                       eps[:5]),
                             x0[:5], atol=2e-3)
  v = sched.v_from_x0_eps(s, x0, t, eps)
  np.testing.assert_allclose(sched.eps_from_v(s, xt, t, v), eps, atol=1e-4)


def test_schedule_errors():
  with pytest.raises(ValueError, match="Unknown schedule 'quadratic'"):
    sched.noise_schedule("quadratic", 10)
  with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
    sched.schedule_from_betas(np.array([0.1, 1.5]))
  with pytest.raises(ValueError, match="Unknown variance 'learned'"):
    sched.model_log_variance(sched.noise_schedule("linear", 10),
                             jnp.zeros((1,), jnp.int32), 4, "learned")
