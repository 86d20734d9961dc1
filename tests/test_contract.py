"""The contract of every config in configs/, through the Family interface.

For every file and every ``:arg`` it documents (each alone and with
``smoke``), loaded the way the scripts load it (``config_lib.load``):

* the config loads and is locked (a new key is an error);
* ``make_family(config.model)`` builds, and the non-smoke models have the
  parameter counts recorded below (so a refactoring cannot change a paper
  model unnoticed);
* for ``smoke`` variants: the data source is offline and serves the model's
  image shape, and ``init / loss / evaluate / sample / visualize`` (and a
  ``loss_state``'s ``init / loss / update``) return the declared shapes and
  dtypes (checked with ``jax.eval_shape``, no compilation): loss a scalar
  and a dict of scalars whose names ``evaluate`` shares (a loss_state's
  stats per example); evaluate per-example [B] arrays with ``nll_nats`` and
  ``bpd``;
  samples [n, H, W, C] float32; visualize images [N, H, W, C] or
  [rows, cols, H, W, C] float32.

The smallest smoke models also run for real, on a batch of their data:
finite values, bpd = nll / (D ln 2), images in [0, 1].
"""

import ast
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gm_jax import config_lib, data, launch
from gm_jax.families import make_family

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# The arguments each config documents, besides "smoke".
CONFIG_ARGS = {
    "diffusion_cifar10.py": ("bf16", "exact", "cosine", "ddpm"),
    "diffusion_mnist.py": ("iddpm", "vlb"),
    "gated_pixelcnn_mnist.py": ("conditional", "8bit"),
    "iddpm_cifar10.py": ("bf16", "exact", "vlb"),
    "iwae_mnist.py": ("vae", "k1", "k5", "two_layer"),
    "glow_cifar10.py": ("conditional",),
    "glow_mnist.py": ("conditional", "vardeq"),
    "pixelcnn_mnist.py": ("paper", "dynamic"),
    "pixelcnnpp_cifar10.py": (),
    "pixelcnnpp_mnist.py": (),
    "realnvp_cifar10.py": (),
    "realnvp_mnist.py": ("vardeq",),
    "vae_binarized_mnist.py": (),
    "vae_mnist.py": ("mlp", "logistic"),
    "vdm_cifar10.py": ("fixed", "learned_linear", "bf16"),
    "vdm_mnist.py": ("fixed",),
}

