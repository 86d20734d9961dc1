"""Improved DDPM: learned-range variances, L_hybrid / L_vlb, their sampler.

Tiny shapes; the network is replaced by fixed arrays or closed-form
functions wherever the property does not need one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import config_lib, losses, schema
from gm_jax.diffusion import family as diffusion_family
from gm_jax.diffusion import objectives, samplers, schedules
from tests.test_diffusion import _tiny_model_config, perturbed

T = 50
SHAPE = (3, 4, 4, 2)  # [B, H, W, C]


def _schedule(name="cosine"):
  return schedules.noise_schedule(name, T)


def _x0(key):
  """Data on the 8-bit grid in [-1, 1]."""
  pixels = jax.random.randint(key, SHAPE, 0, 256)
  return losses.scale_to_symmetric(pixels.astype(jnp.uint8))


def _eps_fn(x, t):
  """A smooth stand-in for a network, depending on x and t."""
  return 0.3 * jnp.tanh(x) + 0.01 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def _with_v(value):
  return lambda x, t: (_eps_fn(x, t), jnp.full(x.shape, value, jnp.float32))


def test_learned_range_interpolates_log_beta_and_log_beta_tilde():
  schedule = _schedule()
  t = jnp.arange(T, dtype=jnp.int32)
  ones = jnp.ones((T, 2, 2, 1))
  low = schedules.model_log_variance(schedule, t, 4, "learned_range", -ones)
  high = schedules.model_log_variance(schedule, t, 4, "learned_range", ones)
  mid = schedules.model_log_variance(schedule, t, 4, "learned_range",
                                     0 * ones)
  small = schedules.model_log_variance(schedule, t, 4, "fixed_small")
  large = schedules.model_log_variance(schedule, t, 4, "fixed_large")
  np.testing.assert_allclose(low, jnp.broadcast_to(small, low.shape),
                             rtol=1e-6)
  # v = +1 is log beta_t, the fixed-large table except at t = 0, where
  # improved DDPM keeps log beta_0 (fixed_large uses log beta~_1 there).
  np.testing.assert_allclose(high[1:], jnp.broadcast_to(large, high.shape)[1:],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(high[:, 0, 0, 0], np.log(schedule.betas),
                             rtol=1e-6, atol=1e-6)
  assert abs(float(high[0, 0, 0, 0]) - float(large[0, 0, 0, 0])) > 0.1
  # v = 0: the geometric mean of the two variances.
  np.testing.assert_allclose(mid, 0.5 * (low + high), rtol=1e-6)
  # Per-pixel v gives per-pixel variances.
  v = jnp.linspace(-1, 1, 4).reshape(1, 2, 2, 1) * ones
  per_pixel = schedules.model_log_variance(schedule, t, 4, "learned_range", v)
  assert per_pixel.shape == (T, 2, 2, 1)
  assert float(jnp.std(per_pixel[T // 2])) > 0
  with pytest.raises(ValueError, match="needs the network's variance"):
    schedules.model_log_variance(schedule, t, 4, "learned_range")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vlb_term_with_learned_variance_matches_fixed_at_the_ends(name):
  schedule = _schedule(name)
  key_x, key_noise = jax.random.split(jax.random.key(0))
  x0 = _x0(key_x)
  noise = jax.random.normal(key_noise, SHAPE)
  for t_value in (0, 1, 7, T - 1):
    t = jnp.full(SHAPE[:1], t_value, jnp.int32)
    small = objectives.vlb_term(_eps_fn, schedule, x0, t, noise,
                                "fixed_small")
    low = objectives.vlb_term(_with_v(-1.0), schedule, x0, t, noise,
                              "learned_range")
    np.testing.assert_allclose(low, small, rtol=1e-5)
    large = objectives.vlb_term(_eps_fn, schedule, x0, t, noise,
                                "fixed_large")
    high = objectives.vlb_term(_with_v(1.0), schedule, x0, t, noise,
                               "learned_range")
    if t_value > 0:
      np.testing.assert_allclose(high, large, rtol=1e-5)
    else:  # the decoder's variance is beta_0 < beta~_1: another value
      assert not np.allclose(high, large, rtol=1e-3)
  with pytest.raises(ValueError, match="returns \\(eps, v\\)"):
    objectives.vlb_term(_eps_fn, schedule, x0, t, noise, "learned_range")


def test_variational_bound_with_learned_variance_matches_fixed_small():
  schedule = _schedule()
  x0 = _x0(jax.random.key(1))
  key = jax.random.key(2)
  for num_eval in (0, 6):
    fixed = objectives.variational_bound(_eps_fn, schedule, x0, key, num_eval,
                                         "fixed_small", num_exact_timesteps=2)
    learned = objectives.variational_bound(
        _with_v(-1.0), schedule, x0, key, num_eval, "learned_range",
        num_exact_timesteps=2)
    for name in fixed:
      np.testing.assert_allclose(learned[name], fixed[name], rtol=1e-5,
                                 atol=1e-6)


def _output_terms(out, stop_mean_gradient, x0, t, noise, schedule):
  """training_terms of a "network" whose output is the array ``out``."""
  return objectives.training_terms(
      lambda x, t: out, schedule, x0, t, noise, "eps", "learned_range",
      stop_mean_gradient=stop_mean_gradient)


def test_hybrid_loss_trains_the_mean_by_l_simple_only():
  schedule = _schedule()
  keys = jax.random.split(jax.random.key(3), 4)
  x0 = _x0(keys[0])
  noise = jax.random.normal(keys[1], SHAPE)
  t = jnp.array([0, 5, T - 1], jnp.int32)
  out = 0.5 * jax.random.normal(keys[2], SHAPE[:-1] + (2 * SHAPE[-1],))
  c = SHAPE[-1]

  def hybrid(out):
    terms = _output_terms(out, True, x0, t, noise, schedule)
    return jnp.mean(terms["simple_loss"] + objectives.HYBRID_VLB_WEIGHT *
                    terms["vlb_term_bpd"])

  def simple(out):
    return jnp.mean(_output_terms(out, True, x0, t, noise,
                                  schedule)["simple_loss"])

  def vlb(out, stop):
    return jnp.mean(_output_terms(out, stop, x0, t, noise,
                                  schedule)["vlb_term_bpd"])

  g_hybrid = jax.grad(hybrid)(out)
  g_simple = jax.grad(simple)(out)
  # Mean channels: exactly L_simple's gradient.
  np.testing.assert_allclose(g_hybrid[..., :c], g_simple[..., :c],
                             rtol=1e-5, atol=1e-9)
  assert float(jnp.abs(g_simple[..., :c]).max()) > 0
  # Variance channels: nothing from L_simple, something from the VLB term.
  np.testing.assert_array_equal(g_simple[..., c:], 0.0)
  assert float(jnp.abs(g_hybrid[..., c:]).max()) > 0
  np.testing.assert_allclose(
      g_hybrid[..., c:],
      objectives.HYBRID_VLB_WEIGHT * jax.grad(vlb)(out, True)[..., c:],
      rtol=1e-5, atol=1e-9)
  # L_vlb without the stop-gradient trains the mean channels too.
  np.testing.assert_array_equal(jax.grad(vlb)(out, True)[..., :c], 0.0)
  assert float(jnp.abs(jax.grad(vlb)(out, False)[..., :c]).max()) > 0


def test_vlb_term_bpd_is_t_times_the_term_in_bits_per_dim():
  schedule = _schedule()
  keys = jax.random.split(jax.random.key(4), 3)
  x0 = _x0(keys[0])
  noise = jax.random.normal(keys[1], SHAPE)
  t = jnp.array([0, 3, 20], jnp.int32)
  out = jnp.concatenate([_eps_fn(x0, t), jnp.full(SHAPE, 0.25)], -1)
  terms = _output_terms(out, False, x0, t, noise, schedule)
  direct = objectives.vlb_term(
      lambda x, t: (out[..., :2], out[..., 2:]), schedule, x0, t, noise,
      "learned_range")
  num_dims = np.prod(SHAPE[1:])
  np.testing.assert_allclose(terms["vlb_term_bpd"],
                             T * direct / (num_dims * np.log(2)), rtol=1e-5)
  # L_hybrid's VLB part, 0.001 T L_t, is improved DDPM's T / 1000 rescale.
  assert objectives.HYBRID_VLB_WEIGHT * T == T / 1000


def _sample_pair(variance, value, num_steps, spacing="linspace"):
  schedule = _schedule()
  key = jax.random.key(5)
  fixed = samplers.ddpm_sample(_eps_fn, schedule, key, SHAPE, num_steps,
                               variance, clip_x0=True,
                               timestep_spacing=spacing)
  learned = samplers.ddpm_sample(_with_v(value), schedule, key, SHAPE,
                                 num_steps, "learned_range", clip_x0=True,
                                 timestep_spacing=spacing)
  return fixed, learned


@pytest.mark.parametrize("num_steps,spacing", [(T, "linspace"),
                                               (7, "linspace"),
                                               (10, "trailing")])
def test_learned_sampler_matches_fixed_variances_at_the_ends(num_steps,
                                                             spacing):
  fixed, learned = _sample_pair("fixed_large", 1.0, num_steps, spacing)
  np.testing.assert_allclose(learned, fixed, atol=1e-5)
  fixed, learned = _sample_pair("fixed_small", -1.0, num_steps, spacing)
  np.testing.assert_allclose(learned, fixed, atol=1e-5)
  # In between, another chain.
  _, middle = _sample_pair("fixed_small", 0.0, num_steps, spacing)
  assert float(jnp.abs(middle - learned).max()) > 1e-3


def test_respaced_tables_of_all_steps_are_the_schedule():
  schedule = _schedule("linear")
  tables = samplers.respaced_tables(schedule, T)
  np.testing.assert_array_equal(tables.timesteps, np.arange(T))
  np.testing.assert_allclose(tables.betas, schedule.betas, rtol=1e-3,
                             atol=1e-7)
  np.testing.assert_allclose(tables.log_betas, np.log(schedule.betas),
                             atol=2e-3)
  np.testing.assert_allclose(tables.posterior_log_variance_clipped,
                             schedule.posterior_log_variance_clipped,
                             atol=2e-3)
  # Respaced: beta_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, larger than
  # the original betas at the same timesteps.
  short = samplers.respaced_tables(schedule, 5)
  abar = np.asarray(schedule.alphas_cumprod)[np.asarray(short.timesteps)]
  expected = 1 - abar / np.append(1.0, abar[:-1])
  np.testing.assert_allclose(short.betas, expected, rtol=1e-5)
  assert bool(jnp.all(short.betas[1:] >
                      schedule.betas[short.timesteps[1:]]))
  post = expected * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
  np.testing.assert_allclose(short.posterior_log_variance_clipped[1:],
                             np.log(post[1:]), rtol=1e-5)
  assert float(short.posterior_log_variance_clipped[0]) == pytest.approx(
      float(np.log(post[1])), rel=1e-5)


def test_learned_variance_config_is_checked():
  config = _tiny_model_config(variance="learned_range")
  with pytest.raises(ValueError, match="loss_type"):
    diffusion_family.make(config)
  config = _tiny_model_config(loss_type="hybrid")
  with pytest.raises(ValueError, match="learned_range"):
    diffusion_family.make(config)
  config = _tiny_model_config(loss_type="not_a_loss")
  with pytest.raises(ValueError, match="loss_type"):
    schema.parse(diffusion_family.DiffusionConfig, config)


def _families(**overrides):
  """A learned-variance family and the fixed-small one with its mean."""
  base = dict(schedule="cosine", sampler="ddpm", sample_steps=4,
              eval_timesteps=4, eval_exact_timesteps=1, **overrides)
  learned = diffusion_family.make(_tiny_model_config(
      variance="learned_range", loss_type="hybrid", **base))
  small = diffusion_family.make(_tiny_model_config(
      variance="fixed_small", **base))
  large = diffusion_family.make(_tiny_model_config(
      variance="fixed_large", **base))
  return learned, small, large


def _split_params(params, v_value):
  """(learned params with its v channels fixed at v_value, the fixed
  family's params with the same prediction)."""
  out = params["conv_out"]
  c = out["bias"].shape[0] // 2
  learned = dict(params)
  learned["conv_out"] = {
      "kernel": out["kernel"].at[..., c:].set(0.0),
      "bias": out["bias"].at[c:].set(v_value)}
  fixed = dict(params)
  fixed["conv_out"] = {"kernel": out["kernel"][..., :c],
                       "bias": out["bias"][:c]}
  return learned, fixed


def test_family_with_learned_variance_bounds_samples_and_trains():
  learned, small, large = _families()
  key = jax.random.key(6)
  batch = {"image": jax.random.randint(key, (4, 8, 8, 1), 0, 256).astype(
      jnp.uint8), "label": jnp.zeros((4,), jnp.int32)}
  params = perturbed(learned.init(key, batch), jax.random.key(7), 0.05)
  assert params["conv_out"]["bias"].shape == (2,)  # 2C channels

  # Training: L_hybrid = L_simple + 0.001 T L_t (bits/dim), finite grads.
  (loss, metrics), grads = jax.value_and_grad(learned.loss, has_aux=True)(
      params, batch, key, jnp.int32(0))
  assert float(loss) == pytest.approx(
      float(metrics["simple_loss"] + 1e-3 * metrics["vlb_term_bpd"]),
      rel=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["conv_out"]["bias"][1:]).max()) > 0

  # v = -1: the bound and the ancestral sampler are fixed_small's; v = +1:
  # the KL terms and the sampler are fixed_large's (the decoder's variance
  # differs); DDIM ignores the variance channels. visualize's rows: ddpm,
  # then ddim, from the same x_T.
  run = {name: jax.jit(lambda p, fam=fam: (
      fam.evaluate(p, batch, key), fam.visualize(p, batch, key)["samplers"]))
         for name, fam in (("learned", learned), ("small", small),
                           ("large", large))}
  low, fixed = _split_params(params, -1.0)
  high, _ = _split_params(params, 1.0)
  (got, rows), (want, want_rows) = run["learned"](low), run["small"](fixed)
  for name in ("bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd",
               "simple_loss"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
  assert set(metrics) <= set(got)
  np.testing.assert_allclose(rows, want_rows, atol=1e-5)
  (got_high, rows_high), (want_high, large_rows) = (run["learned"](high),
                                                    run["large"](fixed))
  np.testing.assert_allclose(got_high["diffusion_bpd"],
                             want_high["diffusion_bpd"], rtol=1e-5)
  np.testing.assert_allclose(
      got_high["bpd"], got_high["prior_bpd"] + got_high["diffusion_bpd"] +
      got_high["decoder_bpd"], rtol=1e-5)
  np.testing.assert_allclose(rows_high[0], large_rows[0], atol=1e-5)
  np.testing.assert_allclose(rows_high[1], want_rows[1], atol=1e-5)
  assert float(jnp.abs(rows_high[0] - rows[0]).max()) > 1e-3


@pytest.mark.slow
def test_ode_likelihood_uses_the_prediction_channels_only():
  learned, small, _ = _families(eval_likelihood="ode", ode_tolerance=1e-3)
  key = jax.random.key(8)
  batch = {"image": jax.random.randint(key, (2, 8, 8, 1), 0, 256).astype(
      jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
  params = learned.init(key, batch)
  # A constant prediction (eps = 0.1) and v = 0.7: the ODE is chaotic for
  # random weights, so the two families must compute the same drift
  # exactly, not merely up to rounding; v leaking into the drift would
  # change it.
  params["conv_out"] = {"kernel": params["conv_out"]["kernel"] * 0.0,
                        "bias": jnp.array([0.1, 0.7])}
  with_v, fixed = _split_params(params, 0.7)
  got = learned.evaluate(with_v, batch, key)["bpd"]
  np.testing.assert_allclose(got, small.evaluate(fixed, batch, key)["bpd"],
                             rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(got)))


def test_paper_config_keeps_improved_ddpm_hyper_parameters():
  config = config_lib.load("configs/iddpm_cifar10.py")
  model = config.model
  assert (model.num_timesteps, model.schedule) == (4000, "cosine")
  assert (model.variance, model.loss_type) == ("learned_range", "hybrid")
  assert (model.width, model.num_res_blocks, model.dropout) == (128, 3, 0.3)
  assert tuple(model.attn_resolutions) == (16, 8) and model.num_heads == 4
  assert config.optim.learning_rate == 1e-4
  assert config.train.batch_size == 128
  assert config.optim.ema_decay == 0.9999
  mnist = config_lib.load("configs/diffusion_mnist.py:iddpm").model
  assert (mnist.variance, mnist.loss_type, mnist.schedule) == (
      "learned_range", "hybrid", "cosine")
