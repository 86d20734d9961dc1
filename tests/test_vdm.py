"""The variational diffusion model: schedules, the three-term bound, the
continuous-time limit, the variance gradient, the sampler and the family."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses, schema
from gm_jax.vdm import (
  VDM,
  ScoreNet,
  VDMConfig,
  bound,
  fourier_features,
  make,
  scanned_params,
  unrolled_params,
)

SHAPE = (8, 8, 1)
D = math.prod(SHAPE)


def tiny_config(**changes):
  values = dict(image_shape=SHAPE, width=8, num_blocks=1, num_groups=4,
                schedule_units=16, sample_steps=4, eval_time_samples=2)
  values.update(changes)
  return VDMConfig(**values)


def images(key, batch=3):
  return {"image": jax.random.randint(key, (batch,) + SHAPE, 0, 256
                                      ).astype(jnp.uint8),
          "label": jnp.zeros((batch,), jnp.int32)}


def family_config(**changes):
  config = schema.default_config(VDMConfig, "vdm")
  for key, value in dataclasses.asdict(tiny_config(**changes)).items():
    config[key] = value
  return config


def random_schedule(key, hidden=16, spread=3.0):
  """Learned-schedule parameters far from their initial values."""
  params = bound.init_schedule(key, "learned", -13.3, 5.0, hidden)
  keys = jax.random.split(jax.random.fold_in(key, 1), 4)
  shape = {name: spread * jax.random.normal(k, value.shape)
           for (name, value), k in zip(sorted(params["shape"].items()), keys,
                                       strict=True)}
  return {**params, "shape": shape}


# ----------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_gamma_is_increasing_and_hits_its_endpoints(seed):
  params = random_schedule(jax.random.key(seed))
  t = jnp.linspace(0.0, 1.0, 2001)
  gamma, rate = bound.gamma_and_rate(
      lambda u: bound.learned_gamma(params, u), t)
  assert np.all(np.diff(np.asarray(gamma)) > 0)
  assert np.all(np.asarray(rate) > 0)
  gamma_0, gamma_1 = bound.endpoints(params)
  np.testing.assert_allclose(gamma[0], gamma_0, atol=1e-5)
  np.testing.assert_allclose(gamma[-1], gamma_1, atol=1e-5)
  # The initial endpoints are the configured ones; the shape is not linear.
  np.testing.assert_allclose(gamma_0, -13.3, atol=1e-5)
  np.testing.assert_allclose(gamma_1, 5.0, atol=1e-4)
  linear = bound.fixed_linear_gamma(t, float(gamma_0), float(gamma_1))
  assert float(jnp.max(jnp.abs(gamma - linear))) > 0.1
  # The rate is the derivative: a finite difference agrees.
  np.testing.assert_allclose(np.diff(np.asarray(gamma)) * 2000,
                             0.5 * (rate[1:] + rate[:-1]), rtol=2e-2)


def test_endpoints_stay_ordered_for_any_parameters():
  params = {"gamma_0": jnp.float32(2.0), "gap": jnp.float32(-8.0)}
  gamma_0, gamma_1 = bound.endpoints(params)
  assert gamma_1 > gamma_0
  # Without a shape the learned schedule is linear between its endpoints.
  t = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(
      bound.learned_gamma(params, t),
      bound.fixed_linear_gamma(t, float(gamma_0), float(gamma_1)), rtol=1e-6)


def test_fixed_linear_gamma_matches_the_paper():
  gamma, rate = bound.gamma_and_rate(bound.fixed_linear_gamma,
                                     jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(gamma, [-13.3, -4.15, 5.0], rtol=1e-6)
  np.testing.assert_allclose(rate, [18.3] * 3, rtol=1e-6)


def test_antithetic_times_cover_the_interval_evenly():
  t = np.sort(np.asarray(bound.diffusion_times(jax.random.key(0), 8)))
  assert np.all((t >= 0) & (t < 1))
  np.testing.assert_allclose(np.diff(t), 1 / 8, atol=1e-6)
  steps = bound.discretize_times(jnp.array([0.0, 0.01, 0.5, 0.99]), 10)
  np.testing.assert_allclose(steps, [0.1, 0.1, 0.5, 1.0], rtol=1e-6)


def test_fourier_features_have_period_two_to_the_minus_n():
  z = jax.random.uniform(jax.random.key(0), (2, 3, 3, 2), minval=-1,
                         maxval=1)
  features = fourier_features(z, (6, 7))
  assert features.shape == (2, 3, 3, 2 * 2 * 2)
  np.testing.assert_allclose(fourier_features(z + 2.0 ** -7, (7,)),
                             fourier_features(z, (7,)), atol=1e-3)
  assert fourier_features(z, ()).shape == (2, 3, 3, 0)


# ----------------------------------------------------------------------------
# The bound's terms.


def test_prior_term_is_the_closed_form_kl():
  x = jax.random.uniform(jax.random.key(0), (2, 3, 3, 1), minval=-1,
                         maxval=1)
  gamma_1 = 1.5  # large enough a KL for a Monte Carlo check
  kl = bound.prior_kl(x, gamma_1)
  alpha_sq = 1 / (1 + math.exp(gamma_1))
  sigma_sq = 1 - alpha_sq
  mean = math.sqrt(alpha_sq) * x
  closed = losses.sum_except_batch(losses.normal_kl(
      mean, math.log(sigma_sq), 0.0, 0.0))
  np.testing.assert_allclose(kl, closed, rtol=1e-5)
  # Monte Carlo: E_q[log q(z_1|x) - log N(z_1; 0, I)].
  eps = jax.random.normal(jax.random.key(1), (20000,) + x.shape)
  z = mean + math.sqrt(sigma_sq) * eps
  log_ratio = (losses.gaussian_log_prob(z, mean, 0.5 * math.log(sigma_sq))
               - losses.gaussian_log_prob(z, 0.0, 0.0))
  mc = jnp.mean(jax.vmap(losses.sum_except_batch)(log_ratio), axis=0)
  np.testing.assert_allclose(mc, kl, atol=0.1)


def test_decoder_is_normalised_and_peaks_at_the_nearest_level():
  z_0 = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1), minval=-1,
                           maxval=1)
  gamma_0 = -8.0
  log_probs = bound.decoder_log_probs(z_0, gamma_0)
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs), -1), 1.0,
                             rtol=1e-5)
  alpha_0 = math.sqrt(1 / (1 + math.exp(gamma_0)))
  nearest = jnp.clip(jnp.round((z_0 / alpha_0 + 1) * 127.5), 0, 255)
  np.testing.assert_array_equal(jnp.argmax(log_probs, -1), nearest)


def test_discrete_loss_tends_to_the_continuous_loss():
  """For a fixed eps_hat (a linear map) the exact T-step sum over all steps
  approaches the continuous-time integral as T grows."""
  x = losses.scale_to_symmetric(jax.random.randint(
      jax.random.key(0), (1, 3, 3, 1), 0, 256))
  eps = jax.random.normal(jax.random.key(1), x.shape)
  schedule = random_schedule(jax.random.key(2), spread=1.0)
  gamma_fn = lambda t: bound.learned_gamma(schedule, t)  # noqa: E731
  eps_fn = lambda z, g: 0.7 * z  # noqa: E731

  def mean_loss(t, num_timesteps):
    batch = t.shape[0]
    tile = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])  # noqa: E731
    return float(jnp.mean(bound.diffusion_loss(
        eps_fn, gamma_fn, tile(x), t, tile(eps), num_timesteps)))

  n = 20000  # midpoint rule for int_0^1 0.5 gamma' ||eps - eps_hat||^2 dt
  continuous = mean_loss((jnp.arange(n) + 0.5) / n, 0)
  errors = []
  for steps in (10, 100, 1000):
    # One t inside each step: the mean over steps times T is the exact sum.
    discrete = mean_loss((jnp.arange(steps) + 0.5) / steps, steps)
    errors.append(abs(discrete - continuous))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.01 * abs(continuous)


def test_reported_estimator_variance_is_unbiased():
  """Over many keys, the mean of the reported variance of the diffusion
  term's estimate matches the estimates' actual variance."""
  x_int = jax.random.randint(jax.random.key(0), (2, 3, 3, 1), 0, 256)
  x = losses.scale_to_symmetric(x_int)
  eps_fn = lambda z, g: 0.7 * z + 0.1 * x  # noqa: E731

  def run(time_samples, seed):
    def one(key):
      terms = bound.variational_bound(eps_fn, bound.fixed_linear_gamma,
                                      x_int, key, time_samples=time_samples)
      return terms["diffusion_nats"], terms.get("diffusion_var_nats")
    keys = jax.random.split(jax.random.key(seed), 4000)
    return jax.jit(jax.vmap(one))(keys)

  estimates, variances = run(4, 1)
  actual = np.var(np.asarray(estimates, np.float64), axis=0)
  np.testing.assert_allclose(np.mean(variances, axis=0), actual, rtol=0.15)
  # Stratification helps: the mean of four independent draws varies more.
  single, _ = run(1, 2)
  assert np.all(actual < np.var(np.asarray(single, np.float64), axis=0) / 4)


def perfect_eps_fn(x):
  """The exact noise for a dataset of one point x."""
  def eps_fn(z, gamma_t):
    alpha, sigma = bound.alpha_sigma(gamma_t.reshape(-1, 1, 1, 1))
    return (z - alpha * x) / sigma
  return eps_fn


@pytest.mark.parametrize("num_timesteps", [0, 10])
def test_bound_of_a_perfect_denoiser_on_one_point(num_timesteps):
  x_int = jax.random.randint(jax.random.key(0), (2,) + SHAPE, 0, 256
                             ).astype(jnp.uint8)
  x_int = x_int.at[1].set(x_int[0])  # one point, twice
  x = losses.scale_to_symmetric(x_int)
  terms = bound.variational_bound(perfect_eps_fn(x), bound.fixed_linear_gamma,
                                  x_int, jax.random.key(1), num_timesteps,
                                  time_samples=4)
  # The reverse steps are the true posteriors: no diffusion loss.
  np.testing.assert_allclose(terms["diffusion_nats"], 0.0, atol=1e-3)
  # By hand: KL of N(alpha_1 x, sigma_1^2) from N(0, 1) per pixel, with
  # sigma_1^2 = sigmoid(5), and a decoder whose std exp(-6.65) is a sixth
  # of the level spacing 2/255, so reconstruction costs little (a pixel
  # whose noise passes half the spacing, 3 std, costs a few nats).
  xs = np.asarray(x[0], np.float64)
  var_1 = 1 / (1 + np.exp(-5.0))
  prior = 0.5 * np.sum((1 - var_1) * xs ** 2 + var_1 - np.log(var_1) - 1)
  np.testing.assert_allclose(terms["prior_nats"], [prior, prior], rtol=1e-4)
  assert np.all(np.asarray(terms["recon_nats"]) < 0.1 * D)
  np.testing.assert_allclose(
      terms["nll_nats"],
      terms["prior_nats"] + terms["recon_nats"] + terms["diffusion_nats"],
      rtol=1e-6)
  # The bound is positive: a probability of a discrete point is <= 1.
  assert np.all(np.asarray(terms["nll_nats"]) > 0)


def test_a_perfect_denoiser_samples_its_point():
  x_int = jax.random.randint(jax.random.key(0), (1,) + SHAPE, 0, 256)
  x = losses.scale_to_symmetric(x_int)
  # gamma(0) = -20: the decoder's std, e^-10, is far below the spacing.
  levels = bound.ancestral_sample(
      perfect_eps_fn(x), lambda t: bound.fixed_linear_gamma(t, -20.0, 5.0),
      jax.random.key(1), (3,) + SHAPE, 50)
  np.testing.assert_array_equal(levels, jnp.broadcast_to(x_int, levels.shape))


def test_ancestral_step_is_the_forward_posterior():
  """With eps_hat the true noise, the step's mean and variance are those of
  q(z_s | z_t, x), computed from its Gaussian form."""
  x = jnp.array([0.3, -0.8])
  eps = jnp.array([0.5, 1.2])
  gamma_t, gamma_s = 1.0, -2.0
  a_t, s_t = (float(v) for v in bound.alpha_sigma(jnp.float32(gamma_t)))
  a_s, s_s = (float(v) for v in bound.alpha_sigma(jnp.float32(gamma_s)))
  z_t = a_t * x + s_t * eps
  alpha_ts = a_t / a_s
  var_ts = s_t ** 2 - alpha_ts ** 2 * s_s ** 2
  mean = (alpha_ts * s_s ** 2 * z_t + a_s * var_ts * x) / s_t ** 2
  var = var_ts * s_s ** 2 / s_t ** 2
  zero = bound.ancestral_step(z_t, eps, gamma_t, gamma_s, jnp.zeros(2))
  one = bound.ancestral_step(z_t, eps, gamma_t, gamma_s, jnp.ones(2))
  np.testing.assert_allclose(zero, mean, rtol=1e-5)
  np.testing.assert_allclose((one - zero) ** 2, var, rtol=1e-4)


# ----------------------------------------------------------------------------
# The variance gradient.


def assert_close(actual, desired):
  """Equal up to float32 rounding, relative to the array's largest entry."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=1e-4,
                             atol=1e-5 * float(np.max(np.abs(desired))))


