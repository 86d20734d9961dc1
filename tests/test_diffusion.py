"""The diffusion family: the U-Net, the paper config, the Family contract."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import config_lib, diffusion, schema
from gm_jax.diffusion import family as diffusion_family
from gm_jax.diffusion.unet import UNet


def test_paper_cifar10_unet_has_35_7m_parameters():
  """DDPM's CIFAR-10 network: 35.7M parameters (counted without allocating)."""
  config = config_lib.load("configs/diffusion_cifar10.py")
  net = diffusion.make_unet(
      schema.parse(diffusion.DiffusionConfig, config.model))
  shapes = jax.eval_shape(
      net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
      jnp.zeros((1,), jnp.int32))
  count = diffusion.count_params(shapes["params"])
  assert abs(count - 35.7e6) < 0.1e6, count
  # Paper hyper-parameters are kept.
  assert config.optim.learning_rate == 2e-4
  assert config.optim.warmup_steps == 5000
  assert config.train.batch_size == 128
  assert config.optim.ema_decay == 0.9999
  assert config.optim.grad_clip == 1.0
  assert config.model.dropout == 0.1
  assert tuple(config.model.attn_resolutions) == (16,)
  cosine = config_lib.load("configs/diffusion_cifar10.py:cosine")
  assert cosine.model.schedule == "cosine"
  bf16 = config_lib.load("configs/diffusion_cifar10.py:bf16")
  assert bf16.model.dtype == "bfloat16"


def test_unet_structure_and_size_check():
  net = UNet(width=8, width_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             num_groups=4, dropout=0.1, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 8, 8, 3))
  t = jnp.array([3, 700])
  params = jax.eval_shape(net.init, jax.random.key(1), x, t)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert "down1_attn0" in params and "up1_attn1" in params  # at 4x4 only
  assert "down0_attn0" not in params and "mid_attn" in params
  # One skip per down block plus conv_in and the downsample: up level 1 has
  # num_res_blocks + 1 = 2 blocks taking concatenated skips.
  assert "up1_block1" in params and "up1_block2" not in params
  out = jax.eval_shape(lambda p: net.apply({"params": p}, x, t), params)
  assert out.shape == x.shape and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 7, 7, 3)),
                   t[:1])


def _tiny_model_config(**overrides):
  config = config_lib.load("configs/diffusion_mnist.py:smoke")
  model = config.model
  model.unlock()
  model.image_shape = (8, 8, 1)
  # One resolution level (the multi-level U-Net is checked above): the
  # contract needs the family's code paths, not the network's depth.
  model.width_mult = (1,)
  model.attn_resolutions = (8,)
  for k, v in overrides.items():
    model[k] = v
  return model


