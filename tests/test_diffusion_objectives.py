"""The simple losses and the variational bound against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses
from gm_jax.diffusion import objectives as obj
from gm_jax.diffusion import schedules as sched


def point_eps_fn(schedule, point):
  """The exact eps_fn when all data sits at ``point``:
  eps = (x_t - sqrt(abar_t) point) / sqrt(1 - abar_t)."""
  return lambda x_t, t: sched.predict_eps_from_x0(
      schedule, x_t, t, jnp.broadcast_to(point, x_t.shape))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_perfect_predictor_gives_zero_simple_loss(prediction):
  s = sched.noise_schedule("linear", 1000)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  point = jax.random.uniform(k1, (1, 4, 4, 2), minval=-1, maxval=1)
  x0 = jnp.broadcast_to(point, (8, 4, 4, 2))
  noise = jax.random.normal(k2, x0.shape)
  t = jax.random.randint(k3, (8,), 0, 1000).at[0].set(0).at[1].set(999)
  exact_eps = point_eps_fn(s, point)
  model = {
      "eps": exact_eps,
      "x0": lambda x_t, t: jnp.broadcast_to(point, x_t.shape),
      "v": lambda x_t, t: sched.v_from_x0_eps(
          s, jnp.broadcast_to(point, x_t.shape), t, exact_eps(x_t, t)),
  }[prediction]
  loss = obj.simple_loss(model, s, x0, t, noise, prediction)
  assert loss.shape == (8,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-7)
  # Any parameterisation converts to the exact eps.
  eps_fn = obj.eps_fn_from_model(model, s, prediction)
  xt = sched.q_sample(s, x0, t, noise)
  np.testing.assert_allclose(eps_fn(xt[2:], t[2:]), noise[2:], atol=1e-3)
  # A wrong predictor (zero) costs exactly the target's mean square.
  zero = lambda x_t, t: jnp.zeros_like(x_t)  # noqa: E731
  target = {"eps": noise, "x0": x0,
            "v": sched.v_from_x0_eps(s, x0, t, noise)}[prediction]
  np.testing.assert_allclose(
      obj.simple_loss(zero, s, x0, t, noise, prediction),
      jnp.mean(jnp.square(target), axis=(1, 2, 3)), rtol=1e-6)


def _disc_gauss_nll(k, mean, std, num_bins=256):
  """-log P(level k) of a discretized N(mean, std^2), by hand with erf."""
  x = 2 * k / (num_bins - 1) - 1
  h = 1 / (num_bins - 1)
  cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
  upper = 1.0 if k == num_bins - 1 else cdf((x + h - mean) / std)
  lower = 0.0 if k == 0 else cdf((x - h - mean) / std)
  return -math.log(upper - lower)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vlb_of_known_model_matches_hand_computation(variance):
  """The exact eps_fn of the point a, evaluated on data b != a.

  Its x0 prediction is a for every x_t, so every term is deterministic:
  L_t = sum_d KL(N(c1 b + c2 x, v_q) || N(c1 a + c2 x, v_p)) =
  sum_d 0.5 (log v_p / v_q - 1 + v_q / v_p + c1^2 (a - b)^2 / v_p),
  L_0 = -sum_d log DiscN(b | a, beta~_1), L_T = KL(q(x_T | b) || N(0, 1)).
  """
  t_max = 10
  betas = np.linspace(0.01, 0.3, t_max)
  s = sched.schedule_from_betas(betas)
  levels = np.array([0, 37, 128, 200, 255])
  b = 2 * levels / 255 - 1
  a = b + np.array([0.05, -0.03, 0.02, 0.1, -0.04])
  x0 = jnp.asarray(b, jnp.float32).reshape(1, 5, 1, 1)
  x0 = jnp.broadcast_to(x0, (3, 5, 1, 1))
  eps_fn = point_eps_fn(s, jnp.asarray(a, jnp.float32).reshape(1, 5, 1, 1))
  got = obj.variational_bound(eps_fn, s, x0, jax.random.key(0), 0, variance)

  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  c1 = betas * np.sqrt(abar_prev) / (1 - abar)
  diffusion = 0.0
  for t in range(1, t_max):
    v_q = post_var[t]
    v_p = post_var[t] if variance == "fixed_small" else betas[t]
    diffusion += np.sum(0.5 * (math.log(v_p / v_q) - 1 + v_q / v_p +
                               c1[t] ** 2 * (a - b) ** 2 / v_p))
  std0 = math.sqrt(post_var[1])  # both variance choices use beta~_1 at t = 0
  decoder = sum(_disc_gauss_nll(k, ai, std0) for k, ai in zip(levels, a, strict=True))
  m, v = math.sqrt(abar[-1]) * b, 1 - abar[-1]
  prior = np.sum(0.5 * (-math.log(v) - 1 + v + m**2))

  for name, want in (("prior_nats", prior), ("diffusion_nats", diffusion),
                     ("decoder_nats", decoder),
                     ("nll_nats", prior + diffusion + decoder)):
    np.testing.assert_allclose(got[name], np.full(3, want), rtol=2e-4,
                               err_msg=name)


def test_vlb_of_true_point_model_is_prior_plus_decoder():
  """Data equal to the model's point: every KL vanishes, leaving L_T + L_0."""
  s = sched.noise_schedule("linear", 1000)
  levels = jnp.array([3, 100, 250, 128], jnp.int32).reshape(1, 2, 2, 1)
  x0 = losses.scale_to_symmetric(jnp.broadcast_to(levels, (2, 2, 2, 1)))
  got = obj.variational_bound(point_eps_fn(s, x0[:1]), s, x0,
                              jax.random.key(1), num_eval_timesteps=0)
  np.testing.assert_allclose(got["diffusion_nats"], 0.0, atol=1e-3)
  std0 = math.sqrt(float(s.posterior_variance[1]))
  want = sum(_disc_gauss_nll(int(k), 2 * int(k) / 255 - 1, std0)
             for k in levels.ravel())
  np.testing.assert_allclose(got["decoder_nats"], want, rtol=1e-4)


