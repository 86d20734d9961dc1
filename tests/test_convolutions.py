"""Convolutions written for speed compute the same functions as flax's:
sub-pixel transposed convolutions equal nn.ConvTranspose, and Conv (matrix
products for 1x1 kernels and, on CPU, for the kernel gradient) equals nn.Conv
in values, gradients and forward-mode derivatives."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import convolutions, vae
from gm_jax.convolutions import Conv, SubPixelConvTranspose

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


def same_init_then_perturbed(reference, module, x):
  """Checks that both modules initialise the same parameters (names, shapes,
  values); returns them with a random offset (non-zero bias, generic
  kernel)."""
  init = reference.init(jax.random.key(1), x)
  init_other = module.init(jax.random.key(1), x)
  assert jax.tree.structure(init) == jax.tree.structure(init_other)
  jax.tree.map(np.testing.assert_array_equal, init, init_other)
  return jax.tree.map(
      lambda a: a + jax.random.normal(jax.random.key(2), a.shape), init)


@pytest.mark.parametrize("by_phase,kernel_grad", [
    (False, "auto"), (False, "matmul"), (False, "conv"), (True, "auto"),
    (True, "matmul"), (None, "auto")])
@pytest.mark.parametrize("kernel,strides,padding,size", CASES)
def test_sub_pixel_form_equals_conv_transpose(kernel, strides, padding, size,
                                              by_phase, kernel_grad):
  """Same parameters (names, shapes, initial values), same outputs and same
  gradients as nn.ConvTranspose, to float32 rounding, as one convolution
  or one per phase, whichever way the kernel gradients are computed."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  reference = nn.ConvTranspose(4, kernel, strides=strides, padding=padding)
  sub_pixel = SubPixelConvTranspose(4, kernel, strides=strides,
                                    padding=padding, kernel_grad=kernel_grad,
                                    by_phase=by_phase)
  variables = same_init_then_perturbed(reference, sub_pixel, x)

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


def test_sub_pixel_windows_never_need_cropping():
  """Both forms pad the input to each window and never crop it: for every
  kernel up to 7, stride up to 4 and input size up to 6, "SAME" and
  "VALID", the union's and every phase's padding is non-negative, and the
  phases' taps cover each kernel tap exactly once."""
  from gm_jax.convolutions import _phase_taps, _phase_windows
  for padding in ("SAME", "VALID"):
    for k in range(1, 8):
      for s in range(1, 5):
        for n in range(1, 7):
          index, lo, windows, _ = _phase_taps(k, s, n, padding)
          width = index.shape[1]
          assert -lo >= 0 and windows - 1 + lo + width - 1 - (n - 1) >= 0
          taps = []
          for a, (first, count) in enumerate(_phase_windows(index, k)):
            assert (index[a, :first] == k).all()
            assert (index[a, first + count:] == k).all()
            taps += list(index[a, first:first + count])
            if count:
              assert -(lo + first) >= 0
              assert windows - 1 + lo + first + count - 1 - (n - 1) >= 0
          assert sorted(taps) == list(range(k))


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
  with pytest.raises(ValueError, match="kernel_grad"):
    SubPixelConvTranspose(2, (3, 3), kernel_grad="fast").init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU forms")
@pytest.mark.parametrize("features,cin,convolutions", [(1, 32, 3), (32, 64, 12)])
def test_sub_pixel_forms_on_cpu(features, cin, convolutions):
  """The VAE decoder's 4x4 stride-2 layers on CPU: the 32 -> 1 head is one
  stride-1 convolution (3 with its two gradients), the 64 -> 32 layer one
  per phase (4 x 3: each phase uses 2 x 2 of the union's 3 x 3 taps), and
  neither builds im2col patches (which cost 10x more for the head)."""
  layer = SubPixelConvTranspose(features, (4, 4), strides=(2, 2))
  x = jnp.ones((2, 7, 7, cin))
  params = layer.init(jax.random.key(0), x)

  def loss(p, x):
    return jnp.sum(jnp.sin(layer.apply(p, x)))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  assert text.count("stablehlo.convolution") == convolutions
  # No [B, H, W, taps x C] patches (the phases' outputs are interleaved by
  # concatenating 5-D and 6-D arrays).
  assert not re.findall(
      r"stablehlo.concatenate .*-> tensor<\d+x\d+x\d+x\d+xf32>$", text,
      re.M)
  assert "stablehlo.dot_general" not in text