@pytest.mark.parametrize("overrides", [
    dict(prediction="eps", sampler="ddim"),
    pytest.param(dict(prediction="v", sampler="ddpm", variance="fixed_large",
                      schedule="cosine", num_classes=3, dtype="bfloat16"),
                 marks=pytest.mark.slow),
])
def test_family_contract(overrides):
  family = diffusion.make(_tiny_model_config(**overrides))
  key = jax.random.key(0)
  batch = {"image": jax.random.randint(key, (4, 8, 8, 1), 0, 256).astype(
      jnp.uint8), "label": jnp.array([0, 1, 2, 0], jnp.int32)}
  params = jax.jit(family.init)(key, batch)
  # Residual branches and conv_out start at zero; perturb every weight so
  # that the time embedding reaches the output.
  params = perturbed(params, jax.random.key(2), 0.05)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      family.loss, has_aux=True))(params, batch, key, jnp.int32(0))
  assert loss.shape == () and np.isfinite(float(loss))
  assert float(metrics["simple_loss"]) == pytest.approx(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(optax_global_norm(grads)) > 0
  # The timestep enters the network: the loss depends on the time MLP.
  assert float(optax_global_norm(grads["temb_dense0"])) > 0
  results = jax.jit(family.evaluate)(params, batch, key)
  for name in ("nll_nats", "bpd", "prior_bpd", "diffusion_bpd",
               "decoder_bpd", "simple_loss"):
    assert results[name].shape == (4,)
  # The same quantity as training's, at another noise level per example.
  assert 0.1 * float(loss) < float(jnp.mean(results["simple_loss"])) < (
      10 * float(loss))
  np.testing.assert_allclose(results["bpd"],
                             results["nll_nats"] / (64 * np.log(2)),
                             rtol=1e-5)
  np.testing.assert_allclose(
      results["bpd"], results["prior_bpd"] + results["diffusion_bpd"] +
      results["decoder_bpd"], rtol=1e-5)
  # A bound on the NLL of 8-bit data: positive, and the evaluation is a
  # deterministic function of (params, batch, key).
  assert bool(jnp.all(results["bpd"] > 0))
  again = jax.jit(family.evaluate)(params, batch, key)
  np.testing.assert_array_equal(results["bpd"], again["bpd"])
  # One program for both, so the samplers compile once together.
  samples, pictures = jax.jit(lambda p, b, k: (
      family.sample(p, k, 4), family.visualize(p, b, k)))(params, batch, key)
  assert samples.shape == (4, 8, 8, 1) and samples.dtype == jnp.float32
  assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
  # One row per sampler: row 0 ddpm, row 1 ddim.
  assert set(pictures) == {"samplers"}
  rows = pictures["samplers"]
  assert rows.shape == (2, 4, 8, 8, 1) and rows.dtype == jnp.float32
  # The same key: visualize's row of the configured sampler is the sample.
  sampler = overrides["sampler"]
  row = diffusion_family.SAMPLERS.index(sampler)
  assert diffusion_family.SAMPLERS == ("ddpm", "ddim")
  np.testing.assert_allclose(rows[row], samples, atol=1e-6)
  other = rows[1 - row]
  assert other.shape == samples.shape
  assert float(other.min()) >= 0.0 and float(other.max()) <= 1.0


@jax.jit
def perturbed(params, key, scale):
  """params + scale * N(0, 1), drawn as one flat vector (XLA:CPU compiles
  per-leaf draws of 4-D shapes slowly)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(key, flat.shape))


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


@pytest.mark.parametrize("overrides,message", [
    (dict(schedule="quadratic"), "model.schedule='quadratic'"),
    (dict(sampler="euler"), "model.sampler='euler'"),
    (dict(prediction="score"), "model.prediction='score'"),
    (dict(variance="learned"), "model.variance='learned'"),
    (dict(dtype="float16"), "model.dtype='float16'"),
    (dict(sample_steps=0), "model.sample_steps=0"),
    (dict(image_shape=(6, 6, 1), width_mult=(1, 2, 2)),
     r"divisible by 2\^\(len\(width_mult\)-1\)"),
    (dict(timestep_spacing="uniform"), "model.timestep_spacing='uniform'"),
    (dict(num_groups=3), "model.num_groups=3"),
    (dict(eval_timesteps=-1), "model.eval_timesteps=-1"),
    (dict(eval_likelihood="exact"), "model.eval_likelihood=.exact."),
])
def test_bad_model_config_is_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    diffusion.make(_tiny_model_config(**overrides))


@pytest.mark.slow
def test_ode_likelihood_through_the_family():
  """eval_likelihood="ode": evaluate reports the probability-flow ODE's
  dequantized NLL (a bound on the discrete NLL) and the solver's steps."""
  family = diffusion.make(_tiny_model_config(eval_likelihood="ode",
                                             ode_tolerance=1e-3))
  key = jax.random.key(0)
  batch = {"image": jax.random.randint(key, (2, 8, 8, 1), 0, 256).astype(
      jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
  params = perturbed(jax.jit(family.init)(key, batch), jax.random.key(2),
                     0.05)
  results = jax.jit(family.evaluate)(params, batch, key)
  assert set(results) == {"nll_nats", "bpd", "ode_steps"}
  assert bool(jnp.all(jnp.isfinite(results["nll_nats"])))
  np.testing.assert_allclose(results["bpd"],
                             results["nll_nats"] / (64 * np.log(2)),
                             rtol=1e-5)
  assert float(results["ode_steps"][0]) > 0