def test_variance_gradient_on_a_hand_example():
  def loss_fn(w, s, aux):
    return w * s ** 2 + aux  # L_i

  w, s, aux = jnp.float32(1.5), jnp.array([0.5, -2.0]), jnp.array([1.0, 3.0])
  value = bound.variance_gradient(loss_fn, w, s, aux)
  np.testing.assert_allclose(value, loss_fn(w, s, aux))
  cot = jnp.array([0.25, 0.75])  # the batch's weights
  grad_w, grad_s = jax.grad(
      lambda w, s: jnp.sum(cot * bound.variance_gradient(loss_fn, w, s, aux)),
      argnums=(0, 1))(w, s)
  value = loss_fn(w, s, aux)
  np.testing.assert_allclose(grad_w, jnp.sum(cot * s ** 2), rtol=1e-6)
  np.testing.assert_allclose(grad_s, cot * 2 * value * 2 * w * s, rtol=1e-6)


@pytest.mark.parametrize("train_timesteps", [0, 5])
def test_schedule_shape_follows_the_variance_and_the_rest_the_bound(
    train_timesteps):
  """Network and endpoints: the gradient of the mean loss; the schedule's
  shape: the gradient of the mean squared per-example loss."""
  variance = VDM(tiny_config(train_timesteps=train_timesteps,
                             num_blocks=0))
  plain = VDM(tiny_config(train_timesteps=train_timesteps, num_blocks=0,
                          schedule_gradient="bound"))
  batch = images(jax.random.key(0))
  params = variance.init(jax.random.key(1), batch)
  params["schedule"] = random_schedule(jax.random.key(2))
  # Train the network a little away from its zero output layer.
  params["net"] = jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
      params["net"])
  x = losses.scale_to_symmetric(batch["image"])
  t = bound.diffusion_times(jax.random.key(4), 3)
  eps = jax.random.normal(jax.random.key(5), x.shape)
  drop = jax.random.key(6)

  def per_example(model):
    return lambda p: model.diffusion_bpd(p, x, t, eps, drop)

  @jax.jit
  def gradients(params):
    value_v, grad_v = jax.value_and_grad(
        lambda p: jnp.mean(per_example(variance)(p)))(params)
    value_p, vjp = jax.vjp(per_example(plain), params)
    # Of mean(L) and of mean(L^2) = (1/B) sum L_i^2, from one backward.
    grad_p, = vjp(jnp.full_like(value_p, 1 / 3))
    grad_sq, = vjp(2 * value_p / 3)
    return value_v, grad_v, jnp.mean(value_p), grad_p, grad_sq

  value_v, grad_v, value_p, grad_p, grad_sq = gradients(params)
  np.testing.assert_allclose(value_v, value_p, rtol=1e-6)
  close = lambda a, b: jax.tree.map(assert_close, a, b)  # noqa: E731
  close(grad_v["net"], grad_p["net"])
  for name in ("gamma_0", "gap"):
    close(grad_v["schedule"][name], grad_p["schedule"][name])
  close(grad_v["schedule"]["shape"], grad_sq["schedule"]["shape"])
  # The two differ: the test would notice a plain gradient.
  assert not np.allclose(grad_v["schedule"]["shape"]["weight"],
                         grad_p["schedule"]["shape"]["weight"], rtol=1e-2)


