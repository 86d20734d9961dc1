"""Bijector property tests: exact inverses, forward log-det = -inverse log-det,
and log-dets equal to the brute-force slogdet of the jacfwd Jacobian."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gm_jax import flows
from gm_jax.flows import bijectors as bj
from gm_jax.flows import priors, splines

FORWARD = "forward_and_log_det"
INVERSE = "inverse_and_log_det"


def _key(seed):
  # RngBitGenerator keys: threefry under jax_threefry_partitionable (set in
  # conftest) takes seconds to compile per random draw on CPU.
  return jax.random.key(seed, impl="rbg")


def _perturb(params, key, scale=0.1):
  """Moves every parameter off its (often identity) initial value."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=False)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _init(module, x, key=0, perturb=True):
  """Jitted init (one compile instead of many eager ops), then perturbed."""

  @jax.jit
  def init(x):
    variables = module.init({"params": _key(key),
                             "dequantize": _key(key + 1)},
                            x, method=FORWARD)
    params = variables.get("params", {})
    if perturb:
      params = _perturb(params, _key(key + 2))
    return {"params": params}

  return init(x)


def check_bijector(module, x, variables=None, exact_inverse=True, atol=2e-4,
                   integer_inputs=None):
  """Asserts the three bijector properties on the batch x [B, ...].

  Computes the Jacobian of the whole batch at once (one jitted function);
  its diagonal blocks are the per-example Jacobians, its off-diagonal blocks
  must vanish (examples are independent). ``integer_inputs`` (x's shape),
  for a flow that dequantizes, must come back exactly from the inverse.
  """
  if variables is None:
    variables = _init(module, x)
  rngs = {"dequantize": _key(7)}

  @jax.jit
  def run(variables, x):
    def forward(v):
      return module.apply(variables, v, rngs=rngs, method=FORWARD)
    y, log_det = forward(x)
    x_back, inverse_log_det = module.apply(variables, y, method=INVERSE)
    jac = jax.jacfwd(lambda v: forward(v)[0])(x)
    return y, log_det, x_back, inverse_log_det, jac

  if integer_inputs is not None:
    # Same shapes: reuses the compiled function.
    integer_back = run(variables, integer_inputs)[2]
    np.testing.assert_array_equal(integer_back, integer_inputs)
  y, log_det, x_back, inverse_log_det, jac = run(variables, x)
  batch = x.shape[0]
  assert log_det.shape == (batch,)
  assert x_back.shape == x.shape
  if exact_inverse:
    np.testing.assert_allclose(x_back, x, atol=atol, rtol=1e-4)
  np.testing.assert_allclose(inverse_log_det, -log_det, atol=atol,
                             rtol=1e-4)
  jac = np.asarray(jac, np.float64).reshape(batch, y[0].size, batch,
                                            x[0].size)
  for b in range(batch):
    sign, expected = np.linalg.slogdet(jac[b, :, b, :])
    assert sign != 0
    np.testing.assert_allclose(log_det[b], expected, rtol=1e-4, atol=1e-3)
    off_diagonal = np.delete(jac[b], b, axis=1)
    np.testing.assert_array_equal(off_diagonal, 0.0)
  return y, log_det


def _x(shape=(3, 4, 4, 2), key=0):
  return jax.random.normal(_key(key), shape) * 1.5 + 0.3


def test_actnorm_properties():
  check_bijector(bj.ActNorm(), _x())


@pytest.mark.parametrize("parameterization", ["lu", "plain"])
def test_invertible_1x1_conv_properties(parameterization):
  x = _x((2, 2, 2, 4))
  check_bijector(bj.Invertible1x1Conv(parameterization, seed=3), x)


def test_lu_conv_initialises_to_rotation():
  x = _x((2, 2, 2, 4))
  module = bj.Invertible1x1Conv("lu", seed=1)
  variables = _init(module, x, perturb=False)
  w, _, log_det = module.apply(variables, 4, method=module._matrices)
  np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-5)
  np.testing.assert_allclose(log_det, 0.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["reverse", "shuffle"])
def test_channel_permutation_properties(kind):
  y, log_det = check_bijector(bj.ChannelPermutation(kind, seed=2),
                              _x((2, 2, 2, 5)))
  np.testing.assert_array_equal(log_det, 0.0)


