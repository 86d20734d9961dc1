"""Variational dequantization: q starts uniform, q is a normalised density,
and the bound lies below the discrete log-likelihood computed by
quadrature (and tightens when q is trained)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gm_jax import flows
from gm_jax.flows import bijectors as bj
from gm_jax.flows.dequantization import VariationalDequantize
from tests.test_flows import GLOW, REALNVP, tiny_config
from tests.test_flows_bijectors import _key, _perturb

NUM_BINS = 4


def _levels(shape, key=0, num_bins=NUM_BINS):
  return jax.random.randint(_key(key), shape, 0,
                            num_bins).astype(jnp.float32)


def test_identity_init_is_uniform_dequantization():
  deq = VariationalDequantize(num_bins=NUM_BINS, num_steps=3, width=8)
  x = _levels((3, 4, 4, 2))
  variables = deq.init({"params": _key(1), "dequantize": _key(2)}, x)
  y, log_det = deq.apply(variables, x, rngs={"dequantize": _key(3)})
  y_uniform, _ = bj.UniformDequantize(NUM_BINS).apply(
      {}, x, rngs={"dequantize": _key(3)})
  # The couplings start at the identity: q is the uniform density, so
  # -log q is exactly 0 and u = sigmoid(logit(v)) is the uniform draw v.
  np.testing.assert_array_equal(log_det, np.zeros(3))
  np.testing.assert_allclose(y, y_uniform, atol=1e-6)
  assert np.all(np.floor(y) == x)
  back, _ = deq.apply(variables, y, method="inverse_and_log_det")
  np.testing.assert_array_equal(back, x)


def test_untrained_variational_bound_equals_the_uniform_one():
  overrides = REALNVP  # logit preprocessing: the bins' scale enters too
  config = tiny_config(dequantization="variational", dequantization_steps=2,
                       dequantization_width=8, **overrides)
  family = flows.make(config)
  batch = {"image": jax.random.randint(_key(0), (3, 4, 4, 2), 0, 256
                                       ).astype(jnp.uint8)}
  params = jax.jit(family.init)(jax.random.PRNGKey(1), batch)
  out = jax.jit(family.evaluate)(params, batch, jax.random.PRNGKey(2))
  assert set(out) >= {"nll_nats", "bpd", "uniform_nll_nats", "uniform_bpd"}
  np.testing.assert_allclose(out["nll_nats"], out["uniform_nll_nats"],
                             rtol=1e-5)
  # And the uniform figure is the plain uniform model's, same parameters
  # minus q's, same key.
  plain = flows.make(tiny_config(**overrides))
  plain_params = {k: v for k, v in params.items() if k != "layers_0"}
  np.testing.assert_allclose(
      jax.jit(plain.evaluate)(plain_params, batch,
                              jax.random.PRNGKey(2))["nll_nats"],
      out["uniform_nll_nats"], rtol=1e-6)


def test_q_is_a_normalised_density_on_the_unit_cube():
  # E_q[1 / q(u | x)] = the volume of the cube = 1 for any q on it.
  deq = VariationalDequantize(num_bins=NUM_BINS, num_steps=2, width=8,
                              num_res_blocks=0)
  x = jnp.tile(jnp.array([[[[1.0], [3.0]]]]), (10_000, 1, 1, 1))
  variables = deq.init({"params": _key(1), "dequantize": _key(2)}, x[:1])
  variables = {"params": _perturb(variables["params"], _key(3), 0.5)}
  y, minus_log_q = jax.jit(lambda v, x: deq.apply(
      v, x, rngs={"dequantize": _key(4)}))(variables, x)
  u = np.asarray(y - x)
  assert u.min() >= 0.0 and u.max() <= 1.0
  # q is far from uniform (the perturbation is not a no-op) ...
  assert np.std(np.asarray(minus_log_q)) > 0.1
  inverse_q = np.exp(np.asarray(minus_log_q, np.float64))
  mean = inverse_q.mean()
  stderr = inverse_q.std() / math.sqrt(inverse_q.size)
  # ... and still integrates to one.
  assert abs(mean - 1.0) < 4 * stderr + 1e-3, (mean, stderr)


class _Model:
  """A tiny flow on two pixels of 4 levels: q, then p's bijection
  (levels [0, 4) to [-4, 4), two checkerboard affine couplings) onto
  N(0, I), so that p varies inside the bins."""

  def __init__(self):
    self.deq = VariationalDequantize(num_bins=NUM_BINS, num_steps=2, width=8,
                                     num_res_blocks=0)
    self.rest = bj.Chain([
        bj.ScalarAffine(2.0, -4.0),
        bj.Coupling(kind="affine", mask="checkerboard", parity=0, width=8),
        bj.Coupling(kind="affine", mask="checkerboard", parity=1, width=8)])
    x = jnp.zeros((1, 1, 2, 1))
    deq_params = self.deq.init({"params": _key(1), "dequantize": _key(2)},
                               x)["params"]
    rest_params = self.rest.init(_key(3), x)["params"]
    self.params = {"deq": _perturb(deq_params, _key(4), 0.3),
                   "rest": _perturb(rest_params, _key(5), 0.5)}

  def log_density(self, rest_params, y):
    """log p(y) of the continuous y [N, 1, 2, 1] in level units."""
    z, log_det = self.rest.apply({"params": rest_params}, y)
    return jnp.sum(-0.5 * z**2 - 0.5 * math.log(2 * math.pi),
                   axis=(1, 2, 3)) + log_det

  def bound_samples(self, params, x, num, key):
    """log p(x + u) - log q(u | x) [num], u ~ q(u | x)."""
    xs = jnp.tile(x, (num, 1, 1, 1))
    y, minus_log_q = self.deq.apply({"params": params["deq"]}, xs,
                                    rngs={"dequantize": key})
    return self.log_density(params["rest"], y) + minus_log_q

  def log_prob_by_quadrature(self, x, points=400):
    """log P(x) = log of the integral of p(x + u) over the unit square."""
    mid = (np.arange(points) + 0.5) / points
    u = np.stack(np.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)
    y = np.asarray(x).reshape(1, 2) + u
    log_p = self.log_density(self.params["rest"],
                             jnp.asarray(y.reshape(-1, 1, 2, 1), jnp.float32))
    log_p = np.asarray(log_p, np.float64)
    top = log_p.max()
    return top + math.log(np.mean(np.exp(log_p - top)))


def _mean_and_stderr(values):
  values = np.asarray(values, np.float64)
  return values.mean(), values.std() / math.sqrt(values.size)


def test_bound_is_below_the_discrete_log_likelihood_by_quadrature():
  model = _Model()
  x = jnp.array([[[[1.0], [2.0]]]])
  log_prob = model.log_prob_by_quadrature(x)
  samples = model.bound_samples(model.params, x, 20_000, _key(6))
  bound, stderr = _mean_and_stderr(samples)
  # Jensen: E_q[log p(x + u) - log q(u | x)] <= log P(x) ...
  assert bound <= log_prob + 3 * stderr, (bound, log_prob, stderr)
  # ... and exp of the same integrand is unbiased for P(x) itself, which
  # checks q's log-density and the flow's log-det together.
  ratio = np.exp(np.asarray(samples, np.float64) - log_prob)
  mean, ratio_stderr = _mean_and_stderr(ratio)
  assert abs(mean - 1.0) < 4 * ratio_stderr + 2e-3, (mean, ratio_stderr)


def test_training_q_tightens_the_bound_toward_the_quadrature_value():
  model = _Model()
  x = jnp.array([[[[3.0], [0.0]]]])
  log_prob = model.log_prob_by_quadrature(x)
  # Train q alone (p fixed), from the uniform q (its initial parameters).
  deq_params = model.deq.init({"params": _key(7), "dequantize": _key(8)},
                              x)["params"]
  tx = optax.adam(3e-3)

  def neg_bound(deq_params, key):
    params = {"deq": deq_params, "rest": model.params["rest"]}
    return -jnp.mean(model.bound_samples(params, x, 256, key))

  @jax.jit
  def step(deq_params, opt_state, key):
    grads = jax.grad(neg_bound)(deq_params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(deq_params, updates), opt_state

  def bound_of(deq_params):
    params = {"deq": deq_params, "rest": model.params["rest"]}
    return _mean_and_stderr(model.bound_samples(params, x, 20_000, _key(9)))

  uniform_bound, _ = bound_of(deq_params)
  opt_state = tx.init(deq_params)
  for i in range(300):
    deq_params, opt_state = step(deq_params, opt_state, _key(100 + i))
  trained_bound, stderr = bound_of(deq_params)
  gap_before = log_prob - uniform_bound
  gap_after = log_prob - trained_bound
  assert gap_before > 0.05  # p is not flat in the bin: room to gain
  assert trained_bound <= log_prob + 3 * stderr
  assert gap_after < 0.5 * gap_before, (gap_before, gap_after)


def test_variational_flow_trains_q_and_samples():
  config = tiny_config(dequantization="variational", dequantization_steps=2,
                       dequantization_width=8, **GLOW)
  family = flows.make(config)
  batch = {"image": jax.random.randint(_key(0), (2, 4, 4, 2), 0, 256
                                       ).astype(jnp.uint8)}
  params = jax.jit(family.init)(jax.random.PRNGKey(1), batch)
  grads, metrics = jax.jit(jax.grad(family.loss, has_aux=True))(
      params, batch, jax.random.PRNGKey(2), jnp.int32(0))
  assert "uniform_bpd" not in metrics  # training skips the extra pass
  q_grads = jax.tree_util.tree_leaves(grads["layers_0"])
  assert q_grads and max(float(jnp.abs(g).max()) for g in q_grads) > 0
  samples = jax.jit(family.sample, static_argnums=2)(
      params, jax.random.PRNGKey(3), 3)
  assert samples.shape == (3, 4, 4, 2)
  assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0


def test_dequantization_config_is_checked():
  with pytest.raises(ValueError, match="dequantization"):
    flows.make(tiny_config(dequantization="learned"))
  with pytest.raises(ValueError, match="dequantization_steps"):
    flows.make(tiny_config(dequantization="variational",
                           dequantization_steps=0))