def test_family_loss_carries_the_variance_gradient():
  """With one example the squared loss's gradient is 2 L times the
  loss's; the prior and reconstruction do not depend on the shape."""
  variance = make(family_config(num_blocks=0))
  plain = make(family_config(num_blocks=0, schedule_gradient="bound"))
  batch = images(jax.random.key(0), batch=1)
  params = variance.init(jax.random.key(1), batch)
  params["schedule"] = random_schedule(jax.random.key(2))
  key, step = jax.random.key(3), jnp.int32(0)
  grad = jax.jit(jax.grad(lambda fam_loss, p: fam_loss(p, batch, key, step),
                          argnums=1, has_aux=True), static_argnums=0)
  grad_v, _ = grad(variance.loss, params)
  grad_p, metrics = grad(plain.loss, params)
  scale = 2 * float(metrics["diffusion_bpd"])
  jax.tree.map(lambda u, v: assert_close(u, scale * v),
               grad_v["schedule"]["shape"], grad_p["schedule"]["shape"])
  np.testing.assert_allclose(grad_v["schedule"]["gap"],
                             grad_p["schedule"]["gap"], rtol=1e-4)


# ----------------------------------------------------------------------------
# The family.


@pytest.mark.parametrize("changes", [
    {}, {"schedule": "fixed_linear", "eval_timesteps": 8, "num_blocks": 0,
         "train_timesteps": 8, "sample_decode": "sample"}])
