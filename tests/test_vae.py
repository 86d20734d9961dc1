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
  recon, paths = pictures["reconstruction"], pictures["interpolation"]
  # Inputs above their reconstructions; one interpolation per row.
  assert recon.shape == (2, 4, 8, 8, channels)
  assert paths.shape == (2, 8, 8, 8, channels)
  if binarize == "none":
    np.testing.assert_allclose(recon[0], batch["image"] / 255.0, atol=1e-6)
  # The decoder's mean is shown (sample_mean), so each path starts and ends
  # on the decoded posterior means of its pair: images 2p and 2p + 1.
  np.testing.assert_allclose(paths[:, 0], recon[1, 0::2], atol=1e-5)
  np.testing.assert_allclose(paths[:, -1], recon[1, 1::2], atol=1e-5)
  assert float(jnp.abs(paths[:, 0] - paths[:, -1]).max()) > 0.0


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


def test_iwae_objective_gradient_matches_hand_written_k_sample_reference():
  """The gradient of importance_weighted_bound (what objective="iwae"
  trains) against a per-sample loop written out by hand: log w_i =
  log p(x | z_i) + log N(z_i; 0, I) - log N(z_i; m, s), z_i = m + s eps_i,
  L_k = log mean_i w_i, with the same eps."""
  x = _data()
  k = 5
  key = jax.random.PRNGKey(4)

  def encode(theta, x):
    return theta["a"] * x + theta["b"], jnp.broadcast_to(theta["c"], x.shape)

  def iwae(theta):
    latent = vae.gaussian_latent_model(lambda v: encode(theta, v),
                                       _log_likelihood)
    return jnp.sum(vae.importance_weighted_bound(latent, x, key, k))

  def reference(theta):
    mean, log_std = encode(theta, x)
    eps = jax.random.normal(jax.random.split(key, 1)[0], (k,) + mean.shape)
    total = 0.0
    for b in range(x.shape[0]):
      logs = []
      for i in range(k):
        z = mean[b] + jnp.exp(log_std[b]) * eps[i, b]
        log_px = jnp.sum(-0.5 * ((x[b] - z) / S) ** 2 - math.log(S) -
                         0.5 * math.log(2 * math.pi))
        log_prior = jnp.sum(-0.5 * z**2 - 0.5 * math.log(2 * math.pi))
        log_q = jnp.sum(-0.5 * eps[i, b] ** 2 - log_std[b] -
                        0.5 * math.log(2 * math.pi))
        logs.append(log_px + log_prior - log_q)
      logs = jnp.stack(logs)
      top = jnp.max(logs)
      total = total + top + jnp.log(jnp.mean(jnp.exp(logs - top)))
    return total

  theta = {"a": jnp.array([0.5, 0.7, 0.9]), "b": jnp.array(0.1),
           "c": jnp.array([-0.3, -0.8, -1.2])}
  np.testing.assert_allclose(iwae(theta), reference(theta), rtol=1e-5)
  got, want = jax.grad(iwae)(theta), jax.grad(reference)(theta)
  for name in theta:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  # k = 1: the IWAE gradient is the Monte Carlo ELBO's.
  mc_elbo = lambda theta: jnp.sum(jnp.sum(jnp.stack(  # noqa: E731
      vae.gaussian_latent_model(lambda v: encode(theta, v), _log_likelihood)
      .log_weights(encode(theta, x), x, jax.random.split(key, 1)[0], 1)),
      axis=0))
  one = lambda theta: jnp.sum(vae.importance_weighted_bound(  # noqa: E731
      vae.gaussian_latent_model(lambda v: encode(theta, v), _log_likelihood),
      x, key, 1))
  np.testing.assert_allclose(jax.grad(one)(theta)["a"],
                             jax.grad(mc_elbo)(theta)["a"], rtol=1e-5)


def test_multi_sample_elbo_is_unbiased_with_less_variance():
  """E[ELBO_k] is the ELBO for every k; its variance falls like 1/k."""
  x = _data()
  latent = vae.gaussian_latent_model(
      lambda v: (0.6 * v, jnp.full_like(v, -0.9)), _log_likelihood)
  draw = jax.jit(jax.vmap(lambda key, k=1: vae.multi_sample_elbo(
      latent, x, key, k)["elbo"], in_axes=(0, None)), static_argnums=1)
  keys = jax.random.split(jax.random.PRNGKey(5), 4000)
  one, ten = draw(keys, 1), draw(keys, 10)
  se = np.sqrt(one.var(0) / 4000 + ten.var(0) / 4000)
  assert np.all(np.abs(one.mean(0) - ten.mean(0)) < 5 * se)
  ratio = one.var(0) / ten.var(0)
  assert np.all((ratio > 6) & (ratio < 15)), ratio