CONV_CASES = [
    # kernel, strides, padding, mask?: a 3x3 SAME layer, PixelCNN's cropped
    # masked kernel with explicit padding, a strided VALID layer, a strided
    # SAME layer with uneven padding, a 1x1 layer (matrix product) and a
    # strided 1x1 layer given as an int stride (stays a convolution).
    ((3, 3), (1, 1), "SAME", False),
    ((2, 3), (1, 1), ((1, 0), (1, 1)), True),
    ((3, 3), (2, 2), "VALID", False),
    ((4, 3), (2, 1), "SAME", False),
    ((1, 1), (1, 1), "SAME", False),
    ((1, 1), 2, "VALID", False),
]


@pytest.mark.parametrize("kernel_grad", ["matmul", "conv", "auto", "xla"])
@pytest.mark.parametrize("kernel,strides,padding,masked", CONV_CASES)
def test_conv_equals_flax_conv(kernel, strides, padding, masked, kernel_grad):
  """Same parameters and initial values as nn.Conv; outputs, reverse-mode
  gradients (input, kernel, bias) and forward-mode derivatives equal to
  float32 rounding, whichever kernel-gradient formulation is used."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  mask = None
  if masked:
    mask = jnp.asarray(np.random.RandomState(0).rand(*kernel, 3, 5) > 0.5,
                       jnp.float32)
  reference = nn.Conv(5, kernel, strides=strides, padding=padding, mask=mask)
  fast = Conv(5, kernel, strides=strides, padding=padding, mask=mask,
              kernel_grad=kernel_grad)
  variables = same_init_then_perturbed(reference, fast, x)
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      a, b, rtol=1e-5, atol=1e-5)
  close(fast.apply(variables, x), reference.apply(variables, x))

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  grads = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  grads_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(variables, x)
  jax.tree.map(close, grads_fast, grads)

  # Forward mode: a directional derivative in parameters and input at once.
  tangents = jax.tree.map(jnp.cos, (variables, x))
  _, jvp = jax.jvp(loss(reference), (variables, x), tangents)
  _, jvp_fast = jax.jvp(loss(fast), (variables, x), tangents)
  close(jvp_fast, jvp)


def test_the_rule_chooses_the_matmul_kernel_gradient_past_the_cliff(
    monkeypatch):
  """With $GM_JAX_CPU_KERNEL_GRAD=rule, on CPU, a layer past the kernel
  gradient's cliff (many channels, many positions) takes its kernel
  gradient as a matrix product in the compiled step (a dot with the patch
  dimension); a smaller one keeps the (grouped) convolution. Only
  lowered, never run."""
  if jax.default_backend() != "cpu":
    pytest.skip("the rule only applies on the CPU backend")
  monkeypatch.setenv(convolutions.CPU_KERNEL_GRAD_ENV, "rule")

  def hlo(shape, features):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    module = Conv(features, (3, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2))
    return jax.jit(grad).lower(variables, x).as_text()
  # 3 x 3 taps x 64 input channels = 576-wide patches in a matrix product;
  # otherwise the forward and both gradients are convolutions.
  for shape, features, matmul in [
      ((32, 32, 32, 64), 64, True),  # 32,768 positions x 9 x 64 x 64
      ((16, 32, 32, 64), 64, False),  # 16,384 positions x 64 channels
      ((16, 32, 32, 128), 128, True),
      ((128, 8, 8, 128), 128, False),  # 8,192 positions
      ((64, 28, 28, 32), 32, False),  # 32 channels
      ((64, 28, 28, 64), 2, False)]:  # 2 output channels
    text = hlo(shape, features)
    assert ("x576x" in text or f"x{9 * shape[-1]}x" in text) == matmul, shape
    assert ("dot_general" in text) == matmul, shape
    # The forward convolution and the kernel gradient's, in groups.
    groups = -(-shape[0] // convolutions.kernel_grad_group(
        shape[1] * shape[2], shape[3], features))
    assert text.count("stablehlo.convolution") == (
        1 if matmul else 1 + groups), shape
  assert convolutions.cpu_matmul_kernel_grad(25_088, (3, 3), 64, 64)
  assert convolutions.cpu_matmul_kernel_grad(50_176, (1, 2), 64, 128)
  assert not convolutions.cpu_matmul_kernel_grad(6_272, (4, 4), 32, 64)


@pytest.mark.parametrize("choice,matmuls", [
    ("", (False, False)), ("rule", (True, False)), ("conv", (False, False)),
    ("matmul", (True, True))])
def test_kernel_gradient_choice_follows_the_environment(monkeypatch, choice,
                                                        matmuls):
  """$GM_JAX_CPU_KERNEL_GRAD chooses for "auto" layers (grouped
  convolutions by default), read at trace time; a layer's own kernel_grad
  still wins; a misspelt value is named."""
  if jax.default_backend() != "cpu":
    pytest.skip("the choice only applies on the CPU backend")
  monkeypatch.setenv(convolutions.CPU_KERNEL_GRAD_ENV, choice)

  def has_matmul(shape, features, kernel_grad="auto"):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    module = Conv(features, (3, 3), kernel_grad=kernel_grad)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2))
    return "dot_general" in jax.jit(grad).lower(variables, x).as_text()
  # Past the cliff, then below it.
  assert has_matmul((32, 32, 32, 64), 64) == matmuls[0]
  assert has_matmul((128, 8, 8, 128), 128) == matmuls[1]
  assert not has_matmul((32, 32, 32, 64), 64, kernel_grad="conv")
  assert has_matmul((128, 8, 8, 128), 128, kernel_grad="matmul")
  monkeypatch.setenv(convolutions.CPU_KERNEL_GRAD_ENV, "im2col")
  with pytest.raises(ValueError, match="GM_JAX_CPU_KERNEL_GRAD='im2col'"):
    has_matmul((32, 32, 32, 64), 64)


def _entry(compiled_text: str) -> str:
  """The entry computation of a compiled HLO module's text."""
  return compiled_text.split("\nENTRY ", 1)[1].split("\n}", 1)[0]


