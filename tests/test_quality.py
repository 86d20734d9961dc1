"""FID / KID, the feature extractors and the reference-statistics script."""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg
from flax import traverse_util

from gm_jax import config_lib, data
from gm_jax.quality import classifier, features, inception, metrics, reference
from tests.conftest import script_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_covariance(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d


# ---------------------------------------------------------------------------
# FID.


@pytest.mark.parametrize("n, d", [(300, 32), (20, 48)])  # full rank; N < D
def test_fid_of_a_set_with_itself_is_zero(n, d):
  x = np.maximum(np.random.default_rng(0).normal(size=(n, d)), 0)  # ReLU-like
  scale = np.trace(np.cov(x, rowvar=False))
  assert abs(metrics.fid(x, x)) <= 1e-10 * scale
  assert abs(metrics.fid(x.astype(np.float32), x)) <= 1e-6 * scale


def _direct_trace_sqrt(s1, s2):
  """Tr((S1 S2)^{1/2}) by the eigendecomposition S1 S2 = V diag(l) V^-1."""
  eigenvalues, vectors = np.linalg.eig(s1 @ s2)
  root = vectors @ np.diag(np.sqrt(eigenvalues.astype(complex))) @ (
      np.linalg.inv(vectors))
  return np.trace(root).real


def test_frechet_distance_commuting_covariances_closed_form():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  b[0] = 0.0  # a singular covariance
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = (np.sum((mu1 - mu2) ** 2)
              + np.sum(a + b - 2.0 * np.sqrt(a * b)))
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T,
                                 mu2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-11)


def test_frechet_distance_non_commuting_covariances():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
  assert not np.allclose(s1 @ s2, s2 @ s1)
  base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             base - 2.0 * _direct_trace_sqrt(s1, s2),
                             rtol=1e-10)
  # Singular S1 = A A^T (rank 2): S1 S2 has the eigenvalues of the 2x2
  # A^T S2 A and three zeros. (The eig route above would add about 1e-8 per
  # zero eigenvalue: the square root of its rounding error.)
  factor = rng.normal(size=(5, 2))
  singular = factor @ factor.T
  small = np.linalg.eigvals(factor.T @ s2 @ factor).real
  np.testing.assert_allclose(
      metrics.frechet_distance(mu1, singular, mu2, s2),
      np.sum((mu1 - mu2) ** 2) + np.trace(singular) + np.trace(s2)
      - 2.0 * np.sqrt(small).sum(), rtol=1e-12)
  s1, s2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
  np.testing.assert_allclose(metrics.trace_sqrt_product(s1, s2),
                             np.trace(scipy.linalg.sqrtm(s1 @ s2)).real,
                             rtol=1e-9)
  # 2x2: Tr(A^{1/2}) = sqrt(Tr A + 2 sqrt(det A)) for A with eigenvalues >= 0.
  s1, s2 = _random_covariance(rng, 2), _random_covariance(rng, 2)
  product = s1 @ s2
  np.testing.assert_allclose(
      metrics.trace_sqrt_product(s1, s2),
      np.sqrt(np.trace(product) + 2.0 * np.sqrt(np.linalg.det(product))),
      rtol=1e-10)


def test_fid_of_gaussian_samples_matches_the_true_distance():
  rng = np.random.default_rng(3)
  d, n, repeats = 4, 20000, 8
  s1 = _random_covariance(rng, d) + 0.1 * np.eye(d)
  s2 = _random_covariance(rng, d) + 0.1 * np.eye(d)
  mu1, mu2 = 0.5 * rng.normal(size=d), 0.5 * rng.normal(size=d)
  true = metrics.frechet_distance(mu1, s1, mu2, s2)
  estimates = []
  for r in range(repeats):
    draw = np.random.default_rng(100 + r)
    estimates.append(metrics.fid(draw.multivariate_normal(mu1, s1, n),
                                 draw.multivariate_normal(mu2, s2, n)))
  # Sampling error of the mean, plus the O(D/N) upward bias of the estimator.
  tolerance = (4.0 * np.std(estimates, ddof=1) / np.sqrt(repeats)
               + (np.trace(s1) + np.trace(s2)) * d / n)
  assert tolerance < 0.03 * true  # the check has teeth
  assert abs(np.mean(estimates) - true) < tolerance


