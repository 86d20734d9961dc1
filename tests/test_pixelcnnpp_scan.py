"""PixelCNN++ with scanned stages (``model.scan_layers``).

``PixelCNNPlusPlus(scan_blocks=True)`` runs each stage's gated resnet blocks
of each stream as one ``nn.scan`` with stacked parameters;
``pixelcnnpp_unrolled_params`` / ``pixelcnnpp_scanned_params`` move
parameters between the two layouts. The tests check that the two networks
are the same function (outputs and gradients, in float64 where rounding
cannot hide a wrong mapping), that the scanned network's data-dependent
initialisation sets every weight-normed layer from its own input, and that
the family trains, evaluates and samples the same numbers either way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import autoregressive as ar
from gm_jax import config_lib, schema
from gm_jax.convolutions import WeightNormed


def _nets(**kwargs):
  common = dict(num_outputs=5, width=6, dropout=0.0)
  common.update(kwargs)
  return (ar.PixelCNNPlusPlus(**common),
          ar.PixelCNNPlusPlus(**common, scan_blocks=True))


def _random_params(net, x, label, seed=0):
  """Random float64 parameters on the network's abstract shapes (no
  initialiser to compile): kernels of unit fan-in variance, scales near 1,
  biases away from 0."""
  shapes = jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, label), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return 1.0 + 0.1 * rng.normal(size=leaf.shape)
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      fan_in = np.prod(leaf.shape[-4:-1] if len(leaf.shape) > 3
                       else leaf.shape[-2:-1])
      return rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    return 0.1 * rng.normal(size=leaf.shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), jnp.float64), shapes)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


@pytest.mark.parametrize("kwargs", [
    dict(num_resnet=2, num_classes=3, weight_norm=True),  # mixture, grey
    dict(num_resnet=1, num_groups=3),  # channel-masked head, RGB
], ids=["grey-conditional-weight_norm", "rgb-channel_head"])
def test_scanned_is_the_unrolled_function(kwargs):
  unrolled, scanned = _nets(**kwargs)
  channels = kwargs.get("num_groups", 1)
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, channels),
                           jnp.float64, -1.0, 1.0)
    label = jnp.array([0, 2]) if kwargs.get("num_classes") else None
    params = _random_params(scanned, x, label)
    mapped = ar.pixelcnnpp_unrolled_params(params, kwargs["num_resnet"])
    # The mapping is a bijection onto the unrolled layout.
    reference = jax.eval_shape(
        lambda x: unrolled.init(jax.random.PRNGKey(0), x, label), x)["params"]
    assert jax.tree.structure(mapped) == jax.tree.structure(reference)
    assert all(a.shape == b.shape for a, b in zip(
        jax.tree.leaves(mapped), jax.tree.leaves(reference), strict=True))
    back = ar.pixelcnnpp_scanned_params(mapped, kwargs["num_resnet"])
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert _max_diff(back, params) == 0.0

    weights = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 5 * channels),
                                jnp.float64)

    def value_and_grad(net):
      return jax.jit(jax.value_and_grad(lambda p: jnp.sum(
          weights * net.apply({"params": p}, x, label))))

    value_s, grad_s = value_and_grad(scanned)(params)
    value_u, grad_u = value_and_grad(unrolled)(mapped)
    assert abs(float(value_s - value_u)) < 1e-9 * (1 + abs(float(value_u)))
    assert _max_diff(ar.pixelcnnpp_unrolled_params(grad_s,
                                                   kwargs["num_resnet"]),
                     grad_u) < 1e-10
    out_s = scanned.apply({"params": params}, x, label)
    out_u = unrolled.apply({"params": mapped}, x, label)
    assert float(jnp.max(jnp.abs(out_s - out_u))) < 1e-11
    # A wrong mapping (the u stream's first two up blocks swapped) is seen.
    first, second = "GatedResnet_0", "GatedResnet_2"
    swapped = dict(mapped, **{first: mapped[second], second: mapped[first]})
    wrong = unrolled.apply({"params": swapped}, x, label)
    assert float(jnp.max(jnp.abs(wrong - out_u))) > 1e-3


def test_scanned_init_sets_each_layer_from_its_own_input():
  """Data-dependent init inside the scans: run on the init batch, every
  weight-normed layer's output (captured through the unrolled network on
  the mapped parameters) has per-channel mean 0 and standard deviation
  equal to its init scale (1, or 0.1 for a residual branch's last
  convolution; 0 for a channel that is constant on the batch)."""
  _, scanned = _nets(num_resnet=2, weight_norm=True)
  unrolled = ar.PixelCNNPlusPlus(num_outputs=5, width=6, dropout=0.0,
                                 num_resnet=2, weight_norm=True)
  x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1),
                         jnp.float32, -1.0, 1.0)
  params = jax.jit(scanned.init)(jax.random.PRNGKey(0), x)["params"]
  # Each stacked block got its own scales (one copy initialised twice would
  # not differ).
  scales = params["up0_u"]["block"]["DownShiftedConv_0"]["WeightNormed_0"][
      "scale"]
  assert scales.shape[0] == 2
  assert float(jnp.max(jnp.abs(scales[0] - scales[1]))) > 1e-3
  _, captured = unrolled.apply(
      {"params": ar.pixelcnnpp_unrolled_params(params, 2)}, x,
      capture_intermediates=lambda mdl, _: isinstance(mdl, WeightNormed),
      mutable=["intermediates"])
  outputs = [(jax.tree_util.keystr(path), leaf) for path, leaf in
             jax.tree_util.tree_leaves_with_path(captured)]
  block_layers = [name for name, _ in outputs if "GatedResnet" in name]
  assert len(block_layers) >= 2 * 3 * 2 * 2  # conv1, conv2 of 24 blocks
  for name, y in outputs:
    y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
    np.testing.assert_allclose(y.mean(0), 0.0, atol=2e-4, err_msg=name)
    std = y.std(0)
    ok = ((np.abs(std - 1.0) < 1e-3) | (np.abs(std - 0.1) < 1e-4)
          | (std < 1e-3))
    assert ok.all(), (name, std)


def _family_config(scan):
  config = ar.default_model_config()
  config.update(dict(architecture="pixelcnnpp", image_shape=(4, 4, 1),
                     width=4, num_resnet=1, num_mixtures=2, binarize="none",
                     likelihood="logistic_mixture", weight_norm=True,
                     scan_layers=scan))
  return config


def test_family_with_scan_layers_scores_and_samples_as_unrolled():
  scanned, unrolled = ar.make(_family_config(True)), ar.make(
      _family_config(False))
  batch = {"image": jax.random.randint(jax.random.PRNGKey(1), (4, 4, 4, 1),
                                       0, 256).astype(jnp.uint8),
           "label": jnp.zeros((4,), jnp.int32)}
  params = jax.jit(scanned.init)(jax.random.PRNGKey(0), batch)
  mapped = ar.pixelcnnpp_unrolled_params(params, 1)
  assert (sum(a.size for a in jax.tree.leaves(params)) ==
          sum(a.size for a in jax.tree.leaves(mapped)))
  key = jax.random.PRNGKey(2)
  ev_s = jax.jit(scanned.evaluate)(params, batch, key)
  ev_u = jax.jit(unrolled.evaluate)(mapped, batch, key)
  np.testing.assert_allclose(ev_s["nll_nats"], ev_u["nll_nats"], rtol=1e-5)
  # Training uses dropout 0 here, so the losses agree too.
  loss_s = jax.jit(scanned.loss)(params, batch, key, 0)[0]
  loss_u = jax.jit(unrolled.loss)(mapped, batch, key, 0)[0]
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  # Sampling maps the parameters and runs the unrolled cached sampler: the
  # very same images.
  images_s = jax.jit(scanned.sample, static_argnums=2)(params, key, 3)
  images_u = jax.jit(unrolled.sample, static_argnums=2)(mapped, key, 3)
  np.testing.assert_array_equal(np.asarray(images_s), np.asarray(images_u))


def test_scan_layers_is_pixelcnnpp_only():
  config = ar.default_model_config()
  config.scan_layers = True
  with pytest.raises(ValueError, match="scan_layers"):
    schema.parse(ar.PixelCNNConfig, config)


def test_paper_config_scans_with_the_papers_parameter_count():
  config = config_lib.load("configs/pixelcnnpp_cifar10.py")
  assert config.model.scan_layers
  spec = schema.parse(ar.PixelCNNConfig, config.model)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  counts = []
  for scan in (True, False):
    shapes = jax.eval_shape(lambda x, scan=scan: ar.build_network(
        spec, scan=scan).init(jax.random.PRNGKey(0), x), x)
    counts.append(sum(a.size for a in jax.tree.leaves(shapes)))
  assert counts[0] == counts[1] == 53_659_080