def test_iwae_objective_two_stochastic_layers_and_active_units():
  """objective="iwae" trains L_k; the two-layer model (the IWAE paper's
  784-200-200-100 / 100-100-50 with tanh, here shrunk) has its bound, its
  samples and the active-units vectors; the paper sizes have the count of
  the layers' weights."""
  cfg = _model_config(architecture="mlp", stochastic_layers=2,
                      bottom_latent_dim=5, top_hidden_sizes=(6,),
                      objective="iwae", train_samples=3)
  family = make_family(cfg)
  batch = _batch()
  params = jax.jit(family.init)(jax.random.PRNGKey(0), batch)
  assert {"encoder", "decoder", "top_encoder", "top_decoder"} == set(params)
  loss, metrics = jax.jit(family.loss)(params, batch, jax.random.PRNGKey(1),
                                       jnp.int32(0))
  np.testing.assert_allclose(loss, metrics["neg_iwae_train_nats"])
  # L_3 is tighter than the ELBO in expectation; loosely on one batch.
  assert float(loss) <= float(metrics["neg_elbo_nats"]) + 5.0
  out = jax.jit(family.evaluate)(params, batch, jax.random.PRNGKey(2))
  assert out["active_units_h1"].shape == (4, 5)
  assert out["active_units_h2"].shape == (4, 3)
  samples = jax.jit(family.sample, static_argnums=2)(
      params, jax.random.PRNGKey(3), 5)
  assert samples.shape == (5, 8, 8, 1)

  model = vae.VAE(image_shape=(28, 28, 1), latent_dim=50,
                  architecture="mlp", likelihood="bernoulli",
                  conv_channels=(), hidden_sizes=(200, 200), dense_size=0,
                  stochastic_layers=2, bottom_latent_dim=100,
                  top_hidden_sizes=(100, 100))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 100)))
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))
  dense = lambda a, b: a * b + b  # noqa: E731
  want = (dense(784, 200) + dense(200, 200) + 2 * dense(200, 100)  # q(h1|x)
          + dense(100, 100) + dense(100, 100) + 2 * dense(100, 50)  # q(h2|h1)
          + dense(50, 100) + dense(100, 100) + 2 * dense(100, 100)  # p(h1|h2)
          + dense(100, 200) + dense(200, 200) + dense(200, 784))  # p(x|h1)
  assert count == want == 521_084


def test_active_units_count_components_that_vary():
  """evaluate_dataset reports a [B, D] metric as the number of its
  components whose variance over examples is above 0.01."""
  from gm_jax import data, train
  from tests.test_train import smoke_config
  config = smoke_config()
  built = train.build(config)
  source = data.load_source(config.data, "test")
  scales = jnp.array([0.0, 0.05, 0.2, 1.0, 3.0])  # variances ~0, .0025, .04..

  def evaluate_fn(params, batch, key):
    del params
    noise = jax.random.normal(key, (batch["image"].shape[0], 5))
    return {"bpd": jnp.zeros(batch["image"].shape[0]),
            "active_units": 7.0 + scales * noise}

  results = train.evaluate_dataset(evaluate_fn, None, source,
                                   config.train.eval_batch_size, 32,
                                   jax.random.PRNGKey(0), built.mesh)
  assert results["active_units"] == 3.0


def test_samples_reach_the_decoder_in_groups_on_cpu_with_the_same_values():
  """map_samples is vmap over the samples; on CPU, past CPU_DECODER_ROWS
  rows it runs lax.map in groups (a remainder included) with the same
  values."""
  w = jax.random.normal(jax.random.PRNGKey(0), (5, 3))

  def fn(zi):  # [B, 5] -> [B]
    return jnp.sum(jnp.sin(zi @ w), axis=-1)
  z = jax.random.normal(jax.random.PRNGKey(1), (7, 300, 5))  # 2,100 rows
  grouped = jax.jit(lambda z: vae.map_samples(fn, z))
  np.testing.assert_allclose(grouped(z), jax.vmap(fn)(z), rtol=1e-5,
                             atol=1e-6)
  text = str(jax.make_jaxpr(lambda z: vae.map_samples(fn, z))(z))
  assert ("scan" in text) == (jax.default_backend() == "cpu")
  assert "scan" not in str(jax.make_jaxpr(
      lambda z: vae.map_samples(fn, z))(z[:3]))  # 900 rows: one call


def test_iwae_evaluation_is_the_same_in_decoder_groups(monkeypatch):
  """The family's IWAE bound with k = 40 on 32 images (1,280 decoder rows,
  in groups of 32 samples on CPU) equals the bound with every sample in
  one decoder call: the draws do not depend on the grouping."""
  family = make_family(_model_config(iwae_samples=40, iwae_chunk=40))
  batch = _batch(n=32)
  params = jax.jit(family.init)(jax.random.PRNGKey(0), batch)
  key = jax.random.PRNGKey(2)
  grouped = jax.jit(family.evaluate)(params, batch, key)["nll_nats"]
  monkeypatch.setattr(vae, "CPU_DECODER_ROWS", 10**9)
  whole = jax.jit(family.evaluate)(params, batch, key)["nll_nats"]
  np.testing.assert_allclose(grouped, whole, rtol=1e-5)