def test_fid_is_invariant_to_permuting_samples():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(150, 16))
  value = metrics.fid(a, b)
  np.testing.assert_allclose(metrics.fid(a[rng.permutation(200)],
                                         b[rng.permutation(150)]),
                             value, rtol=1e-10)
  np.testing.assert_allclose(metrics.fid(b, a), value, rtol=1e-10)


def test_feature_statistics_match_numpy():
  x = np.random.default_rng(5).normal(size=(5000, 7)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x)  # more rows than one chunk
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64),
                                           rowvar=False), rtol=1e-10)


def test_metric_input_checks():
  a = np.zeros((10, 3))
  with pytest.raises(ValueError, match="dimension"):
    metrics.fid(a, np.zeros((10, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.fid(a[:1], a)
  with pytest.raises(ValueError, match="non-finite"):
    metrics.kid(np.full((10, 3), np.nan), a)
  with pytest.raises(ValueError, match=r"\[D, D\]"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ---------------------------------------------------------------------------
# KID.


def test_kid_with_one_full_subset_equals_the_direct_formula():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(7, 3))
  k = lambda u, v: (u @ v / 3 + 1.0) ** 3  # noqa: E731
  m = 7
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  expected = (xx + yy) / (m * (m - 1)) - 2.0 * xy / m**2
  value, se = metrics.kid(x, y, num_subsets=1, subset_size=m)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  assert np.isnan(se)


def _kid_replicates(shift, repeats=200, n=60, d=8):
  means = []
  for r in range(repeats):
    rng = np.random.default_rng(1000 + r)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) + shift
    means.append(metrics.kid(x, y, num_subsets=5, subset_size=30, seed=r)[0])
  return np.asarray(means)


def test_kid_is_unbiased_for_one_distribution():
  means = _kid_replicates(shift=0.0)
  z = means.mean() / (means.std(ddof=1) / np.sqrt(len(means)))
  assert abs(z) < 3.5, z
  # The same z-test rejects the biased V-statistic (diagonal kept in), so
  # it can tell an unbiased estimator from a biased one.
  biased = []
  for r in range(50):
    rng = np.random.default_rng(1000 + r)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    kxx, kyy, kxy = ((p @ q.T / 8 + 1.0) ** 3 for p, q in
                     ((x, x), (y, y), (x, y)))
    biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
  biased = np.asarray(biased)
  assert biased.mean() / (biased.std(ddof=1) / np.sqrt(50)) > 10


def test_kid_is_positive_for_different_distributions():
  means = _kid_replicates(shift=0.5, repeats=20)
  assert means.mean() / (means.std(ddof=1) / np.sqrt(20)) > 5
  rng = np.random.default_rng(7)
  value, se = metrics.kid(rng.normal(size=(400, 8)),
                          rng.normal(0.5, 1.0, size=(400, 8)),
                          num_subsets=20, subset_size=200)
  assert value > 10 * se > 0


def test_kid_is_invariant_to_permuting_samples():
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(120, 10)), rng.normal(0.2, 1.0, size=(90, 10))
  a[5] = a[17]  # repeated rows are interchangeable
  value = metrics.kid(a, b, num_subsets=10, subset_size=50, seed=3)
  assert metrics.kid(a[rng.permutation(120)], b[rng.permutation(90)],
                     num_subsets=10, subset_size=50, seed=3) == value
  assert metrics.kid(a, b, num_subsets=10, subset_size=50, seed=4) != value


# ---------------------------------------------------------------------------
# Reference statistics files.


def test_reference_round_trip_and_scores(tmp_path):
  rng = np.random.default_rng(9)
  ref_features = rng.normal(size=(300, 6)).astype(np.float32)
  path = str(tmp_path / "sub" / "ref.npz")
  saved = metrics.save_reference(path, ref_features, {"extractor": "x"})
  loaded = metrics.load_reference(path)
  np.testing.assert_array_equal(loaded.mu, saved.mu)
  np.testing.assert_array_equal(loaded.sigma, saved.sigma)
  np.testing.assert_array_equal(loaded.features, ref_features)
  assert loaded.metadata == {"extractor": "x", "num_examples": 300,
                             "feature_dim": 6}
  samples = rng.normal(0.3, 1.0, size=(200, 6))
  scores = metrics.score_against_reference(samples, loaded, kid_subsets=10,
                                           kid_subset_size=100)
  np.testing.assert_allclose(scores["fid"], metrics.fid(samples, ref_features),
                             rtol=1e-6)
  assert scores["kid"] == metrics.kid(samples, ref_features, 10, 100)[0]
  # A pytorch-fid statistics file: only mu and sigma; KID is then NaN.
  np.savez(tmp_path / "pytorch_fid.npz", mu=saved.mu, sigma=saved.sigma)
  stats_only = metrics.load_reference(str(tmp_path / "pytorch_fid.npz"))
  assert stats_only.features is None
  assert np.isnan(metrics.score_against_reference(samples, stats_only)["kid"])
  with pytest.raises(ValueError, match="another feature extractor"):
    metrics.score_against_reference(samples[:, :5], loaded)
  with pytest.raises(FileNotFoundError, match="fid_reference.py"):
    metrics.load_reference(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------
# The digit classifier.

TINY = classifier.ClassifierSettings(num_steps=3, batch_size=16,
                                     conv_features=(4, 8), hidden_size=16)


def _subset(source, start, count):
  batch = source.get(np.arange(start, start + count))
  return data.ArraySource(batch["image"], batch["label"])


def test_classifier_is_cached_and_reloaded(tmp_path, monkeypatch, capsys):
  train = _subset(data.embedded_mnist("train"), 0, 200)
  test = _subset(data.embedded_mnist("test"), 0, 100)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  first = classifier.mnist_classifier(train, test, settings=TINY, seed=0)
  cache_dir = tmp_path / "xdg" / "gm_jax" / "feature_extractors"
  files = os.listdir(cache_dir)
  assert files == [os.path.basename(first.metadata["cache_path"])]
  assert "Trained" in capsys.readouterr().out
  with np.load(cache_dir / files[0]) as contents:
    recorded = json.loads(str(contents["metadata"]))
  assert 0.0 <= recorded["test_accuracy"] <= 1.0
  assert recorded["num_test"] == 100 and recorded["train_seconds"] > 0

  images = test.get(np.arange(100))["image"]
  out = first.features(images)
  assert out.shape == (100, first.feature_dim) == (100, 16)
  assert out.dtype == np.float32 and first.image_shape == (28, 28, 1)
  # Floats in [0, 1] are quantised to the same 8-bit images.
  np.testing.assert_array_equal(first.features(images / 255.0), out)

  # Reused through an explicit cache_dir: the same features, bit for bit.
  second = classifier.mnist_classifier(train, test, settings=TINY, seed=0,
                                       cache_dir=str(cache_dir))
  assert "Loaded" in capsys.readouterr().out
  np.testing.assert_array_equal(second.features(images), out)
  assert second.metadata["id"] == first.metadata["id"]
  assert os.listdir(cache_dir) == files
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    first.features(np.zeros((2, 32, 32, 1), np.uint8))


def test_classifier_cache_key_depends_on_data_seed_and_settings():
  source = data.embedded_mnist("test")
  batch = source.get(np.arange(200))
  fingerprint = classifier.data_fingerprint(batch["image"], batch["label"])
  key = classifier.cache_key(fingerprint, 10, TINY, 0)
  assert classifier.cache_key(fingerprint, 10, TINY, 0) == key
  other_images = batch["image"].copy()
  other_images[0, 0, 0, 0] ^= 1  # one pixel
  others = [
      classifier.cache_key(fingerprint, 10, TINY, 1),
      classifier.cache_key(
          classifier.data_fingerprint(other_images, batch["label"]), 10,
          TINY, 0),
      classifier.cache_key(
          classifier.data_fingerprint(batch["image"], batch["label"][::-1]),
          10, TINY, 0),
      classifier.cache_key(fingerprint, 10,
                           classifier.ClassifierSettings(num_steps=4), 0),
  ]
  assert len({key, *others}) == 5


def test_classifier_needs_labels():
  images = np.zeros((8, 28, 28, 1), np.uint8)
  unlabelled = data.ArraySource(images, np.zeros(8, np.int32))
  with pytest.raises(ValueError, match="at least 2 classes"):
    classifier.mnist_classifier(unlabelled, settings=TINY, verbose=False)


# ---------------------------------------------------------------------------
# The FID Inception network.


def _reference_convs():
  """(name, in, out, kh, kw) of every conv in pytorch-fid's FID Inception,
  transcribed from torchvision's Inception3 and InceptionA-E (independently
  of gm_jax's module)."""
  convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
           ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
           ("Conv2d_4a_3x3", 80, 192, 3, 3)]

  def block(name, rows):
    convs.extend((f"{name}.{r[0]}", *r[1:]) for r in rows)

  for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64),
                          ("Mixed_5d", 288, 64)):
    block(name, [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1),
                 ("branch5x5_2", 48, 64, 5, 5),
                 ("branch3x3dbl_1", cin, 64, 1, 1),
                 ("branch3x3dbl_2", 64, 96, 3, 3),
                 ("branch3x3dbl_3", 96, 96, 3, 3),
                 ("branch_pool", cin, pool, 1, 1)])
  block("Mixed_6a", [("branch3x3", 288, 384, 3, 3),
                     ("branch3x3dbl_1", 288, 64, 1, 1),
                     ("branch3x3dbl_2", 64, 96, 3, 3),
                     ("branch3x3dbl_3", 96, 96, 3, 3)])
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                   ("Mixed_6e", 192)):
    block(name, [("branch1x1", 768, 192, 1, 1),
                 ("branch7x7_1", 768, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
                 ("branch7x7_3", c7, 192, 7, 1),
                 ("branch7x7dbl_1", 768, c7, 1, 1),
                 ("branch7x7dbl_2", c7, c7, 7, 1),
                 ("branch7x7dbl_3", c7, c7, 1, 7),
                 ("branch7x7dbl_4", c7, c7, 7, 1),
                 ("branch7x7dbl_5", c7, 192, 1, 7),
                 ("branch_pool", 768, 192, 1, 1)])
  block("Mixed_7a", [("branch3x3_1", 768, 192, 1, 1),
                     ("branch3x3_2", 192, 320, 3, 3),
                     ("branch7x7x3_1", 768, 192, 1, 1),
                     ("branch7x7x3_2", 192, 192, 1, 7),
                     ("branch7x7x3_3", 192, 192, 7, 1),
                     ("branch7x7x3_4", 192, 192, 3, 3)])
  for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    block(name, [("branch1x1", cin, 320, 1, 1),
                 ("branch3x3_1", cin, 384, 1, 1),
                 ("branch3x3_2a", 384, 384, 1, 3),
                 ("branch3x3_2b", 384, 384, 3, 1),
                 ("branch3x3dbl_1", cin, 448, 1, 1),
                 ("branch3x3dbl_2", 448, 384, 3, 3),
                 ("branch3x3dbl_3a", 384, 384, 1, 3),
                 ("branch3x3dbl_3b", 384, 384, 3, 1),
                 ("branch_pool", cin, 192, 1, 1)])
  return convs


def _reference_shapes():
  """The pytorch-fid state dict's shapes (without fc), torch layout."""
  shapes = {}
  for name, cin, cout, kh, kw in _reference_convs():
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{leaf}"] = (cout,)
  return shapes


def _random_state_dict(seed=0, shapes=None):
  """Random torch-layout weights (with fc and num_batches_tracked, as a
  real file may have)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in (shapes or _reference_shapes()).items():
    if key.endswith("conv.weight"):
      fan_in = np.prod(shape[1:])
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith(("bn.weight", "running_var")):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    state[key] = value.astype(np.float32)
  return state


@pytest.fixture(scope="module")
def inception_state():
  state = _random_state_dict()
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros(1008, np.float32)
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
  return state


def test_inception_parameter_shapes_and_count_match_the_reference():
  flat = traverse_util.flatten_dict(inception.variable_shapes())
  ours = {}
  for path, value in flat.items():
    shape = value.shape
    if path[-1] == "kernel":  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    ours[inception.torch_key(path)] = tuple(shape)
  assert ours == _reference_shapes()
  assert len(_reference_convs()) == 94
  num_params = sum(int(np.prod(v.shape)) for path, v in flat.items()
                   if path[0] == "params")
  from_table = sum(cout * cin * kh * kw + 2 * cout
                   for _, cin, cout, kh, kw in _reference_convs())
  assert num_params == from_table == 21_785_568
  # torchvision's inception_v3 (documented: 27,161,264 parameters) adds a
  # 2048 -> 1000 fc layer and the auxiliary classifier (1x1 conv 768 -> 128,
  # 5x5 conv 128 -> 768, each with BatchNorm, and a 768 -> 1000 fc).
  aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + 768 * 1000 + 1000
  assert num_params + 2048 * 1000 + 1000 + aux == 27_161_264


def test_inception_runs_on_random_weights(inception_state):
  variables = inception.variables_from_state_dict(inception_state)
  extractor = inception.inception_extractor(variables=variables, batch_size=2,
                                            resize_to=None)
  rng = np.random.default_rng(0)
  size = inception.MIN_INPUT_SIZE
  images = rng.integers(0, 256, (3, size, size, 3), np.uint8)
  out = extractor.features(images)  # two batches, the last one padded
  assert out.shape == (3, 2048) and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and np.all(out >= 0)  # means of ReLUs
  assert not np.allclose(out[0], out[1])
  # Grey images enter the network as RGB with three equal channels.
  grey = images[:, :, :, :1]
  np.testing.assert_array_equal(
      inception.preprocess(grey, None),
      inception.preprocess(np.repeat(grey, 3, -1), None))


@pytest.mark.slow
def test_inception_full_size_on_cifar_sized_images(inception_state):
  variables = inception.variables_from_state_dict(inception_state)
  extractor = inception.inception_extractor(variables=variables, batch_size=2)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  out = extractor.features(images)
  assert out.shape == (2, 2048) and np.all(np.isfinite(out))


def _torch_conv(x, w, stride, pad):
  """torch.nn.functional.conv2d for NCHW x and OIHW w, in NumPy."""
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  kh, kw = w.shape[2:]
  out_h = (x.shape[2] - kh) // stride + 1
  out_w = (x.shape[3] - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      window = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
      out = out + np.einsum("nchw,oc->nohw", window, w[:, :, i, j])
  return out


@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 3), 2, (0, 0)), ((1, 7), 1, (0, 3)), ((3, 1), 1, (1, 0))])
def test_loaded_conv_layers_compute_what_torch_computes(kernel, stride,
                                                        padding):
  """The OIHW -> HWIO mapping and BatchNorm(eps=1e-3) reproduce torch's
  Conv2d -> BatchNorm2d -> ReLU on the same state dict."""
  cin, cout = 3, 5
  state = _random_state_dict(1, {
      "conv.weight": (cout, cin) + kernel,
      **{f"bn.{k}": (cout,) for k in ("weight", "bias", "running_mean",
                                      "running_var")}})
  layer = inception.BasicConv2d(cout, kernel, stride, padding)
  x = np.random.default_rng(2).normal(size=(2, 9, 11, cin)).astype(np.float32)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  variables = inception.variables_from_state_dict(state, shapes=shapes)
  got = np.asarray(layer.apply(variables, x))  # NHWC
  conv = _torch_conv(x.transpose(0, 3, 1, 2).astype(np.float64),
                     state["conv.weight"].astype(np.float64), stride, padding)
  bn = lambda k: state[f"bn.{k}"][None, :, None, None]  # noqa: E731
  expected = np.maximum(
      (conv - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3)
      * bn("weight") + bn("bias"), 0.0).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fid_average_pool_ignores_padding():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  pooled = np.asarray(inception._avg_pool_3x3(x))[0, :, :, 0]
  assert pooled[0, 0] == np.mean([0, 1, 4, 5])  # 4 valid pixels, not 9
  assert pooled[1, 1] == np.mean(x[0, :3, :3, 0])


def _torch_bilinear(x, out_h, out_w):
  """F.interpolate(mode="bilinear", align_corners=False) on NHWC, NumPy."""
  def axis_weights(size_in, size_out):
    src = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5,
                     0.0)
    low = np.minimum(np.floor(src).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, src - low
  low, high, frac = axis_weights(x.shape[1], out_h)
  x = (x[:, low] * (1 - frac)[None, :, None, None]
       + x[:, high] * frac[None, :, None, None])
  low, high, frac = axis_weights(x.shape[2], out_w)
  return (x[:, :, low] * (1 - frac)[None, None, :, None]
          + x[:, :, high] * frac[None, None, :, None])


@pytest.mark.parametrize("size_in, size_out", [(8, 13), (13, 8), (32, 299)])
def test_preprocess_resizes_like_torch_bilinear(size_in, size_out):
  images = np.random.default_rng(3).integers(
      0, 256, (2, size_in, size_in, 3), np.uint8)
  got = np.asarray(inception.preprocess(images, size_out))
  expected = 2.0 * _torch_bilinear(images / 255.0, size_out, size_out) - 1.0
  # float32 rounding is ~1e-6; a half-pixel misalignment would be ~1e-2.
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_npz_weights_land_in_the_right_flax_params(tmp_path, inception_state):
  path = str(tmp_path / "weights.npz")
  np.savez(path, **inception_state)
  variables = inception.load_variables(path)
  params, stats = variables["params"], variables["batch_stats"]
  torch_kernel = inception_state["Mixed_6b.branch7x7_2.conv.weight"]
  assert torch_kernel.shape == (128, 128, 1, 7)
  np.testing.assert_array_equal(
      params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
      torch_kernel.transpose(2, 3, 1, 0))  # OIHW -> HWIO: (1, 7, 128, 128)
  bn = "Mixed_7c.branch_pool.bn"
  np.testing.assert_array_equal(
      params["Mixed_7c"]["branch_pool"]["bn"]["scale"],
      inception_state[f"{bn}.weight"])
  np.testing.assert_array_equal(
      params["Mixed_7c"]["branch_pool"]["bn"]["bias"],
      inception_state[f"{bn}.bias"])
  np.testing.assert_array_equal(stats["Mixed_7c"]["branch_pool"]["bn"]["mean"],
                                inception_state[f"{bn}.running_mean"])
  np.testing.assert_array_equal(stats["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                inception_state[f"{bn}.running_var"])
  # Every array round-trips exactly.
  back = inception.state_dict_from_variables(variables)
  assert set(back) == set(_reference_shapes())
  for key, value in back.items():
    np.testing.assert_array_equal(value, inception_state[key])


def _fake_torch(monkeypatch):
  """Modules named torch / torch._utils whose objects pickle under the names
  torch uses, so a test can write .pth files the way torch.save does."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: only pickled")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in ("FloatStorage", "LongStorage", "DoubleStorage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch, utils


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage",
                  np.dtype(np.int64): "LongStorage",
                  np.dtype(np.float64): "DoubleStorage"}