def test_family_loss_evaluate_and_sample(changes):
  family = make(family_config(**changes))
  batch = images(jax.random.key(0))

  @jax.jit
  def run(batch):
    params = family.init(jax.random.key(1), batch)
    loss, metrics = family.loss(params, batch, jax.random.key(2),
                                jnp.int32(0))
    results = family.evaluate(params, batch, jax.random.key(3))
    samples = family.sample(params, jax.random.key(4), 2)
    return loss, metrics, results, samples

  loss, metrics, results, samples = run(batch)
  assert np.isfinite(float(loss)) and loss > 0
  np.testing.assert_allclose(
      metrics["bpd"], metrics["prior_bpd"] + metrics["recon_bpd"]
      + metrics["diffusion_bpd"], rtol=1e-5)
  assert set(metrics) <= set(results)
  for value in results.values():
    assert value.shape == (3,) and np.all(np.isfinite(value))
  np.testing.assert_allclose(results["bpd"],
                             results["nll_nats"] / (D * math.log(2)),
                             rtol=1e-5)
  np.testing.assert_allclose(
      results["bpd"], results["prior_bpd"] + results["recon_bpd"]
      + results["diffusion_bpd"], rtol=1e-5)
  assert np.all(results["bpd_estimator_var"] >= 0)
  assert samples.shape == (2,) + SHAPE and samples.dtype == jnp.float32
  assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0
  np.testing.assert_allclose(samples * 255, np.round(samples * 255),
                             atol=1e-4)