def test_convolution_library_is_a_compile_option(monkeypatch):
  """cpu_compiler_options("eigen") takes the convolutions out of YNNPACK's
  fusions and leaves it the matrix products; "xla" leaves YNNPACK nothing;
  "ynnpack" is XLA's default; the values agree; $XLA_FLAGS naming the
  library fusions wins; a misspelt choice is named."""
  if jax.default_backend() != "cpu":
    pytest.skip("the option only applies on the CPU backend")
  # (YNNPACK leaves a much smaller convolution to XLA anyway.)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
  m = jax.random.normal(jax.random.key(2), (64, 64))

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return y, m @ m

  eigen = convolutions.cpu_compiler_options("eigen")
  assert eigen is not None, "this jaxlib no longer takes the option"
  no_ynnpack = convolutions.cpu_compiler_options("xla")
  assert no_ynnpack is not None and no_ynnpack != eigen
  assert convolutions.cpu_compiler_options("ynnpack") is None
  results = {}
  for name, options in (("eigen", eigen), ("ynnpack", None),
                        ("xla", no_ynnpack)):
    jitted = jax.jit(f, compiler_options=options)
    entry = _entry(jitted.lower(x, w, m).compile().as_text())
    assert (" convolution(" in entry) == (name != "ynnpack"), name
    # The matrix product stays in YNNPACK unless it is switched off.
    assert ("ynn_fusion" in entry) == (name != "xla"), name
    results[name] = jitted(x, w, m)
  for name in ("ynnpack", "xla"):
    for a, b in zip(results["eigen"], results[name], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert convolutions.cpu_compiler_options("eigen") is None
  assert convolutions.cpu_compiler_options("xla") is None
  with pytest.raises(ValueError, match="cpu_convolutions='mkl'"):
    convolutions.cpu_compiler_options("mkl")


def test_kernel_gradient_runs_in_groups_of_images(monkeypatch):
  """The kernel gradient as a convolution is the sum of per-group kernel
  gradients: with groups of 2 images of a batch of 5 (3 groups), the
  compiled gradient has 3 kernel-gradient convolutions, or a loop over the
  2 whole groups and one for the last image, and equals JAX's own
  derivative; group sizes follow positions and channels."""
  if jax.default_backend() != "cpu":
    pytest.skip("cpu_conv is the CPU backend's")
  assert convolutions.kernel_grad_group(32 * 32, 128, 128) == 7
  assert convolutions.kernel_grad_group(28 * 28, 64, 64) == 19
  assert convolutions.kernel_grad_group(28 * 28, 32, 64) == 20
  assert convolutions.kernel_grad_group(64 * 64, 512, 512) == 1
  monkeypatch.setattr(convolutions, "CPU_KERNEL_GRAD_GROUP_POSITIONS", 200)
  x = jax.random.normal(jax.random.key(0), (5, 10, 10, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  r = jax.random.normal(jax.random.key(2), (5, 10, 10, 4))

  def loss(kernel, x, mode):
    if mode == "xla":
      y = convolutions._lax_conv(x, kernel, (1, 1), ((1, 1), (1, 1)), None)
    else:
      y = convolutions.cpu_conv(x, kernel, (1, 1), ((1, 1), (1, 1)), None,
                                "conv")
    return jnp.sum(jnp.sin(y * r))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  text = grad.lower(kernel, x, "conv").as_text()
  # The forward, the input gradient and 3 kernel-gradient groups.
  assert text.count("stablehlo.convolution") == 5
  assert "stablehlo.while" not in text
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               grad(kernel, x, "conv"), grad(kernel, x, "xla"))
  # Past CPU_KERNEL_GRAD_UNROLL whole groups, a loop over them (one
  # convolution in its body) and the rest: the same gradient.
  monkeypatch.setattr(convolutions, "CPU_KERNEL_GRAD_UNROLL", 1)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  text = grad.lower(kernel, x, "conv").as_text()
  assert "stablehlo.while" in text
  assert text.count("stablehlo.convolution") == 4
  # Canonical inside the loop too (XLA:CPU's fast path; see cpu_conv).
  compiled = grad.lower(kernel, x, "conv").compile().as_text()
  assert set(re.findall(r"dim_labels=(\S+?),", compiled)) == {
      "b01f_01io->b01f"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               grad(kernel, x, "conv"), grad(kernel, x, "xla"))


@pytest.mark.parametrize("kernel_grad", ["conv", "matmul"])
def test_conv_gradients_inside_a_loop_compile_to_canonical_convolutions(
    kernel_grad):
  """XLA:CPU rewrites convolutions into its fast NHWC / HWIO form only in
  the entry computation. The gradient of layers applied inside a
  ``lax.scan`` (scanned layers, gradient accumulation) must therefore
  already be canonical: every convolution of the compiled gradient has
  dim_labels b01f_01io->b01f. JAX's own derivative (``kernel_grad="xla"``)
  leaves permuted ones in the loop body, which shows the check can fail.
  The gradients of both are equal."""
  if jax.default_backend() != "cpu":
    pytest.skip("the canonical form concerns the CPU backend")
  # 3 x 64 channels at 16 x 16, batch 4: the cases of the flows' conditioners
  # (few output channels, zero-padded 3x3) and a strided layer.
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))

  class Body(nn.Module):
    kernel_grad: str

    @nn.compact
    def __call__(self, h, _):
      y = Conv(8, (3, 3), kernel_grad=self.kernel_grad)(h)
      y = Conv(3, (3, 3), kernel_grad=self.kernel_grad)(jnp.tanh(y))
      z = Conv(4, (3, 3), strides=2, padding="VALID",
               kernel_grad=self.kernel_grad)(y)
      return h + y, jnp.sum(z ** 2)

  def loss_and_text(mode):
    model = nn.scan(Body, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)(mode)
    variables = model.init(jax.random.key(1), x, None)

    def loss(v, x):
      h, z = model.apply(v, x, None)
      return jnp.sum(jnp.sin(h)) + jnp.sum(z)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(variables, x).compile().as_text()
    return grad(variables, x), text

  def labels(text):
    return set(re.findall(r"dim_labels=(\S+?),", text))
  grads, text = loss_and_text(kernel_grad)
  assert labels(text) == {"b01f_01io->b01f"}, labels(text)
  grads_xla, text_xla = loss_and_text("xla")
  assert labels(text_xla) - {"b01f_01io->b01f"}, labels(text_xla)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               grads, grads_xla)