def test_squeeze_properties():
  x = _x((2, 4, 4, 2))
  y, _ = check_bijector(bj.Squeeze(), x)
  assert y.shape == (2, 2, 2, 8)
  # The top-left 2x2 patch of channel 0 lands in pixel (0, 0).
  np.testing.assert_array_equal(y[0, 0, 0, ::2][:4],
                                [x[0, 0, 0, 0], x[0, 0, 1, 0],
                                 x[0, 1, 0, 0], x[0, 1, 1, 0]])


COUPLINGS = [
    dict(kind="affine", mask="channel", parity=0, scale_fn="sigmoid"),
    dict(kind="affine", mask="checkerboard", parity=1, scale_fn="tanh",
         num_res_blocks=1),
    dict(kind="additive", mask="channel", parity=1),
    dict(kind="additive", mask="checkerboard", parity=0),
    dict(kind="spline", mask="channel", parity=1, spline_bins=4,
         spline_bound=2.0),
]


@pytest.mark.parametrize("kwargs", COUPLINGS)
def test_coupling_properties(kwargs):
  x = _x((2, 4, 4, 3))
  check_bijector(bj.Coupling(width=8, **kwargs), x)


@pytest.mark.parametrize("kwargs", [COUPLINGS[0], COUPLINGS[1], COUPLINGS[4]])
def test_zero_initialised_coupling_is_identity(kwargs):
  x = _x((2, 4, 4, 3))
  module = bj.Coupling(width=8, **kwargs)
  variables = _init(module, x, perturb=False)
  y, log_det = module.apply(variables, x, method=FORWARD)
  # Exact for affine / additive; the spline's knots carry rounding.
  np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
  np.testing.assert_allclose(log_det, 0.0, rtol=0, atol=1e-5)


def test_zero_conv_and_dense_start_at_zero_and_scale_by_exp_3_logs():
  x = _x((2, 4, 4, 3))
  conv = bj.ZeroConv(5)
  variables = conv.init(_key(0), x)
  np.testing.assert_array_equal(conv.apply(variables, x), 0.0)
  params = _perturb(variables["params"], _key(1), scale=0.3)
  kernel, bias = params["conv"]["kernel"], params["conv"]["bias"]
  reference = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  np.testing.assert_allclose(
      conv.apply({"params": params}, x),
      reference * np.exp(3.0 * np.asarray(params["logs"])), rtol=1e-5,
      atol=1e-5)
  v = jax.random.normal(_key(2), (4, 6))
  dense = bj.ZeroDense(3)
  variables = dense.init(_key(0), v)
  np.testing.assert_array_equal(dense.apply(variables, v), 0.0)
  params = _perturb(variables["params"], _key(3), scale=0.3)
  want = ((v @ params["dense"]["kernel"] + params["dense"]["bias"]) *
          np.exp(3.0 * np.asarray(params["logs"])))
  np.testing.assert_allclose(dense.apply({"params": params}, v), want,
                             rtol=1e-5, atol=1e-5)


def test_glow_conditioner_normalises_hidden_convs_and_starts_at_zero():
  x = _x((4, 4, 4, 3))
  net = bj.ConvNet(6, width=8, conditioner="glow")
  variables = jax.jit(net.init)(_key(0), x)
  params = variables["params"]
  # Hidden convs without bias, each followed by an actnorm; a ZeroConv out.
  assert set(params) == {"Conv_0", "ActNorm_0", "Conv_1", "ActNorm_1",
                         "ZeroConv_0"}
  assert set(params["Conv_0"]) == {"kernel"}
  assert set(params["ZeroConv_0"]) == {"conv", "logs"}
  np.testing.assert_array_equal(net.apply(variables, x), 0.0)
  # The actnorms are data-initialised: the first hidden layer's
  # pre-activations have zero mean and unit variance per channel.
  hidden = bj.ActNorm().apply(
      {"params": params["ActNorm_0"]},
      bj.Conv(8, (3, 3), use_bias=False).apply(
          {"params": params["Conv_0"]}, x))[0]
  np.testing.assert_allclose(jnp.mean(hidden, axis=(0, 1, 2)), 0.0,
                             atol=1e-5)
  np.testing.assert_allclose(jnp.var(hidden, axis=(0, 1, 2)), 1.0,
                             rtol=1e-3)


