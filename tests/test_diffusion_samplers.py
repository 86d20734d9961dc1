"""Samplers with the exact eps_fn of data whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax.diffusion import samplers
from gm_jax.diffusion import schedules as sched

SCHEDULE = sched.noise_schedule("linear", 1000)


def gaussian_eps_fn(schedule, mu, std):
  """Exact E[eps | x_t] when x_0 ~ N(mu, std^2) per dimension:
  eps = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar std^2 + 1 - abar).
  std = 0 is the point mass at mu."""
  def eps_fn(x_t, t):
    abar = sched.extract(schedule.alphas_cumprod, t, x_t.ndim)
    var = abar * std**2 + 1 - abar
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / var
  return eps_fn


def _sampler(name, **kw):
  if name == "ddpm":
    return lambda fn, key, shape, steps: samplers.ddpm_sample(
        fn, SCHEDULE, key, shape, steps, **kw)
  return lambda fn, key, shape, steps: samplers.ddim_sample(
      fn, SCHEDULE, key, shape, steps, **kw)


@pytest.mark.parametrize("name,kw,steps", [
    ("ddpm", dict(variance="fixed_small"), None),
    ("ddpm", dict(variance="fixed_large", clip_x0=True), 10),
    ("ddim", dict(eta=0.0), 1),
    ("ddim", dict(eta=0.5), 10),
    ("ddim", dict(eta=1.0, clip_x0=True), 50),
])
def test_point_mass_data_is_reproduced_exactly(name, kw, steps):
  mu = jax.random.uniform(jax.random.key(3), (1, 4, 4, 2), minval=-0.9,
                          maxval=0.9)
  fn = jax.jit(_sampler(name, **kw), static_argnums=(0, 2, 3))
  out = fn(gaussian_eps_fn(SCHEDULE, mu, 0.0), jax.random.key(0),
           (6, 4, 4, 2), steps)
  np.testing.assert_allclose(out, jnp.broadcast_to(mu, out.shape), atol=2e-4)


@pytest.mark.parametrize("name,kw,steps", [
    ("ddpm", dict(variance="fixed_small"), None),
    ("ddpm", dict(variance="fixed_large"), None),
    ("ddim", dict(eta=0.0), 200),
    ("ddim", dict(eta=1.0), None),
])
def test_gaussian_data_moments_are_reproduced(name, kw, steps):
  """x_0 ~ N(0.3, 0.5^2): samples have that mean and standard deviation."""
  mu, std = 0.3, 0.5
  fn = jax.jit(_sampler(name, **kw), static_argnums=(0, 2, 3))
  out = fn(gaussian_eps_fn(SCHEDULE, mu, std), jax.random.key(1),
           (64, 8, 8, 1), steps)  # 4096 draws
  assert abs(float(jnp.mean(out)) - mu) < 0.03
  # 4096 draws: sampling error ~0.008 (mean), ~0.006 (std); 20-step
  # samplers miss the std by 0.06 to 0.12, so the check has teeth.
  assert abs(float(jnp.std(out)) - std) < 0.02


def test_ddim_eta_one_is_the_ddpm_chain():
  """eta = 1 DDIM and fixed-small DDPM are the same Markov chain: with the
  same key they give the same samples (here with a nonlinear eps_fn)."""
  eps_fn = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000.0)  # noqa: E731
  key = jax.random.key(5)
  shape = (4, 4, 4, 1)
  ddim = jax.jit(lambda eta: samplers.ddim_sample(eps_fn, SCHEDULE, key,
                                                  shape, 20, eta=eta))
  a = samplers.ddpm_sample(eps_fn, SCHEDULE, key, shape, 20, "fixed_small")
  np.testing.assert_allclose(a, ddim(1.0), rtol=1e-4, atol=1e-4)
  c = ddim(0.0)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-2


def test_ddim_eta_zero_is_deterministic_given_x_T():
  eps_fn = lambda x, t: 0.5 * jnp.sin(x)  # noqa: E731
  x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  run = jax.jit(lambda key, eta: samplers.ddim_sample(
      eps_fn, SCHEDULE, key, x_T.shape, 25, eta, x_T=x_T))
  outs = [run(jax.random.key(k), 0.0) for k in (1, 2)]
  np.testing.assert_array_equal(outs[0], outs[1])
  noisy = run(jax.random.key(2), 1.0)
  assert float(jnp.max(jnp.abs(noisy - outs[0]))) > 1e-2


def test_sampling_timesteps():
  ts = samplers.sampling_timesteps(1000, 50)
  assert ts.shape == (50,) and ts[0] == 0 and ts[-1] == 999
  assert np.all(np.diff(ts) > 0)
  np.testing.assert_array_equal(samplers.sampling_timesteps(10), np.arange(10))
  with pytest.raises(ValueError, match="num_steps=0 must be in 1..1000"):
    samplers.sampling_timesteps(1000, 0)
  with pytest.raises(ValueError, match="Unknown timestep spacing 'uniform'"):
    samplers.sampling_timesteps(1000, 10, "uniform")


@pytest.mark.parametrize("spacing,want", [
    # round(linspace(0, 999, 10)): both ends.
    ("linspace", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
    # k * (1000 // 10) from 0 up (diffusers "leading").
    ("leading", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
    # round(1000 - k * 100) - 1 from 999 down (diffusers "trailing").
    ("trailing", [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
])
def test_timestep_spacings(spacing, want):
  np.testing.assert_array_equal(
      samplers.sampling_timesteps(1000, 10, spacing), want)
  # Any S in 1..T: S distinct increasing steps inside 0..T-1; S = T is all.
  for num_timesteps in (7, 10, 33):
    for num_steps in range(1, num_timesteps + 1):
      steps = samplers.sampling_timesteps(num_timesteps, num_steps, spacing)
      assert steps.shape == (num_steps,) and steps.dtype == np.int32
      assert np.all(np.diff(steps) > 0)
      assert 0 <= steps[0] and steps[-1] <= num_timesteps - 1
    np.testing.assert_array_equal(
        samplers.sampling_timesteps(num_timesteps, None, spacing),
        np.arange(num_timesteps))
  # 3 of 7 steps: the three conventions disagree.
  assert list(samplers.sampling_timesteps(7, 3, spacing)) == {
      "linspace": [0, 3, 6], "leading": [0, 2, 4],
      "trailing": [1, 4, 6]}[spacing]


def test_samplers_visit_the_spaced_timesteps():
  """The sampler calls eps_fn at exactly the grid's steps, last first."""
  seen = []

  def eps_fn(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t, ordered=True)
    return jnp.zeros_like(x)

  for spacing in samplers.TIMESTEP_SPACINGS:
    seen.clear()
    out = samplers.ddim_sample(eps_fn, SCHEDULE, jax.random.key(0),
                               (1, 2, 2, 1), 10, timestep_spacing=spacing)
    jax.block_until_ready(out)
    want = samplers.sampling_timesteps(1000, 10, spacing)[::-1]
    assert seen == list(want), spacing
  with pytest.raises(ValueError, match="Unknown variance 'learned'"):
    samplers.ddpm_sample(lambda x, t: x, SCHEDULE, jax.random.key(0),
                         (1, 2, 2, 1), 5, "learned")