DOT_CASES = {
    # name: (lhs shape, rhs shape, dimension numbers); the first three are
    # merged into one 2-D product, the others go to lax.dot_general as is.
    "dense on images": ((2, 5, 4, 6), (6, 7), (((3,), (0,)), ((), ()))),
    "into heads": ((2, 9, 6), (6, 3, 2), (((2,), (0,)), ((), ()))),
    "out of heads": ((2, 9, 3, 2), (3, 2, 6), (((2, 3), (0, 1)), ((), ()))),
    "a matrix": ((5, 6), (6, 7), (((1,), (0,)), ((), ()))),
    "batched": ((2, 9, 6), (2, 6, 4), (((2,), (1,)), ((0,), (0,)))),
    "leading contraction": ((6, 2, 5), (6, 7), (((0,), (0,)), ((), ()))),
}


@pytest.mark.parametrize("case", sorted(DOT_CASES))
def test_dot_general_is_lax_dot_general(case):
  """convolutions.dot_general (flax's Dense and DenseGeneral take it) equals
  lax.dot_general in values, reverse-mode gradients of both operands and
  forward-mode derivatives, whether it merges the leading axes or not."""
  lhs_shape, rhs_shape, numbers = DOT_CASES[case]
  lhs = jax.random.normal(jax.random.key(0), lhs_shape)
  rhs = jax.random.normal(jax.random.key(1), rhs_shape)
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      a, b, rtol=1e-5, atol=1e-5)
  ours = lambda a, b: convolutions.dot_general(a, b, numbers)  # noqa: E731
  ref = lambda a, b: jax.lax.dot_general(a, b, numbers)  # noqa: E731
  assert ours(lhs, rhs).shape == ref(lhs, rhs).shape
  close(ours(lhs, rhs), ref(lhs, rhs))
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
  jax.tree.map(close, jax.grad(loss(ours), (0, 1))(lhs, rhs),
               jax.grad(loss(ref), (0, 1))(lhs, rhs))
  tangents = (jnp.cos(lhs), jnp.sin(rhs))
  close(jax.jvp(loss(ours), (lhs, rhs), tangents)[1],
        jax.jvp(loss(ref), (lhs, rhs), tangents)[1])