@pytest.mark.parametrize("kwargs", [COUPLINGS[0], COUPLINGS[1]])
def test_coupling_with_glow_conditioner(kwargs):
  x = _x((2, 4, 4, 3))
  module = bj.Coupling(width=8, conditioner="glow", **kwargs)
  y, log_det = module.apply(_init(module, x, perturb=False), x,
                            method=FORWARD)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(log_det, 0.0)
  check_bijector(module, x)


def test_rational_quadratic_spline():
  num_bins, bound = 5, 2.0
  x = jnp.linspace(-3.0, 3.0, 241)  # both tails and every bin
  raw = jax.random.normal(_key(0), (3 * num_bins - 1,)) * 1.5
  raw = jnp.broadcast_to(raw, x.shape + raw.shape)

  @functools.partial(jax.jit, static_argnames="inverse")
  def spline(v, inverse=False):
    return splines.rational_quadratic_spline(v, raw, bound, inverse)

  y, log_det = spline(x)
  assert np.all(np.diff(np.asarray(y)) > 0)  # monotonic
  np.testing.assert_array_equal(y[jnp.abs(x) > bound],
                                x[jnp.abs(x) > bound])
  np.testing.assert_allclose(y[jnp.abs(x) == bound], x[jnp.abs(x) == bound],
                             atol=1e-5)
  x_back, inverse_log_det = spline(y, inverse=True)
  np.testing.assert_allclose(x_back, x, atol=1e-5)
  np.testing.assert_allclose(inverse_log_det, -log_det, atol=1e-4)
  # The Jacobian is diagonal: its log-det is the sum of log dy/dx.
  derivative = jax.jit(jax.vmap(jax.grad(
      lambda v, r: splines.rational_quadratic_spline(v, r, bound)[0])))(x, raw)
  np.testing.assert_allclose(log_det, jnp.log(derivative), atol=1e-4)
  # Zero parameters give the identity.
  y0, log_det0 = splines.rational_quadratic_spline(
      x, jnp.zeros_like(raw), bound)
  np.testing.assert_allclose(y0, x, atol=1e-5)
  np.testing.assert_allclose(log_det0, 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="3K - 1"):
    splines.rational_quadratic_spline(x, raw[..., :-1], bound)


def test_coupling_keeps_the_masked_half():
  x = _x((2, 4, 4, 3))
  module = bj.Coupling(kind="affine", mask="checkerboard", parity=0,
                       width=8)
  y, _ = module.apply(_init(module, x), x, method=FORWARD)
  keep = bj.checkerboard_mask(4, 4, 0)[None] > 0
  keep = np.broadcast_to(keep, x.shape)
  np.testing.assert_array_equal(np.asarray(y)[keep], np.asarray(x)[keep])
  assert not np.allclose(np.asarray(y)[~keep], np.asarray(x)[~keep])


def test_channel_coupling_needs_two_channels():
  module = bj.Coupling(mask="channel", width=4)
  with pytest.raises(ValueError, match="at least 2 channels"):
    module.init(_key(0), _x((1, 2, 2, 1)), method=FORWARD)


def test_gaussian_split_properties_and_identity_init():
  x = _x((2, 2, 2, 6))
  module = priors.GaussianSplit()
  y0, ld0 = module.apply(_init(module, x, perturb=False), x, method=FORWARD)
  np.testing.assert_array_equal(y0, x)
  np.testing.assert_array_equal(ld0, 0.0)
  check_bijector(module, x)
  glow = priors.GaussianSplit(conditioner="glow")
  variables = _init(glow, x, perturb=False)
  assert set(variables["params"]["prior"]) == {"conv", "logs"}
  y0, ld0 = glow.apply(variables, x, method=FORWARD)
  np.testing.assert_array_equal(y0, x)
  np.testing.assert_array_equal(ld0, 0.0)
  check_bijector(glow, x)