# Parameter counts of the full-size models, measured with jax.eval_shape.
PARAM_COUNTS = {
    "diffusion_cifar10.py": 35_746_307,  # DDPM's 35.7M
    "diffusion_cifar10.py:bf16": 35_746_307,
    "diffusion_cifar10.py:exact": 35_746_307,
    "diffusion_cifar10.py:cosine": 35_746_307,
    "diffusion_cifar10.py:ddpm": 35_746_307,
    "diffusion_mnist.py": 280_177,
    # 145 more: conv_out's 16 * 9 + 1 for the variance channel.
    "diffusion_mnist.py:iddpm": 280_322,
    "diffusion_mnist.py:vlb": 280_322,
    "gated_pixelcnn_mnist.py": 118_209,
    "gated_pixelcnn_mnist.py:conditional": 125_889,
    "gated_pixelcnn_mnist.py:8bit": 134_784,
    # Glow as published: 44,051,148 with the plain conditioner, + 100,992 for
    # Glow's conditioner (an actnorm, 2 x 512, in place of each hidden
    # conv's bias, 512, and the output conv's per-channel logs), + 36 for
    # the split priors' logs, + 1,056 for the learned top prior (a 3x3 conv
    # of a constant, 96 outputs, with bias and logs). The paper's "44.0M";
    # openai/glow's code counts 44,703,060 (a border channel on its 3x3
    # convs).
    "glow_cifar10.py": 44_153_232,
    "glow_cifar10.py:conditional": 37_959_044,
    # Burda et al.'s MLPs: 784-200-200-50 and mirror; two layers add
    # 100-100-50 and mirror (counted layer by layer in test_vae.py).
    # Improved DDPM's CIFAR-10 sizes in gm_jax's U-Net (its checkpoint's
    # name says 50M; its U-Net conditions GroupNorm by scale and shift).
    "iddpm_cifar10.py": 49_066_246,
    "iddpm_cifar10.py:bf16": 49_066_246,
    "iddpm_cifar10.py:exact": 49_066_246,
    "iddpm_cifar10.py:vlb": 49_066_246,
    "iwae_mnist.py": 425_284,
    "iwae_mnist.py:vae": 425_284,
    "iwae_mnist.py:k1": 425_284,
    "iwae_mnist.py:k5": 425_284,
    "iwae_mnist.py:two_layer": 521_084,
    "glow_mnist.py": 76_172,
    "glow_mnist.py:conditional": 77_716,
    # q(u | x): two context convs and 2 couplings of width 16, 8,532.
    "glow_mnist.py:vardeq": 84_704,
    "pixelcnn_mnist.py": 57_921,
    "pixelcnn_mnist.py:paper": 2_736_897,
    "pixelcnn_mnist.py:dynamic": 57_921,
    "pixelcnnpp_cifar10.py": 53_659_080,  # with weight norm scales
    "pixelcnnpp_mnist.py": 572_847,
    "realnvp_cifar10.py": 5_997_539,
    "realnvp_mnist.py": 333_851,
    "realnvp_mnist.py:vardeq": 342_383,
    "vae_binarized_mnist.py": 425_284,
    "vae_mnist.py": 836_033,
    "vae_mnist.py:mlp": 1_079_600,
    "vae_mnist.py:logistic": 836_178,
    # VDM's full-resolution net (32 + 33 ResNet blocks of width 128) plus
    # the learned schedule's 3,075 (1,024 x 3 + slope + two endpoints).
    "vdm_cifar10.py": 30_589_318,
    "vdm_cifar10.py:bf16": 30_589_318,
    "vdm_cifar10.py:fixed": 30_586_243,
    "vdm_cifar10.py:learned_linear": 30_586_245,
    "vdm_mnist.py": 44_804,
    "vdm_mnist.py:fixed": 41_729,
}

# Smoke models that also run for real: the smallest with a ``visualize``
# (each family's own tests run its models, the diffusion U-Net included).
EXECUTED = ("vae_binarized_mnist.py:smoke", "glow_mnist.py:smoke")

OFFLINE_SOURCES = ("embedded_mnist", "embedded_rgb")
# Training metrics that are schedules, not per-example quantities, so
# evaluate has no counterpart.
# (neg_iwae_train_nats: the training bound's k, not evaluation's;
# importance_*: the diffusion timestep sampler's state.)
TRAIN_ONLY_METRICS = {"kl_weight", "neg_iwae_train_nats", "importance_warm",
                      "importance_ess"}
BATCH = 2
NUM_SAMPLES = 3


def _specs():
  specs = []
  for name, args in CONFIG_ARGS.items():
    for arg in ("", *args):
      specs.append(f"{name}:{arg}" if arg else name)
      specs.append(f"{name}:{arg},smoke" if arg else f"{name}:smoke")
  return specs


SPECS = _specs()
SMOKE_SPECS = [s for s in SPECS if "smoke" in s]


def _load(spec):
  return config_lib.load(f"configs/{spec}")


def test_config_args_reports_what_each_config_accepts():
  accepted = config_lib.config_args()
  assert set(accepted) == set(CONFIG_ARGS)
  for name, args in accepted.items():
    # Every documented argument is reported, and every reported one loads.
    assert {"smoke", *CONFIG_ARGS[name]} <= set(args), name
    for arg in args:
      config_lib.load(f"configs/{name}:{arg}")
    # The same list as the error for an argument the config does not take.
    with pytest.raises(ValueError) as error:
      config_lib.load(f"configs/{name}:not_an_arg")
    assert f"accepts {sorted(args)}" in str(error.value)
  # parse_args is back to parsing afterwards.
  assert config_lib.parse_args("smoke", ("smoke",)) == {"smoke"}


def _batch(config, split):
  """The first BATCH examples of the config's data."""
  source = data.load_source(config.data, split)
  batch = source.get(np.arange(BATCH))
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("name", [
    "vae_mnist.py", "pixelcnn_mnist.py", "gated_pixelcnn_mnist.py",
    "glow_mnist.py", "realnvp_mnist.py", "diffusion_mnist.py",
    "pixelcnnpp_mnist.py"])
