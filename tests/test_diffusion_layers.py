"""The U-Net's Flax blocks: embeddings, ResNet/attention blocks, resampling."""

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax.diffusion import layers


def test_sinusoidal_embedding_formula():
  t = jnp.array([0, 1, 17, 999])
  emb = layers.sinusoidal_embedding(t, 8)
  assert emb.shape == (4, 8)
  freqs = np.exp(-math.log(10_000) * np.arange(4) / 3)  # 1 .. 1e-4
  want = np.concatenate([np.sin(np.outer(t, freqs)),
                         np.cos(np.outer(t, freqs))], axis=1)
  np.testing.assert_allclose(emb, want, atol=2e-4)
  odd = layers.sinusoidal_embedding(t, 7)
  assert odd.shape == (4, 7) and float(jnp.abs(odd[:, -1]).max()) == 0.0
  with pytest.raises(ValueError, match=r"t must be \[B\]"):
    layers.sinusoidal_embedding(jnp.zeros((2, 1)), 8)


@jax.jit
def _perturbed(params, key, scale=0.1):
  """params + scale * N(0, 1), drawn as one flat vector (XLA:CPU compiles
  per-leaf draws of 4-D shapes slowly)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(key, flat.shape))


def test_resnet_block_starts_as_identity_and_uses_dropout():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  emb = jax.random.normal(jax.random.key(1), (2, 16))
  block = layers.ResnetBlock(dropout=0.5, num_groups=4)
  params = jax.jit(block.init)(jax.random.key(2), x, emb)
  apply = jax.jit(lambda p, e: block.apply(p, x, e))
  # The last conv starts at zero, so the block is the identity at init.
  np.testing.assert_allclose(apply(params, emb), x, atol=1e-6)
  params = _perturbed(params, jax.random.key(3))
  out = apply(params, emb)
  assert float(jnp.abs(out - x).max()) > 1e-2
  # The embedding conditions the output.
  assert float(jnp.abs(apply(params, emb + 1.0) - out).max()) > 1e-3
  # Dropout: deterministic at eval, random (and different) when training.
  train = jax.jit(lambda key: block.apply(params, x, emb, train=True,
                                          rngs={"dropout": key}))
  drop = [train(jax.random.key(k)) for k in (4, 5)]
  assert float(jnp.abs(drop[0] - drop[1]).max()) > 1e-3
  np.testing.assert_array_equal(apply(params, emb), out)


def test_resnet_block_changes_channels_and_checks_groups():
  x = jnp.ones((1, 4, 4, 8))
  block = layers.ResnetBlock(out_channels=12, num_groups=4)
  params = jax.eval_shape(block.init, jax.random.key(0), x)
  assert jax.eval_shape(block.apply, params, x).shape == (1, 4, 4, 12)
  assert params["params"]["shortcut"]["kernel"].shape == (1, 1, 8, 12)
  with pytest.raises(ValueError, match="num_groups=5 must divide"):
    layers.ResnetBlock(num_groups=5).init(jax.random.key(0), x)


def test_attention_is_permutation_equivariant(num_heads=2):
  """Attention and GroupNorm treat positions as a set: permuting the pixels of
  the input permutes the output the same way."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  block = layers.AttentionBlock(num_heads=num_heads, num_groups=4)
  params = _perturbed(jax.jit(block.init)(jax.random.key(1), x),
                      jax.random.key(2))
  apply = jax.jit(block.apply)
  perm = jax.random.permutation(jax.random.key(3), 16)
  permute = lambda a: a.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)  # noqa: E731
  out = apply(params, x)
  assert float(jnp.abs(out - x).max()) > 1e-2
  np.testing.assert_allclose(apply(params, permute(x)), permute(out),
                             atol=1e-5)
  # Every output position depends on every input position.
  grad = jax.jit(jax.grad(lambda v: block.apply(params, v)[0, 0, 0, 0]))(x)
  assert bool(jnp.all(jnp.abs(grad[0]).sum(-1) > 0))


def test_resampling():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  up = layers.Upsample(with_conv=False)
  up_x = up.apply({}, x)
  assert up_x.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(up_x[:, ::2, ::2], x)
  np.testing.assert_array_equal(up_x[:, 1::2, 1::2], x)
  down = layers.Downsample(with_conv=False)
  np.testing.assert_allclose(down.apply({}, up_x), x)  # pool undoes repeat
  for module in (layers.Downsample(), layers.Upsample()):
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    assert params["params"]["conv"]["kernel"].shape == (3, 3, 3, 3)
  down = layers.Downsample()
  params = jax.eval_shape(down.init, jax.random.key(0), x)
  assert jax.eval_shape(down.apply, params, x).shape == (2, 2, 2, 3)
  with pytest.raises(ValueError, match="H and W must be even"):
    layers.Downsample().init(jax.random.key(0), jnp.ones((1, 5, 4, 3)))


def test_bfloat16_compute_keeps_float32_params():
  x = jnp.ones((1, 4, 4, 8), jnp.bfloat16)
  block = layers.ResnetBlock(num_groups=4, dtype=jnp.bfloat16)
  params = block.init(jax.random.key(0), x, jnp.ones((1, 4)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert block.apply(params, x, jnp.ones((1, 4))).dtype == jnp.bfloat16


def test_fan_avg_uniform_init_statistics():
  """Matches variance_scaling(1, fan_avg, uniform): U(-l, l), l = sqrt(6 /
  (fan_in + fan_out)), fans including the receptive field."""
  init = layers.fan_avg_uniform(1.0)
  kernel = init(jax.random.key(0), (3, 3, 64, 32))
  limit = math.sqrt(6.0 / (9 * 64 + 9 * 32))
  assert kernel.shape == (3, 3, 64, 32) and kernel.dtype == jnp.float32
  assert float(jnp.abs(kernel).max()) <= limit
  assert float(jnp.std(kernel)) == pytest.approx(limit / math.sqrt(3),
                                                 rel=0.02)
  dense = init(jax.random.key(1), (200, 100))
  assert float(jnp.std(dense)) == pytest.approx(
      math.sqrt(6.0 / 300) / math.sqrt(3), rel=0.02)