def test_learned_top_prior_properties_and_standard_normal_init():
  x = _x((2, 2, 2, 4))
  module = priors.GaussianTopPrior(learned=True)
  variables = _init(module, x, perturb=False)
  y0, ld0 = module.apply(variables, x, method=FORWARD)
  np.testing.assert_array_equal(y0, x)
  np.testing.assert_array_equal(ld0, 0.0)
  check_bijector(module, x)
  # The zero padding of the conv of a constant makes the (perturbed) prior
  # depend on the position: not only a per-channel constant.
  params = _init(module, x)["params"]
  stats = bj.ZeroConv(8).apply({"params": params["prior"]},
                               jnp.ones((1, 2, 2, 1)))
  assert float(jnp.std(stats[0, :, :, 0])) > 0.0


def test_class_conditional_top_prior_properties():
  x = _x((3, 2, 2, 4))
  labels = jnp.array([0, 2, 1], jnp.int32)
  module = priors.GaussianTopPrior(learned=False, num_classes=3)
  variables = jax.jit(lambda x, y: module.init(_key(0), x, y))(x, labels)
  assert set(variables["params"]) == {"class_prior"}
  y0, ld0 = module.apply(variables, x, labels)
  np.testing.assert_array_equal(y0, x)
  np.testing.assert_array_equal(ld0, 0.0)
  params = _perturb(variables["params"], _key(1), scale=0.3)

  @jax.jit
  def run(params, x, labels):
    def forward(v):
      return module.apply({"params": params}, v, labels)

    y, log_det = forward(x)
    x_back, inverse_log_det = module.apply(
        {"params": params}, y, labels, method=INVERSE)
    jac = jax.jacfwd(lambda v: forward(v)[0])(x)
    return y, log_det, x_back, inverse_log_det, jac

  y, log_det, x_back, inverse_log_det, jac = run(params, x, labels)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(inverse_log_det, -log_det, rtol=1e-5)
  jac = np.asarray(jac, np.float64).reshape(3, 16, 3, 16)
  for b in range(3):
    _, expected = np.linalg.slogdet(jac[b, :, b, :])
    np.testing.assert_allclose(log_det[b], expected, rtol=1e-4, atol=1e-4)
  # Examples with the same input but other labels get other priors.
  same_x = jnp.broadcast_to(x[:1], x.shape)
  y_labels, _, _, _, _ = run(params, same_x, labels)
  assert not np.allclose(y_labels[0], y_labels[1])
  with pytest.raises(ValueError, match="needs the labels"):
    module.apply({"params": params}, x)


def test_top_prior_classifier_sows_uniform_logits_at_init():
  x = _x((3, 2, 2, 4))
  labels = jnp.array([0, 2, 1], jnp.int32)
  module = priors.GaussianTopPrior(learned=True, num_classes=3, classifier=True)
  variables = module.init(_key(0), x, labels)
  assert "intermediates" not in variables
  assert set(variables["params"]) == {"prior", "class_prior", "classifier"}
  (y, _), state = module.apply(variables, x, labels,
                               mutable=["intermediates"])
  logits, = state["intermediates"]["class_logits"]
  assert logits.shape == (3, 3)
  np.testing.assert_array_equal(logits, 0.0)
  np.testing.assert_array_equal(y, x)


def test_scalar_affine_and_logit_properties():
  y, log_det = check_bijector(bj.ScalarAffine(1.0 / 256, -0.5),
                              _x((2, 2, 2, 1)))
  np.testing.assert_allclose(log_det, -4 * np.log(256.0), rtol=1e-6)
  x01 = jax.random.uniform(_key(3), (2, 2, 2, 2))
  check_bijector(bj.Logit(0.05), x01)


def test_uniform_dequantization():
  x = jax.random.randint(_key(0), (3, 4, 4, 2), 0, 256).astype(
      jnp.float32)
  module = bj.UniformDequantize(256)
  rngs = {"dequantize": _key(1)}
  y, log_det = module.apply({}, x, rngs=rngs, method=FORWARD)
  noise = np.asarray(y - x)
  assert noise.min() >= 0.0 and noise.max() < 1.0 and noise.std() > 0.2
  np.testing.assert_array_equal(log_det, 0.0)
  x_back, inverse_log_det = module.apply({}, y, method=INVERSE)
  np.testing.assert_array_equal(x_back, x)
  np.testing.assert_array_equal(inverse_log_det, 0.0)
  check_bijector(module, x, variables={}, exact_inverse=False)