@pytest.mark.parametrize("exact", [0, 1, 15, 40])
def test_strata_tile_the_kl_timesteps(exact):
  for t_max, n in ((1000, 0), (1000, 50), (1000, 25), (1000, 7), (10, 3),
                   (10, 100)):
    starts, sizes = obj.timestep_strata(t_max, n, exact)
    covered = np.concatenate([np.arange(a, a + z) for a, z in
                              zip(starts, sizes, strict=True)])
    np.testing.assert_array_equal(covered, np.arange(1, t_max))
    assert len(starts) == (t_max - 1 if n <= 0 else min(n, t_max - 1))
    if 0 < n < t_max - 1:
      # The first min(exact, n - 2) timesteps alone, then >= 2 wider strata.
      used = min(exact, n - 2)
      np.testing.assert_array_equal(starts[:used], np.arange(1, used + 1))
      assert np.all(sizes[:used] == 1) and np.all(sizes[used:] > 1)
      assert len(sizes) - used >= 2


@pytest.mark.parametrize("num_random,num_exact", [(2, 0), (5, 3), (8, 1)])
def test_stratified_variance_is_unbiased_for_alike_strata(num_random,
                                                          num_exact):
  """Strata whose draws share one distribution (here N(mu_j = 3, 2^2)):
  the collapsed-strata estimate's mean is the sum of their variances;
  single-timestep strata add nothing."""
  sizes = np.array([1] * num_exact + [4] * num_random)
  key = jax.random.key(3)
  values = 3.0 + 2.0 * jax.random.normal(key, (len(sizes), 20_000))
  values = values.at[:num_exact].set(7.0 * values[:num_exact])
  estimate = obj.stratified_variance(values, sizes)
  assert estimate.shape == (20_000,)
  want = num_random * 4.0
  sem = float(jnp.std(estimate)) / math.sqrt(estimate.size)
  assert abs(float(jnp.mean(estimate)) - want) < 4 * sem
  # All strata of one timestep: an exact sum, no variance.
  np.testing.assert_array_equal(
      obj.stratified_variance(values, np.ones(len(sizes), int)), 0.0)


