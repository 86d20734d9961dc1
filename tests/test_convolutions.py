"""Sub-pixel transposed convolutions compute nn.ConvTranspose's function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import vae
from gm_jax.convolutions import SubPixelConvTranspose

CASES = [
    # kernel, strides, padding, input H x W: the VAE decoder's layer, an even
    # kernel, PixelCNN++'s two shifted kernels, stride 1, unequal strides
    # and a kernel smaller than the stride.
    ((3, 3), (2, 2), "SAME", (7, 7)),
    ((4, 4), (2, 2), "SAME", (5, 6)),
    ((2, 3), (2, 2), "VALID", (4, 4)),
    ((2, 2), (2, 2), "VALID", (3, 5)),
    ((3, 3), (1, 1), "SAME", (4, 4)),
    ((5, 3), (3, 2), "SAME", (4, 3)),
    ((1, 1), (2, 2), "SAME", (3, 3)),
]


@pytest.mark.parametrize("kernel,strides,padding,size", CASES)
def test_sub_pixel_form_equals_conv_transpose(kernel, strides, padding, size):
  """Same parameters (names, shapes, initial values), same outputs and same
  gradients as nn.ConvTranspose, to float32 rounding."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  reference = nn.ConvTranspose(4, kernel, strides=strides, padding=padding)
  sub_pixel = SubPixelConvTranspose(4, kernel, strides=strides,
                                    padding=padding)
  init = reference.init(jax.random.key(1), x)
  init_sub = sub_pixel.init(jax.random.key(1), x)
  assert jax.tree.structure(init) == jax.tree.structure(init_sub)
  jax.tree.map(np.testing.assert_array_equal, init, init_sub)
  # Non-zero bias and a generic kernel.
  variables = jax.tree.map(
      lambda a: a + jax.random.normal(jax.random.key(2), a.shape), init)

  @jax.jit
  def outputs_and_grads(variables, x):
    def run(module):
      def loss(v, x):
        y = module.apply(v, x)
        return jnp.sum(jnp.sin(y)), y
      (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1),
                                         has_aux=True)(variables, x)
      return y, grads
    return run(reference), run(sub_pixel)

  (y, grads), (y_sub, grads_sub) = outputs_and_grads(variables, x)
  assert y.shape == y_sub.shape
  np.testing.assert_allclose(y_sub, y, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-4,
                                                       rtol=1e-5),
               grads, grads_sub)


def test_vae_decoder_keeps_its_parameter_names():
  """Checkpoints from before the rewrite restore: the decoder's parameters
  are still ConvTranspose_0/1 with the transposed kernels' shapes."""
  decoder = vae.ConvDecoder(image_shape=(28, 28, 1), out_channels=1)
  params = jax.eval_shape(decoder.init, jax.random.key(0),
                          jnp.zeros((1, 8)))["params"]
  assert params["ConvTranspose_0"]["kernel"].shape == (3, 3, 64, 64)
  assert params["ConvTranspose_1"]["kernel"].shape == (3, 3, 64, 32)
  assert params["ConvTranspose_1"]["bias"].shape == (32,)


def test_bad_padding_is_named():
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'"):
    SubPixelConvTranspose(2, (3, 3), padding="CIRCULAR").init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