def test_default_mnist_runs_evaluate_four_times(name):
  def evaluations(train):  # the steps the trainer evaluates at
    return [s for s in range(1, train.num_steps + 1)
            if s % train.eval_every == 0 or s == train.num_steps]

  config = _load(name)
  assert len(evaluations(config.train)) == 4
  # The count follows an override of the run's length.
  launch.apply_overrides(config, [("train.num_steps", "20000")])
  assert config.train.eval_every == 5000
  assert len(evaluations(config.train)) == 4
  # Smoke runs keep their own cadence.
  assert _load(f"{name}:smoke").train.eval_every == 4


def test_every_config_file_and_argument_is_covered():
  files = sorted(p.name for p in CONFIG_DIR.glob("*.py")
                 if p.name != "__init__.py")
  assert files == sorted(CONFIG_ARGS)
  for name, args in CONFIG_ARGS.items():
    # The error for an unknown argument lists the ones the file accepts.
    with pytest.raises(ValueError, match="Unknown config argument") as error:
      _load(f"{name}:no_such_argument")
    accepted = re.search(r"accepts (\[.*\])", str(error.value)).group(1)
    assert sorted(ast.literal_eval(accepted)) == sorted(("smoke", *args))
  assert set(PARAM_COUNTS) == {s for s in SPECS if "smoke" not in s}


@pytest.mark.parametrize("spec", SPECS)
def test_config_loads_locked_and_builds_its_family(spec):
  config = _load(spec)
  with pytest.raises(AttributeError, match="locked"):
    config.model.no_such_key = 1
  with pytest.raises(AttributeError, match="locked"):
    config.train.no_such_key = 1
  family = make_family(config.model)
  if spec in PARAM_COUNTS:
    shape = (1,) + tuple(config.model.image_shape)
    batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8),
             "label": jax.ShapeDtypeStruct((1,), jnp.int32)}
    params = jax.eval_shape(family.init, jax.random.key(0), batch)
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == PARAM_COUNTS[spec]


def _check_images(images, shape):
  """[N, H, W, C], or a laid-out [rows, cols, H, W, C] (visualize)."""
  assert images.ndim in (4, 5), images.shape
  assert tuple(images.shape[-3:]) == shape, images.shape
  assert images.dtype == jnp.float32


# config.model of the smoke variants already traced: a family is a function
# of config.model alone, so variants that differ only outside it (e.g.
# "exact" under "smoke") need no second trace.
_TRACED_MODELS = set()


@pytest.mark.parametrize("spec", SMOKE_SPECS)
def test_smoke_config_keeps_the_family_contract(spec):
  config = _load(spec)
  assert config.data.source in OFFLINE_SOURCES
  assert config.train.num_steps <= 10
  shape = tuple(config.model.image_shape)
  batch = _batch(config, config.data.train_split)
  assert tuple(batch["image"].shape[1:]) == shape
  assert batch["image"].dtype == jnp.uint8
  assert batch["label"].dtype == jnp.int32
  family = make_family(config.model)
  model_json = config.model.to_json(sort_keys=True)
  if model_json in _TRACED_MODELS:
    return
  _TRACED_MODELS.add(model_json)
  key = jax.random.key(0)

  params = jax.eval_shape(family.init, key, batch)
  loss, metrics = jax.eval_shape(family.loss, params, batch, key,
                                 jnp.int32(0))
  assert loss.shape == () and loss.dtype == jnp.float32
  assert metrics and all(m.shape == () for m in metrics.values())
  results = jax.eval_shape(family.evaluate, params, batch, key)
  assert {"nll_nats", "bpd"} <= set(results)
  for value in results.values():
    # [B], or [B, D] per-example vectors (counted as active units).
    assert value.shape[:1] == (BATCH,) and value.ndim in (1, 2)
    assert value.dtype == jnp.float32
  # Training and evaluation name the same quantity alike.
  assert set(metrics) - TRAIN_ONLY_METRICS <= set(results)
  if family.loss_state is not None:
    # A stateful objective: arrays for a state, the same scalar and
    # metrics as the plain loss, per-example stats, the state's structure
    # kept by update.
    state = jax.eval_shape(family.loss_state.init)
    assert jax.tree.leaves(state)
    loss, (stateful_metrics, stats) = jax.eval_shape(
        family.loss_state.loss, params, state, batch, key, jnp.int32(0))
    assert loss.shape == () and loss.dtype == jnp.float32
    assert all(m.shape == () for m in stateful_metrics.values())
    assert set(metrics) <= set(stateful_metrics)
    assert set(stateful_metrics) - TRAIN_ONLY_METRICS <= set(results)
    assert all(s.shape[:1] == (BATCH,) for s in jax.tree.leaves(stats))
    updated = jax.eval_shape(family.loss_state.update, state, stats)
    assert jax.tree.structure(updated) == jax.tree.structure(state)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(
        jax.tree.leaves(updated), jax.tree.leaves(state), strict=True))
  samples = jax.eval_shape(lambda p, k: family.sample(p, k, NUM_SAMPLES),
                           params, key)
  assert samples.shape == (NUM_SAMPLES,) + shape
  assert samples.dtype == jnp.float32
  if family.visualize is not None:
    pictures = jax.eval_shape(family.visualize, params, batch, key)
    assert pictures
    for images in pictures.values():
      _check_images(images, shape)


