"""The VAE bounds on a model with a known likelihood, and the VAE family."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import losses, vae
from gm_jax.families import make_family

# A linear Gaussian model: z ~ N(0, I), x | z ~ N(z, s^2 I), so
# p(x) = N(0, (1 + s^2) I) and the posterior is N(x / (1 + s^2), s^2 / (1 + s^2)).
S = 0.5


def _log_likelihood(x, z):
  return jnp.sum(losses.gaussian_log_prob(x, z, math.log(S)), axis=-1)


def _exact_encode(x):
  var = S**2 / (1 + S**2)
  return x / (1 + S**2), jnp.full_like(x, 0.5 * math.log(var))


def _log_marginal(x):
  return jnp.sum(losses.gaussian_log_prob(x, 0.0, 0.5 * math.log(1 + S**2)),
                 axis=-1)


def _data():
  return jax.random.normal(jax.random.PRNGKey(0), (6, 3)) * 1.3


def test_elbo_and_iwae_equal_log_marginal_with_exact_posterior():
  x = _data()
  # Every importance weight p(x, z) / q(z | x) equals p(x): exact for any k.
  bound = vae.iwae_bound(_exact_encode, _log_likelihood, x,
                         jax.random.PRNGKey(2), num_samples=8, chunk_size=4)
  np.testing.assert_allclose(bound, _log_marginal(x), rtol=1e-5)
  # The ELBO (one sample, analytic KL) equals log p(x) in expectation.
  out = jax.jit(jax.vmap(
      lambda k: vae.elbo(_exact_encode, _log_likelihood, x, k)))(
      jax.random.split(jax.random.PRNGKey(1), 4000))
  np.testing.assert_allclose(out["elbo"].mean(0), _log_marginal(x), atol=0.05)
  np.testing.assert_allclose(out["elbo"], out["log_likelihood"] - out["kl"],
                             rtol=1e-5)


def test_iwae_tightens_with_k_and_stays_below_log_marginal():
  x = _data()

  def poor_encode(x):  # a posterior that is too wide and shifted
    return 0.5 * x, jnp.zeros_like(x)

  def mean_bound(k, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 200)
    values = jax.jit(jax.vmap(lambda key: vae.iwae_bound(
        poor_encode, _log_likelihood, x, key, k, min(k, 10))))(keys)
    return values.mean(0)

  log_px = _log_marginal(x)
  b1, b10, b100 = mean_bound(1, 0), mean_bound(10, 1), mean_bound(100, 2)
  assert np.all(b1 < b10) and np.all(b10 < b100)
  assert np.all(b100 < log_px + 0.02)  # E[L_k] <= log p(x), up to MC noise
  elbo = vae.elbo(poor_encode, _log_likelihood, x, jax.random.PRNGKey(3))
  exact_elbo = log_px - jnp.sum(  # ELBO = log p(x) - KL(q || posterior)
      losses.normal_kl(0.5 * x, 0.0, x / (1 + S**2),
                       math.log(S**2 / (1 + S**2))), axis=-1)
  draws = jax.jit(jax.vmap(lambda k: vae.elbo(
      poor_encode, _log_likelihood, x, k)["elbo"]))(
      jax.random.split(jax.random.PRNGKey(4), 4000))
  std_error = draws.std(0) / math.sqrt(draws.shape[0])
  assert np.all(np.abs(draws.mean(0) - exact_elbo) < 5 * std_error)
  assert elbo["elbo"].shape == (6,)


def test_iwae_chunks_are_one_logsumexp():
  x = _data()
  def encode(x):
    return (0.4 * x, jnp.full_like(x, -0.3))
  key = jax.random.PRNGKey(5)
  got = vae.iwae_bound(encode, _log_likelihood, x, key, 12, chunk_size=4)
  mean, log_std = encode(x)
  weights = []
  for chunk_key in jax.random.split(key, 3):
    z = mean + jnp.exp(log_std) * jax.random.normal(chunk_key, (4,) + x.shape)
    weights.append(
        jax.vmap(lambda zi: _log_likelihood(x, zi))(z) +
        jnp.sum(losses.gaussian_log_prob(z, 0.0, 0.0), -1) -
        jnp.sum(losses.gaussian_log_prob(z, mean, log_std), -1))
  want = jax.nn.logsumexp(jnp.concatenate(weights), axis=0) - math.log(12)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of chunk_size"):
    vae.iwae_bound(encode, _log_likelihood, x, key, 10, chunk_size=4)


def test_reparameterization_carries_gradients():
  x = _data()

  def neg_elbo(shift):
    def encode(x):
      return (x * 0.5 + shift, jnp.zeros_like(x))
    return -vae.elbo(encode, _log_likelihood, x, jax.random.PRNGKey(0))[
        "elbo"].sum()

  assert abs(float(jax.grad(neg_elbo)(0.3))) > 1e-3


def test_elbo_rejects_bad_encoder_output():
  with pytest.raises(ValueError, match=r"\[B, Z\]"):
    vae.elbo(lambda x: (x, x[:, :1]), _log_likelihood, _data(),
             jax.random.PRNGKey(0))


def _model_config(**overrides):
  cfg = vae.default_model_config()
  cfg.image_shape = (8, 8, 1)
  cfg.latent_dim = 3
  cfg.conv_channels = (4, 4)
  cfg.dense_size = 8
  cfg.hidden_sizes = (8,)
  cfg.iwae_samples = 4
  cfg.iwae_chunk = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _batch(channels=1, n=4):
  image = jax.random.randint(jax.random.PRNGKey(0), (n, 8, 8, channels), 0,
                             256).astype(jnp.uint8)
  return {"image": image, "label": jnp.zeros((n,), jnp.int32)}


@pytest.mark.parametrize("arch,likelihood,binarize,channels", [
    ("conv", "bernoulli", "dynamic", 1),
    ("mlp", "bernoulli", "threshold", 1),
    ("conv", "discretized_logistic", "none", 3),
    ("mlp", "discretized_gaussian", "none", 1),
])
def test_family_contract(arch, likelihood, binarize, channels):
  cfg = _model_config(architecture=arch, likelihood=likelihood,
                      binarize=binarize, image_shape=(8, 8, channels))
  family = make_family(cfg)
  batch = _batch(channels)
  params = jax.jit(family.init)(jax.random.PRNGKey(0), batch)
  loss, metrics = jax.jit(family.loss)(params, batch, jax.random.PRNGKey(1),
                                       jnp.int32(0))
  assert loss.shape == () and np.isfinite(loss)
  np.testing.assert_allclose(loss, metrics["neg_elbo_nats"], rtol=1e-6)
  out = jax.jit(family.evaluate)(params, batch, jax.random.PRNGKey(2))
  assert out["nll_nats"].shape == (4,)
  # Training and evaluation name the ELBO's terms alike (curves overlay).
  terms = {"neg_elbo_nats", "kl_nats", "recon_nll_nats"}
  assert terms <= set(metrics) and terms <= set(out)
  np.testing.assert_allclose(
      out["neg_elbo_nats"], out["recon_nll_nats"] + out["kl_nats"],
      rtol=1e-5)
  # IWAE_k with k = 4 is at least as tight as the ELBO on average.
  assert out["nll_nats"].mean() <= out["neg_elbo_nats"].mean() + 1.0
  np.testing.assert_allclose(out["bpd"],
                             out["nll_nats"] / (8 * 8 * channels * math.log(2)),
                             rtol=1e-6)
  samples = jax.jit(family.sample, static_argnums=2)(params,
                                                     jax.random.PRNGKey(3), 5)
  assert samples.shape == (5, 8, 8, channels)
  assert float(samples.min()) >= 0 and float(samples.max()) <= 1
  pictures = jax.jit(family.visualize)(params, batch, jax.random.PRNGKey(4))
  assert pictures["reconstruction"].shape == (8, 8, 8, channels)
  assert pictures["interpolation"].shape == (16, 8, 8, channels)


def test_kl_warmup_and_dynamic_binarization():
  cfg = _model_config(kl_warmup_steps=10, beta=2.0)
  family = make_family(cfg)
  batch = _batch()
  params = jax.jit(family.init)(jax.random.PRNGKey(0), batch)
  loss = jax.jit(family.loss)
  _, m0 = loss(params, batch, jax.random.PRNGKey(1), jnp.int32(0))
  _, m5 = loss(params, batch, jax.random.PRNGKey(1), jnp.int32(5))
  _, m20 = loss(params, batch, jax.random.PRNGKey(1), jnp.int32(20))
  np.testing.assert_allclose([m0["kl_weight"], m5["kl_weight"],
                              m20["kl_weight"]], [0.0, 1.0, 2.0])
  a = losses.binarize_images(batch["image"], "dynamic", jax.random.PRNGKey(0))
  b = losses.binarize_images(batch["image"], "dynamic", jax.random.PRNGKey(1))
  assert set(np.unique(a)) <= {0.0, 1.0} and not np.array_equal(a, b)


@pytest.mark.parametrize("overrides,message", [
    ({"architecture": "resnet"}, "architecture='resnet'"),
    ({"likelihood": "poisson"}, "likelihood='poisson'"),
    ({"likelihood": "discretized_logistic", "binarize": "dynamic"},
     "binarize='dynamic' needs likelihood='bernoulli'"),
    ({"image_shape": (10, 10, 1)}, "divisible by 4"),
    ({"iwae_samples": 5, "iwae_chunk": 2}, "iwae_samples=5 must be a"),
    ({"laten_dim": 4}, r"Unknown config.model key\(s\) \['laten_dim'\]"),
])
def test_bad_model_config_is_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    make_family(_model_config(**overrides))


def test_transpose_head_is_the_dcgan_mirror():
  """decoder_head "transpose": the last transposed convolution gives the
  outputs (no 3x3 head); with k = 4 the parameters are exactly the sum over
  the layers of the mirror-image conv net (the PyTorch peer's VAE)."""
  z_dim, (c1, c2), fc, k = 8, (4, 6), 16, 4
  model = vae.VAE(image_shape=(8, 8, 1), latent_dim=z_dim,
                  architecture="conv", likelihood="bernoulli",
                  conv_channels=(c1, c2), hidden_sizes=(), dense_size=fc,
                  conv_kernel_size=k, decoder_head="transpose")
  x = jnp.zeros((3, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), x,
                      method=lambda m, x: m.decode(m.encode(x)[0]))["params"]
  decoder = params["decoder"]
  assert sorted(decoder) == ["ConvTranspose_0", "ConvTranspose_1", "Dense_0",
                             "Dense_1"]
  assert decoder["ConvTranspose_1"]["kernel"].shape == (k, k, c1, 1)
  count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))  # noqa
  conv = lambda i, o: k * k * i * o + o  # noqa: E731
  dense = lambda i, o: i * o + o  # noqa: E731
  flat = 2 * 2 * c2
  assert count(params["encoder"]) == (conv(1, c1) + conv(c1, c2) +
                                      dense(flat, fc) + dense(fc, 2 * z_dim))
  assert count(decoder) == (dense(z_dim, fc) + dense(fc, flat) +
                            conv(c2, c1) + conv(c1, 1))
  out = model.apply({"params": params}, jnp.zeros((3, z_dim)),
                    method=lambda m, z: m.decode(z))
  assert out.shape == (3, 8, 8, 1)