def test_dense_layers_on_images_keep_flax_parameters_and_values():
  """Dense and DenseGeneral with dot_general=convolutions.dot_general: the
  same parameters and outputs as without it (the option changes how the
  product is computed, not the layer)."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6))
  for make in (lambda **kw: nn.Dense(7, **kw),
               lambda **kw: nn.DenseGeneral((3, 2), **kw),
               lambda **kw: nn.DenseGeneral(5, axis=(-2, -1), **kw)):
    reference, ours = make(), make(dot_general=convolutions.dot_general)
    variables = same_init_then_perturbed(reference, ours, x)
    np.testing.assert_allclose(ours.apply(variables, x),
                               reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_kernel_gradient_of_a_dense_layer_on_images_needs_no_transpose():
  """The kernel gradient of a dense layer (or 1x1 convolution) on
  [B, H, W, C] is one product of the flattened input and output gradient:
  the compiled gradient holds no transpose and no copy. lax.dot_general's
  own 4-D product, which XLA:CPU computed with a transposed copy of the
  output gradient (2-3x slower, benchmarks/README.md, tenth pass), has
  both, which shows that the check can fail."""
  if jax.default_backend() != "cpu":
    pytest.skip("the layout concerns the CPU backend")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (16, 32))

  def moves(dot):
    loss = lambda w, x: jnp.sum(jnp.sin(  # noqa: E731
        dot(x, w, (((3,), (0,)), ((), ())))))
    text = jax.jit(jax.grad(loss, (0, 1))).lower(w, x).compile().as_text()
    return len(re.findall(r" (?:transpose|copy)\(", text))
  assert moves(convolutions.dot_general) == 0
  assert moves(jax.lax.dot_general) > 0
  conv_1x1 = Conv(32, (1, 1))
  variables = conv_1x1.init(jax.random.key(2), x)
  text = jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(
      conv_1x1.apply(v, x))), (0, 1))).lower(variables, x).compile().as_text()
  assert not re.findall(r" (?:transpose|copy)\(", text)


def test_conv_rejects_a_bad_option_or_shape():
  x = jnp.ones((2, 6, 6, 4))
  with pytest.raises(ValueError, match="kernel_grad"):
    Conv(4, (3, 3), kernel_grad="fast").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="NHWC"):
    Conv(4, (3, 3)).init(jax.random.key(0), x[0])


@pytest.mark.parametrize("kind", ["conv", "transpose", "dense"])
def test_weight_norm_is_the_layer_with_normalised_kernel_and_data_init(kind):
  """WeightNormed(layer) = layer with kernel g v / ||v|| (per output
  channel) plus b; its init sets g, b so that every channel has mean 0 and
  standard deviation init_scale on the init batch."""
  from gm_jax.convolutions import WeightNormed
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 3)) * 2.0 + 0.7
  layer = {
      "conv": lambda: Conv(4, (2, 3), padding="VALID", use_bias=False),
      "transpose": lambda: SubPixelConvTranspose(4, (2, 3), (2, 2), "VALID",
                                                 use_bias=False),
      "dense": lambda: nn.Dense(4, use_bias=False),
  }[kind]
  net = WeightNormed(layer(), init_scale=0.3)
  params = jax.jit(net.init)(jax.random.PRNGKey(1), x)["params"]
  y = net.apply({"params": params}, x)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 0.3, rtol=1e-4)
  # The same function as the plain layer with the normalised kernel.
  v = params["layer"]["kernel"]
  norm = jnp.sqrt(jnp.sum(v**2, axis=tuple(range(v.ndim - 1))))
  kernel = params["scale"] * v / norm
  plain = layer().apply({"params": {"kernel": kernel}}, x) + params["bias"]
  np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-5)
  # A different batch after init: the parameters, not its statistics, rule.
  other = net.apply({"params": params}, x * 3.0)
  assert float(jnp.abs(other.std(axis=(0, 1, 2)) - 0.3).max()) > 0.1
  # Scale invariance in v: rescaling the kernel changes nothing.
  scaled = {**params, "layer": {"kernel": 5.0 * v}}
  np.testing.assert_allclose(net.apply({"params": scaled}, x), y, rtol=1e-5,
                             atol=1e-6)