def test_tight_bound_is_unbiased_and_10x_less_variable():
  """T = 1000, the DDPM linear schedule and a model whose every L_t is
  deterministic (the exact eps_fn of another point), so the estimate's only
  noise is the timestep draws. Its L_t fall like 1/t^2, the shape of a
  trained model's early terms: L_1..L_40 hold 99.5% of the sum.

  25 calls with timesteps 1..15 exact and 10 strata: unbiased against the
  full 999-term sum, and its variance at least 10x below 25 equal strata
  (the analytic ratio here is over 1,000); the collapsed-strata variance
  estimate is conservative."""
  s = sched.noise_schedule("linear", 1000)
  b = jnp.full((1, 2, 1, 1), -0.2)
  eps_fn = point_eps_fn(s, jnp.full((1, 2, 1, 1), 0.3))
  bound = jax.jit(lambda b, key, n, k: obj.variational_bound(
      eps_fn, s, b, key, n, num_exact_timesteps=k), static_argnums=(2, 3))
  full = float(bound(b, jax.random.key(0), 0, 0)["diffusion_nats"][0])
  draws = jnp.broadcast_to(b, (4096, 2, 1, 1))
  tight = bound(draws, jax.random.key(1), 25, 15)
  equal = bound(draws, jax.random.key(2), 25, 0)
  estimates = tight["diffusion_nats"]
  sem = float(jnp.std(estimates)) / math.sqrt(estimates.size)
  assert abs(float(jnp.mean(estimates)) - full) < 4 * sem
  assert abs(float(jnp.mean(equal["diffusion_nats"])) - full) < 4 * float(
      jnp.std(equal["diffusion_nats"])) / math.sqrt(estimates.size)
  var_tight = float(jnp.var(estimates))
  assert 0 < 10 * var_tight < float(jnp.var(equal["diffusion_nats"]))
  assert float(jnp.mean(tight["timestep_var_nats"])) >= 0.9 * var_tight
  # The full sum has no timestep noise.
  np.testing.assert_array_equal(
      bound(b, jax.random.key(0), 0, 0)["timestep_var_nats"], 0.0)


def test_stratified_vlb_is_unbiased():
  """The mean of the n-stratum estimate over draws equals the exact sum."""
  t_max = 40
  s = sched.schedule_from_betas(np.linspace(0.005, 0.2, t_max))
  b = jnp.full((256, 2, 1, 1), -0.2)
  eps_fn = point_eps_fn(s, jnp.full((1, 2, 1, 1), 0.3))
  bound = jax.jit(lambda b, key, n: obj.variational_bound(eps_fn, s, b, key, n),
                  static_argnums=2)
  exact = bound(b, jax.random.key(0), 0)
  estimate = lambda key: bound(b, key, 4)["diffusion_nats"]  # noqa: E731
  estimates = [estimate(jax.random.key(i)) for i in range(4)]
  estimates = jnp.concatenate(estimates)
  # The per-t terms vary a lot, so single estimates do differ from the sum.
  assert float(jnp.std(estimates)) > 0.05 * float(exact["diffusion_nats"][0])
  mean = float(jnp.mean(estimates))
  sem = float(jnp.std(estimates)) / math.sqrt(estimates.size)
  assert abs(mean - float(exact["diffusion_nats"][0])) < 4 * sem
  # With one stratum per timestep the estimate is the exact sum.
  full = bound(b[:2], jax.random.key(9), t_max - 1)
  np.testing.assert_allclose(full["diffusion_nats"],
                             exact["diffusion_nats"][:2], rtol=1e-6)


def test_simple_loss_checks_inputs():
  s = sched.noise_schedule("linear", 10, 0.01, 0.2)
  x0 = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match="Unknown prediction 'score'"):
    obj.simple_loss(lambda x, t: x, s, x0, jnp.zeros(2, jnp.int32), x0,
                    "score")
  with pytest.raises(ValueError, match="need x0, noise"):
    obj.simple_loss(lambda x, t: x, s, x0, jnp.zeros(3, jnp.int32), x0)