def _write_pth(path, state, layout, monkeypatch, shared_storage=False):
  """torch.save(state) in the zip or the legacy layout, without torch.

  With ``shared_storage``, all float32 tensors are views (at increasing
  offsets) of one storage, as tensors sliced from one buffer would be.
  """
  torch, utils = _fake_torch(monkeypatch)
  storages = {}  # key -> (storage type, flat array)

  class Storage:
    def __init__(self, key):
      self.key = key

  class Tensor:
    def __init__(self, storage, offset, shape):
      self.args = (storage, offset, shape,
                   tuple(int(np.prod(shape[i + 1:])) for i in
                         range(len(shape))))

    def __reduce__(self):
      return (utils._rebuild_tensor_v2,
              self.args + (False, collections.OrderedDict()))

  objects = collections.OrderedDict()
  shared = []
  for name, value in state.items():
    value = np.asarray(value)
    if shared_storage and value.dtype == np.float32:
      offset = sum(v.size for v in shared)
      shared.append(value.ravel())
      objects[name] = Tensor(Storage("shared"), offset, value.shape)
    else:
      key = str(len(storages))
      storages[key] = (getattr(torch, _STORAGE_NAMES[value.dtype]),
                       value.ravel())
      objects[name] = Tensor(Storage(key), 0, value.shape)
  if shared:
    storages["shared"] = (torch.FloatStorage, np.concatenate(shared))

  def persistent_id(obj):
    if not isinstance(obj, Storage):
      return None
    storage_type, flat = storages[obj.key]
    saved = ("storage", storage_type, obj.key, "cpu", flat.size)
    return saved + ((None,) if layout == "legacy" else ())

  def dump(obj, stream):
    pickler = pickle.Pickler(stream, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(obj)

  if layout == "zip":
    buffer = io.BytesIO()
    dump(objects, buffer)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
      archive.writestr("archive/data.pkl", buffer.getvalue())
      archive.writestr("archive/byteorder", "little")
      for key, (_, flat) in storages.items():
        little = flat.astype(flat.dtype.newbyteorder("<"))
        archive.writestr(f"archive/data/{key}", little.tobytes())
      archive.writestr("archive/version", "3\n")
  else:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001,
                     {"protocol_version": 1001, "little_endian": True,
                      "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(header, f, protocol=2)
      dump(objects, f)
      keys = sorted(storages)
      pickle.dump(keys, f, protocol=2)
      for key in keys:
        flat = storages[key][1]
        f.write(np.int64(flat.size).tobytes())
        f.write(flat.tobytes())
  monkeypatch.delitem(sys.modules, "torch")
  monkeypatch.delitem(sys.modules, "torch._utils")


@pytest.mark.parametrize("layout, shared", [("zip", False), ("legacy", False),
                                            ("zip", True), ("legacy", True)])
def test_pth_reader_reads_both_torch_layouts(tmp_path, monkeypatch, layout,
                                             shared):
  rng = np.random.default_rng(4)
  state = {"a.conv.weight": rng.normal(size=(4, 3, 1, 7)).astype(np.float32),
           "a.bn.weight": rng.normal(size=4).astype(np.float32),
           "a.bn.num_batches_tracked": np.array(7, np.int64),
           "b": rng.normal(size=(2, 5)),  # float64
           "c": rng.normal(size=(3,)).astype(np.float32)}
  path = str(tmp_path / f"w_{layout}.pth")
  _write_pth(path, state, layout, monkeypatch, shared_storage=shared)
  assert "torch" not in sys.modules
  loaded = inception.read_torch_state_dict(path)
  assert list(loaded) == list(state)
  for key, value in state.items():
    assert loaded[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded[key], value)


def test_pth_weights_file_loads_into_flax(tmp_path, monkeypatch,
                                          inception_state):
  path = str(tmp_path / inception.WEIGHTS_FILE)
  _write_pth(path, inception_state, "zip", monkeypatch)
  variables = inception.load_variables(path)
  np.testing.assert_array_equal(
      variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
      inception_state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
  converted = str(tmp_path / "converted.npz")
  inception.convert_weights(path, converted)
  again = inception.load_variables(converted)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_weight_errors_are_one_clear_line(tmp_path, monkeypatch,
                                          inception_state):
  missing = str(tmp_path / "nowhere" / inception.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError) as error:
    inception.inception_extractor(missing)
  message = str(error.value)
  assert "\n" not in message and missing in message
  assert inception.WEIGHTS_URL in message

  bad = dict(inception_state)
  bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3),
                                                   np.float32)
  del bad["Mixed_7c.branch_pool.bn.running_var"]
  path = str(tmp_path / "bad.npz")
  np.savez(path, **bad)
  with pytest.raises(ValueError) as error:
    inception.load_variables(path)
  message = str(error.value)
  assert "\n" not in message and path in message
  assert "Mixed_5b.branch1x1.conv.weight has shape (64, 192, 3, 3)" in message
  assert "missing Mixed_7c.branch_pool.bn.running_var" in message

  imagenet = dict(inception_state)  # torchvision's ImageNet checkpoint
  imagenet["fc.weight"] = np.zeros((1000, 2048), np.float32)
  imagenet["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1),
                                                     np.float32)
  with pytest.raises(ValueError, match="unexpected keys such as AuxLogits"):
    inception.variables_from_state_dict(imagenet, "imagenet.pth")

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))
  evil = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(evil, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
  with pytest.raises(ValueError, match="refusing"):
    inception.read_torch_state_dict(evil)


# ---------------------------------------------------------------------------
# Reference statistics of a split, and the script.


def test_compute_reference_reuses_an_up_to_date_file(tmp_path, capsys):
  config = config_lib.load("configs/vae_mnist.py")
  rng = np.random.default_rng(0)
  projection = rng.normal(size=(784, 8)).astype(np.float32)

  def project(images):
    return features.to_uint8(images).reshape(len(images), -1) @ projection
  extractor = features.FeatureExtractor("projection", (28, 28, 1), 8, project,
                                        {"id": "projection-0"})
  path = str(tmp_path / "ref.npz")
  first = reference.compute_reference(extractor, config.data, "test", path,
                                      num_examples=50)
  assert "Wrote" in capsys.readouterr().out
  assert first.features.shape == (50, 8)
  assert first.metadata["data"]["split"] == "test"
  again = reference.compute_reference(extractor, config.data, "test", path,
                                      num_examples=50)
  assert "up to date" in capsys.readouterr().out
  np.testing.assert_array_equal(again.sigma, first.sigma)
  other = reference.compute_reference(extractor, config.data, "test", path,
                                      num_examples=60)  # other images
  assert other.features.shape == (60, 8)
  assert "Wrote" in capsys.readouterr().out
  with open(path, "wb") as f:  # a truncated file is a stale cache entry
    f.write(b"PK\x03\x04 truncated")
  reference.compute_reference(extractor, config.data, "test", path,
                              num_examples=50)
  assert "Recomputing" in capsys.readouterr().out
  assert metrics.load_reference(path).features.shape == (50, 8)


def test_fid_reference_script_on_the_embedded_digits(tmp_path):
  out = tmp_path / "refs" / "mnist_test.npz"
  env = script_env(PYTHONPATH=REPO, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  command = [sys.executable, "scripts/fid_reference.py",
             "--config=configs/vae_mnist.py", "--split=test",
             f"--out={out}", "--classifier_steps=3", "--num_examples=100"]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "test accuracy" in proc.stdout and "Wrote" in proc.stdout
  saved = metrics.load_reference(str(out))
  assert saved.features.shape == (100, 128)  # the default hidden size
  assert saved.metadata["extractor"] == "mnist_classifier"
  assert saved.metadata["num_examples"] == 100
  cached = os.listdir(tmp_path / "xdg" / "gm_jax" / "feature_extractors")
  assert [f"{saved.metadata['extractor_id']}.npz"] == cached

  missing = command[:2] + ["--config=configs/diffusion_cifar10.py",
                           f"--out={tmp_path / 'c.npz'}",
                           f"--weights={tmp_path / 'none.pth'}"]
  proc = subprocess.run(missing, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.count("\n") == 1 and "none.pth" in proc.stderr