@pytest.mark.parametrize("spec", EXECUTED)
def test_smallest_smoke_models_run(spec):
  config = _load(spec)
  family = make_family(config.model)
  shape = tuple(config.model.image_shape)

  @jax.jit
  def run(batch):  # One program: one compilation.
    params = family.init(jax.random.key(0), batch)
    results = family.evaluate(params, batch, jax.random.key(1))
    samples = family.sample(params, jax.random.key(2), NUM_SAMPLES)
    pictures = family.visualize(params, batch, jax.random.key(3))
    return results, samples, pictures

  results, samples, pictures = run(_batch(config, config.data.eval_split))
  nll, bpd = np.asarray(results["nll_nats"]), np.asarray(results["bpd"])
  assert np.all(np.isfinite(nll)) and np.all(nll > 0)
  np.testing.assert_allclose(bpd, nll / (math.prod(shape) * math.log(2)),
                             rtol=1e-5)
  for images in (samples, *pictures.values()):
    _check_images(images, shape)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


# Every config's smoke run, through the code path of the scripts:
# train_and_evaluate (scripts/train.py), then restore_for_inference with
# evaluate_dataset (scripts/evaluate.py) and sample (scripts/sample.py). The
# subprocess level of the scripts is tested once, on the VAE, in
# tests/test_scripts.py. The two families the trainer's own tests do not
# train (those use the VAE) run by default, with their fastest configs;
# diffusion's model runs for real in tests/test_diffusion.py. The others,
# slower to compile on 2 cores, are marked slow (``pytest -m slow``).
FAST_TRAINED = ("glow_mnist.py", "pixelcnn_mnist.py")
TRAINED = [pytest.param(name, marks=() if name in FAST_TRAINED
                        else pytest.mark.slow)
           for name in sorted(p.name for p in CONFIG_DIR.glob("*.py")
                              if not p.name.startswith("_"))
           if name != "vae_mnist.py"]  # its scripts run in test_scripts


@pytest.mark.parametrize("name", TRAINED)
def test_smoke_run_trains_and_serves_the_scripts(name, tmp_path):
  from gm_jax import train
  config = _load(f"{name}:smoke")
  config.unlock()
  config.train.compilation_cache_dir = ""  # the test session's cache
  config.train.num_steps = 2
  config.ckpt.every_steps = 2
  config.lock()
  final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["nll_nats"]) and final["bpd"] > 0
  built, params, step = train.restore_for_inference(config, str(tmp_path))
  assert step == 2
  source = data.load_source(config.data, config.data.eval_split)
  results = train.evaluate_dataset(
      built.evaluate, params, source, config.train.eval_batch_size, 4,
      jax.random.key(0), built.mesh)
  assert np.isfinite(results["nll_nats"]) and results["bpd"] > 0
  images = built.sample(params, jax.random.key(1), 2)
  _check_images(images, tuple(config.model.image_shape))
  assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