def test_chain_sums_log_dets_in_order():
  x = _x((2, 4, 4, 2))
  chain = bj.Chain([bj.ActNorm(), bj.Squeeze(),
                    bj.Invertible1x1Conv("lu", seed=0),
                    bj.Coupling(width=8)])
  variables = _init(chain, x)
  # The parts, run by hand, give the same output and total log-det (the
  # full-model tests check a Chain's Jacobian).
  params = variables["params"]

  @jax.jit
  def by_hand(x):
    h, total = x, 0.0
    for i, layer in enumerate(chain.layers):
      h, ld = layer.apply({"params": params.get(f"layers_{i}", {})}, h,
                          method=FORWARD)
      total = total + ld
    return h, total

  h, total = by_hand(x)
  y, log_det = jax.jit(lambda v, x: chain.apply(v, x, method=FORWARD))(
      variables, x)
  np.testing.assert_allclose(y, h, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(log_det, total, rtol=1e-6, atol=1e-5)


def test_bijectors_are_callable_in_the_forward_direction():
  """``__call__`` is forward_and_log_det, for ``apply`` and for ``init``."""
  x = _x((2, 4, 4, 2))
  module = bj.Chain([bj.ActNorm(), bj.Coupling(width=8), bj.Squeeze(),
                     bj.Invertible1x1Conv("lu")])
  variables = _init(module, x)
  called, explicit = jax.jit(lambda v, x: (
      module.apply(v, x), module.apply(v, x, method=FORWARD)))(variables, x)
  for got, want in zip(called, explicit, strict=True):
    np.testing.assert_array_equal(got, want)
  by_call = jax.eval_shape(module.init, _key(0), x)
  assert (jax.tree.map(jnp.shape, by_call) ==
          jax.tree.map(jnp.shape, variables))


def test_actnorm_without_data_init_starts_as_the_identity():
  x = _x((3, 4, 4, 2))
  module = bj.ActNorm(data_init=False)
  variables = module.init(_key(0), x)
  y, log_det = module.apply(variables, x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(log_det, 0.0)
  # With data_init the batch given to init is the one the statistics come
  # from: another batch gives other parameters.
  fitted = bj.ActNorm()
  first = fitted.init(_key(0), x)["params"]["bias"]
  second = fitted.init(_key(0), 2.0 * x + 1.0)["params"]["bias"]
  np.testing.assert_allclose(second, 2.0 * first - 1.0, rtol=1e-5)


def test_actnorm_init_over_the_sharded_global_batch():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  # Each example has its own offset and scale, so shard-local statistics
  # differ clearly from the global ones.
  x = _x((16, 4, 4, 3))
  offsets = jnp.arange(16.0)[:, None, None, None]
  x = x * (1.0 + 0.2 * offsets) + 3.0 * offsets
  x_sharded = jax.device_put(x, sharding)
  assert len(x_sharded.sharding.device_set) == 8
  module = bj.ActNorm()
  init = jax.jit(lambda key, v: module.init(key, v, method=FORWARD))
  variables = init(_key(0), x_sharded)
  y, _ = module.apply(variables, x, method=FORWARD)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-4)
  full = np.asarray(x, np.float64)
  np.testing.assert_allclose(variables["params"]["bias"],
                             -full.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(variables["params"]["log_scale"],
                             -np.log(full.std(axis=(0, 1, 2))), rtol=1e-4)
  # The first shard alone would have given very different statistics.
  shard_mean = full[:2].mean(axis=(0, 1, 2))
  assert np.all(np.abs(shard_mean - full.mean(axis=(0, 1, 2))) > 5.0)


def test_library_never_calls_slogdet():
  import inspect
  for module in (flows.family, flows.bijectors, flows.architectures,
                 flows.priors, flows.splines):
    source = inspect.getsource(module)
    for name in ("slogdet", "linalg.det", "linalg.inv"):
      assert f"{name}(" not in source, (module.__name__, name)
