"""Scanned flows (``scan_layers``): the same function as the unrolled ones.

``build_glow(scan=True)`` runs each level's K steps as one ``nn.scan`` with
stacked parameters, and both architectures scan their conditioners'
residual blocks. ``architectures.scanned_params`` maps an unrolled model's
parameters to the scanned layout; these tests check that the two models are
the same function (forward, log-det, inverse, gradients) in float64, where
rounding cannot hide a wrong mapping, and that the scanned model initialises,
inverts and trains as the unrolled one does.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax.flows import architectures as arch
from gm_jax.flows import bijectors as bj

SHAPE = (8, 8, 2)

CASES = [
    # architecture, permutation, conditioner, residual blocks
    ("glow", "lu", "glow", 2),
    ("glow", "shuffle", "plain", 2),
    ("realnvp", None, "plain", 2),
    pytest.param(("glow", "plain", "plain", 0), marks=pytest.mark.slow),
    pytest.param(("realnvp", None, "glow", 2), marks=pytest.mark.slow),
]


def _build(architecture, permutation, conditioner, res_blocks, scan):
  kwargs = dict(image_shape=SHAPE, num_levels=2, steps_per_level=2, width=4,
                conditioner=conditioner, num_res_blocks=res_blocks,
                scan=scan)
  if architecture == "glow":
    return arch.build_glow(permutation=permutation, **kwargs)
  return arch.build_realnvp(**kwargs)


def _leaves(tree):
  return jax.tree.leaves(tree)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_scanned_is_the_unrolled_function(case):
  architecture, permutation, conditioner, res_blocks = case
  unrolled = _build(*case, scan=False)
  scanned = _build(*case, scan=True)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (3,) + SHAPE, jnp.float64)
    params = jax.jit(unrolled.init)(jax.random.PRNGKey(0), x)["params"]
    # Move every parameter off its initial value (identity couplings would
    # hide a wrong mapping of the conditioners).
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(_leaves(params))))
    params = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) + 0.05 * jax.random.normal(
            next(keys), a.shape, jnp.float64), params)
    mapped = arch.scanned_params(params, architecture, res_blocks,
                                 conditioner)
    reference = jax.eval_shape(scanned.init, jax.random.PRNGKey(0),
                               x)["params"]
    assert (jax.tree.structure(mapped) == jax.tree.structure(reference))
    assert (jax.tree.map(jnp.shape, mapped)
            == jax.tree.map(jnp.shape, reference))
    assert (sum(a.size for a in _leaves(mapped))
            == sum(a.size for a in _leaves(params)))
    assert len(_leaves(mapped)) < len(_leaves(params))

    def outputs(model, p):
      z, log_det = model.apply({"params": p}, x)
      x_back, inverse_log_det = model.apply(
          {"params": p}, z0_fixed, method="inverse_and_log_det")
      grads = jax.grad(lambda q: jnp.sum(
          model.apply({"params": q}, x)[1]))(p)
      return z, log_det, x_back, inverse_log_det, grads

    z0_fixed = jax.random.normal(jax.random.PRNGKey(5), (3, math.prod(SHAPE)),
                                 jnp.float64)
    *out0, g0 = jax.jit(lambda p: outputs(unrolled, p))(params)
    *out1, g1 = jax.jit(lambda p: outputs(scanned, p))(mapped)
    for a, b in zip(out1, out0, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9)
    g0 = arch.scanned_params(g0, architecture, res_blocks, conditioner)
    for a, b in zip(_leaves(g1), _leaves(g0), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "-".join(map(str, c)))
def test_scanned_init_is_data_dependent_and_invertible(case):
  scanned = _build(*case, scan=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (16,) + SHAPE) * 3.0 + 1.0
  variables = jax.jit(scanned.init)(jax.random.PRNGKey(0), x)
  # The first step's actnorm saw the squeezed data, as unrolled: b = -mean.
  first = variables["params"]["stages_0"]["steps"]["ActNorm_0"]["bias"][0]
  squeezed = bj.squeeze2x2(x)
  np.testing.assert_allclose(first, -squeezed.mean(axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-5)
  # Every step's actnorm was initialised from its own input: the steps'
  # biases differ (a scan that initialised one copy K times would not).
  biases = variables["params"]["stages_0"]["steps"]["ActNorm_0"]["bias"]
  assert not np.allclose(biases[1], biases[0])
  z, log_det = scanned.apply(variables, x)
  # Couplings start as the identity and actnorms whiten: z is standardised.
  assert abs(float(z.std()) - 1.0) < 0.05
  x_back, inverse_log_det = scanned.apply(variables, z,
                                          method="inverse_and_log_det")
  np.testing.assert_allclose(x_back, x, atol=1e-4)
  np.testing.assert_allclose(inverse_log_det, -log_det, rtol=1e-5, atol=1e-3)


def test_scanned_glow_compiles_one_step_per_level():
  """The lowered forward pass has one loop per level and no copy of the
  steps' convolutions per step."""
  x = jnp.zeros((2,) + SHAPE)
  counts = {}
  for scan in (False, True):
    model = arch.build_glow(image_shape=SHAPE, num_levels=2,
                            steps_per_level=4, width=8, scan=scan)
    variables = model.init(jax.random.PRNGKey(0), x)
    text = jax.jit(model.apply).lower(variables, x).as_text()
    counts[scan] = (text.count("stablehlo.while"),
                    text.count("stablehlo.convolution"))
  assert counts[False][0] == 0
  assert counts[True][0] == 2  # One scan per level.
  # Two convolutions per step (the conditioner's 1x1 is a matmul): 2 levels
  # x 4 steps x 2 unrolled, 2 per level scanned; plus the split prior's.
  assert counts[False][1] == 2 * 4 * 2 + 1
  assert counts[True][1] == 2 * 2 + 1


def test_flow_config_scan_layers_trains_and_samples():
  """``model.scan_layers`` through the family: the scanned model has the
  unrolled one's parameter count in fewer arrays, and its loss, gradients
  and samples (the inverse direction) run and are finite."""
  from gm_jax import flows
  families, params = {}, {}
  images = jax.random.randint(jax.random.PRNGKey(3), (4,) + SHAPE, 0, 256)
  batch = {"image": images.astype(jnp.uint8)}
  key = jax.random.PRNGKey(4)
  for scan in (False, True):
    cfg = flows.default_model_config()
    cfg.image_shape = SHAPE
    cfg.num_levels, cfg.steps_per_level, cfg.width = 2, 2, 4
    cfg.num_res_blocks = 1
    cfg.scan_layers = scan
    families[scan] = flows.make(cfg)
    params[scan] = jax.eval_shape(families[scan].init, key, batch)
  assert (sum(a.size for a in _leaves(params[False]))
          == sum(a.size for a in _leaves(params[True])))
  assert len(_leaves(params[True])) < len(_leaves(params[False]))
  p1 = families[True].init(key, batch)
  loss_fn = jax.jit(lambda p: families[True].loss(p, batch, key, 0))
  loss, metrics = loss_fn(p1)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["bpd"]))
  grads = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(p1)
  assert all(np.all(np.isfinite(g)) for g in _leaves(grads))
  samples = jax.jit(families[True].sample, static_argnums=2)(
      p1, jax.random.PRNGKey(5), 3)
  assert samples.shape == (3,) + SHAPE
  assert np.all(np.isfinite(samples))