def test_config_is_validated_by_key():
  with pytest.raises(ValueError, match="config.model.gamma_max=-20"):
    VDMConfig(gamma_max=-20.0)
  with pytest.raises(ValueError, match="config.model.schedule='cosine'"):
    VDMConfig(schedule="cosine")
  with pytest.raises(ValueError, match="config.model.eval_time_samples=3"):
    VDMConfig(eval_time_samples=3)


# Scanned blocks (scan_layers).


def _net_inputs_and_moved_params(net):
  """(z, gamma, params) for ``net``: two images and times, and parameters
  moved off their initial values (the zero-initialised second convolutions
  would make every block the identity)."""
  z = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
  gamma = jnp.array([-5.0, 2.0])
  params = net.init(jax.random.key(1), z, gamma)["params"]
  keys = iter(jax.random.split(jax.random.key(2),
                               len(jax.tree.leaves(params))))
  params = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)
  return z, gamma, params


def test_scanned_score_net_is_the_unrolled_function():
  """``ScoreNet(scan_blocks=True)`` with the parameters of the unrolled
  network moved by ``scanned_params``: the same outputs and gradients (to
  float32 rounding: the blocks compute in float32); swapping two blocks
  is seen, at a thousand times the tolerance."""
  common = dict(width=8, num_blocks=3, num_groups=4, dropout=0.0)
  unrolled, scanned = ScoreNet(**common), ScoreNet(**common, scan_blocks=True)
  z, gamma, params = _net_inputs_and_moved_params(unrolled)
  mapped = scanned_params(params, 3)
  reference = jax.eval_shape(scanned.init, jax.random.key(1), z,
                             gamma)["params"]
  assert jax.tree.structure(mapped) == jax.tree.structure(reference)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape,
                                   mapped, reference))
  back = unrolled_params(mapped, 3)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   back, params))
  weights = jax.random.normal(jax.random.key(3), z.shape)

  def grad(net, p):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(
        weights * net.apply({"params": p}, z, gamma))))(p)

  value_u, grad_u = grad(unrolled, params)
  value_s, grad_s = grad(scanned, mapped)
  np.testing.assert_allclose(value_s, value_u, rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grad_u))
  for a, b in zip(jax.tree.leaves(unrolled_params(grad_s, 3)),
                  jax.tree.leaves(grad_u), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  out_u = unrolled.apply({"params": params}, z, gamma)
  np.testing.assert_allclose(scanned.apply({"params": mapped}, z, gamma),
                             out_u, atol=1e-5)
  swapped = dict(params, down_block0=params["down_block1"],
                 down_block1=params["down_block0"])
  out_w = scanned.apply({"params": scanned_params(swapped, 3)}, z, gamma)
  assert float(jnp.max(jnp.abs(out_u - out_w))) > 1e-2


def test_family_with_scan_layers_trains_with_the_same_parameter_count():
  plain = make(family_config(num_blocks=2))
  scanned = make(family_config(num_blocks=2, scan_layers=True))
  batch = images(jax.random.key(0))
  shapes = [jax.eval_shape(f.init, jax.random.key(1), batch)
            for f in (plain, scanned)]
  assert (sum(a.size for a in jax.tree.leaves(shapes[0])) ==
          sum(a.size for a in jax.tree.leaves(shapes[1])))
  params = jax.jit(scanned.init)(jax.random.key(1), batch)
  assert params["net"]["down_blocks"]["block"]["conv1"]["kernel"].shape[0] \
      == 2
  loss, metrics = jax.jit(scanned.loss)(params, batch, jax.random.key(2),
                                        jnp.int32(0))
  assert np.isfinite(float(loss))
  # The same function: the unrolled family scores the mapped parameters
  # alike (dropout differs between the layouts' random streams, so the
  # evaluation, which has none, is compared).
  unrolled = dict(params, net=unrolled_params(params["net"], 2))
  ev_s = jax.jit(scanned.evaluate)(params, batch, jax.random.key(3))
  ev_u = jax.jit(plain.evaluate)(unrolled, batch, jax.random.key(3))
  np.testing.assert_allclose(ev_s["bpd"], ev_u["bpd"], rtol=1e-5)
  with pytest.raises(ValueError, match="scan_layers"):
    VDMConfig(scan_layers=True, num_blocks=0)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_bfloat16_score_net_keeps_float32_params_and_the_function(
    scan_blocks):
  """``dtype=bfloat16``: the same parameters (float32, same tree), every
  convolution and product of the blocks in bfloat16, a float32 output that
  matches the float32 network's to bfloat16 rounding (and not exactly: the
  option is not a no-op); gradients reach the parameters in float32."""
  common = dict(width=8, num_blocks=2, num_groups=4, dropout=0.0,
                scan_blocks=scan_blocks)
  f32 = ScoreNet(**common)
  bf16 = ScoreNet(**common, dtype=jnp.bfloat16)
  z, gamma, params = _net_inputs_and_moved_params(f32)
  shapes = jax.eval_shape(bf16.init, jax.random.key(1), z, gamma)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply({"params": p}, z, gamma))(
      params))
  assert "conv_general_dilated" in jaxpr
  for line in jaxpr.splitlines():
    if "conv_general_dilated[" in line:
      assert "bf16[" in line.split("=")[0], line  # bfloat16 outputs
  out32 = f32.apply({"params": params}, z, gamma)
  out16 = bf16.apply({"params": params}, z, gamma)
  assert out16.dtype == jnp.float32
  error = float(jnp.max(jnp.abs(out16 - out32)))
  scale = float(jnp.max(jnp.abs(out32 - z)))
  assert 0 < error < 0.05 * scale, (error, scale)
  grads = jax.grad(lambda p: jnp.sum(bf16.apply({"params": p}, z, gamma)))(
      params)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
             for g in jax.tree.leaves(grads))
