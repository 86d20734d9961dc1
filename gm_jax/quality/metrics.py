"""Sample-quality metrics over feature arrays: FID and KID.

Both compare two sets of image features ``[N, D]`` (from any feature
extractor, see ``gm_jax.quality.features``) and are pure host functions of
NumPy arrays, computed in float64:

* FID (Heusel et al., 2017) fits a Gaussian to each set and returns the
  Frechet (2-Wasserstein) distance between the two Gaussians,

    FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

* KID (Binkowski et al., 2018) is the unbiased estimate of the squared
  maximum mean discrepancy with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets.

Reference statistics of a dataset (mean, covariance and, for KID, the
features) are saved to and loaded from ``.npz`` files; files written by
pytorch-fid (keys ``mu`` and ``sigma``) load too.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

# Rows per chunk when accumulating the covariance: bounds the float64 copy.
_STATISTICS_CHUNK = 4096


def _check_features(features: Any, name: str) -> np.ndarray:
  """Returns ``features`` as a 2-D array; raises on bad shape or values."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(
        f"{name} must be a 2-D array [N, D], got shape {features.shape}.")
  if not np.issubdtype(features.dtype, np.number):
    raise TypeError(f"{name} must be numeric, got dtype {features.dtype}.")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} holds non-finite values (NaN or inf).")
  return features


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """The mean and the unbiased covariance of a feature set, in float64.

    mu = 1/N sum_n x_n,   sigma = 1/(N - 1) sum_n (x_n - mu)(x_n - mu)^T

  (``np.cov(features, rowvar=False)``, as pytorch-fid), accumulated in chunks
  of rows so that a large float32 set is never copied whole to float64.

  Args:
    features: [N, D] with N >= 2, any real dtype.

  Returns:
    mu: float64 [D].
    sigma: float64 [D, D], symmetric positive semi-definite.
  """
  features = _check_features(features, "features")
  n, d = features.shape
  if n < 2:
    raise ValueError(f"A covariance needs at least 2 examples, got {n}.")
  mu = np.zeros(d, np.float64)
  for start in range(0, n, _STATISTICS_CHUNK):
    mu += features[start:start + _STATISTICS_CHUNK].sum(0, dtype=np.float64)
  mu /= n
  # Centering first (two passes) avoids the cancellation of E[xx^T] - mu mu^T.
  scatter = np.zeros((d, d), np.float64)
  for start in range(0, n, _STATISTICS_CHUNK):
    centred = features[start:start + _STATISTICS_CHUNK].astype(np.float64) - mu
    scatter += centred.T @ centred
  sigma = scatter / (n - 1)
  return mu, (sigma + sigma.T) / 2


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """The symmetric square root of a PSD matrix via eigh.

  Eigenvalues below D eps lambda_max (numpy's matrix_rank tolerance) are
  set to 0: there they are rounding noise (a rank-deficient covariance
  comes out with eigenvalues of +-1e-16 lambda_max), and their square roots,
  about 1e-8, would otherwise enter the trace.
  """
  eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
  tolerance = (sigma.shape[0] * np.finfo(np.float64).eps
               * max(float(eigenvalues[-1]), 0.0))
  eigenvalues = np.where(eigenvalues > tolerance, eigenvalues, 0.0)
  return (vectors * np.sqrt(eigenvalues)) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((S1 S2)^{1/2}) for PSD S1, S2, as the nuclear norm of S1^{1/2} S2^{1/2}.

  With A = S1^{1/2} S2^{1/2}, A A^T = S1^{1/2} S2 S1^{1/2} is similar to
  S1 S2, so the eigenvalues of S1 S2 are the squared singular values of A and

    Tr((S1 S2)^{1/2}) = sum_i sigma_i(A) = ||S1^{1/2} S2^{1/2}||_*.

  Why this form: it holds for singular (rank-deficient, N < D) covariances
  with no eps offset, is always real, and each singular value carries an
  absolute error of about eps ||S||. Taking square roots of the eigenvalues
  of S1^{1/2} S2 S1^{1/2} instead, or scipy.linalg.sqrtm of the non-symmetric
  S1 S2 (pytorch-fid), loses half the digits of the near-zero eigenvalues:
  FID of a 600 x 2048 feature set with itself comes out -5e-8 x Tr(S) with
  those and -3e-15 x Tr(S) with this form. Cost: two eigh and one SVD of
  D x D in float64.

  Args:
    sigma1, sigma2: float [D, D], symmetric positive semi-definite.

  Returns:
    The trace, a Python float.
  """
  product = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
  return float(np.linalg.svd(product, compute_uv=False).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})

  computed in float64 on the host (see ``trace_sqrt_product`` for the matrix
  square root). This is the squared 2-Wasserstein distance; FID reports it
  without the square root.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances, symmetric positive semi-definite.

  Returns:
    The distance, a Python float (>= 0 up to rounding).

  Raises:
    ValueError: on inconsistent shapes or non-finite values.
  """
  mu1, mu2 = (np.asarray(m, np.float64) for m in (mu1, mu2))
  sigma1, sigma2 = (np.asarray(s, np.float64) for s in (sigma1, sigma2))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(
        f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and"
        f" {mu2.shape}.")
  d = mu1.shape[0]
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    if sigma.shape != (d, d):
      raise ValueError(
          f"{name} must be [D, D] = [{d}, {d}] to match the means, got"
          f" {sigma.shape}.")
  for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1),
                      ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} holds non-finite values (NaN or inf).")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(features_a: Any, features_b: Any) -> float:
  """Frechet Inception Distance between two feature sets.

  The Frechet distance between the Gaussians fitted to each set by
  ``feature_statistics`` (mean and unbiased covariance).

  Args:
    features_a: [N_a, D], N_a >= 2.
    features_b: [N_b, D], N_b >= 2.

  Returns:
    FID, a Python float. FID is biased upward for finite N (roughly by
    O(D / N)), so compare scores computed with the same N.
  """
  features_a = _check_features(features_a, "features_a")
  features_b = _check_features(features_b, "features_b")
  if features_a.shape[1] != features_b.shape[1]:
    raise ValueError(
        f"Feature sets differ in dimension: {features_a.shape[1]} and"
        f" {features_b.shape[1]}.")
  return frechet_distance(*feature_statistics(features_a),
                          *feature_statistics(features_b))


def _canonical_order(features: np.ndarray) -> np.ndarray:
  """Indices that sort the rows by their bytes: an order that depends only
  on the multiset of rows (equal rows tie, and are interchangeable)."""
  rows = np.ascontiguousarray(features).view(
      np.dtype((np.void, features.dtype.itemsize * features.shape[1])))
  return np.argsort(rows.ravel(), kind="stable")


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """The unbiased MMD^2 U-statistic of x, y [m, D] with the cubic kernel."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1.0) ** 3  # [m, m]
  k_yy = (y @ y.T / d + 1.0) ** 3  # [m, m]
  k_xy = (x @ y.T / d + 1.0) ** 3  # [m, m]
  # The diagonals k(x_i, x_i) are left out: they would bias the estimate up.
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy))
  return float(within / (m * (m - 1)) - 2.0 * k_xy.mean())


def kid(features_a: Any, features_b: Any, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD^2 with a cubic kernel.

  For each of ``num_subsets`` subsets, m = min(subset_size, N_a, N_b) rows
  are drawn without replacement from each set (x from a, y from b) and

    MMD^2 = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)]
            - 2/m^2 sum_{i, j} k(x_i, y_j),   k(x, y) = (x.y / D + 1)^3,

  whose expectation is the population MMD^2 (0 when both sets come from one
  distribution; the estimate can then be negative). The subset estimates are
  averaged.

  The rows are put in a canonical order (sorted by their bytes) before the
  subsets are drawn, so the result depends only on the two multisets of rows
  and the seed: permuting either input gives the same numbers exactly.

  Args:
    features_a: [N_a, D], N_a >= 2.
    features_b: [N_b, D], N_b >= 2.
    num_subsets: subsets to average over, >= 1.
    subset_size: rows per subset (capped at N_a and N_b), >= 2.
    seed: seed of the subset draws (numpy.random.default_rng).

  Returns:
    (mean, standard_error): the mean of the subset estimates and its
    standard error std / sqrt(num_subsets) (ddof = 1; NaN for one subset).
    The standard error measures the spread of the subset estimates around
    their mean, given these features; it does not include the variation from
    drawing new features, and subsets may share rows.
  """
  features_a = _check_features(features_a, "features_a").astype(np.float64)
  features_b = _check_features(features_b, "features_b").astype(np.float64)
  if features_a.shape[1] != features_b.shape[1]:
    raise ValueError(
        f"Feature sets differ in dimension: {features_a.shape[1]} and"
        f" {features_b.shape[1]}.")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
  m = min(subset_size, features_a.shape[0], features_b.shape[0])
  if m < 2:
    raise ValueError(
        "KID needs subsets of at least 2 rows: got subset_size="
        f"{subset_size} with {features_a.shape[0]} and"
        f" {features_b.shape[0]} rows.")
  features_a = features_a[_canonical_order(features_a)]
  features_b = features_b[_canonical_order(features_b)]
  rng = np.random.default_rng(seed)
  estimates = np.empty(num_subsets, np.float64)
  for s in range(num_subsets):
    rows_a = rng.choice(features_a.shape[0], m, replace=False)
    rows_b = rng.choice(features_b.shape[0], m, replace=False)
    estimates[s] = _polynomial_mmd2(features_a[rows_a], features_b[rows_b])
  if num_subsets == 1:
    return float(estimates[0]), float("nan")
  return (float(estimates.mean()),
          float(estimates.std(ddof=1) / np.sqrt(num_subsets)))


class Reference(NamedTuple):
  """Reference statistics of a dataset split, as saved by ``save_reference``.

  Attributes:
    mu: float64 [D], the features' mean.
    sigma: float64 [D, D], their unbiased covariance.
    features: float32 [N, D] (for KID), or None when the file has only the
      statistics (e.g. a pytorch-fid .npz).
    metadata: what produced them (extractor, data, split, N, ...).
  """

  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray]
  metadata: Mapping[str, Any]


def save_reference(path: str, features: Any,
                   metadata: Optional[Mapping[str, Any]] = None,
                   keep_features: bool = True) -> Reference:
  """Computes a feature set's statistics and saves them to ``path`` (.npz).

  The file holds ``mu`` [D] and ``sigma`` [D, D] (float64; the keys
  pytorch-fid uses), ``features`` [N, D] float32 unless ``keep_features`` is
  False, and ``metadata`` as a JSON string. It is written to a temporary
  name and renamed, so a reader never sees half a file.

  Args:
    path: the .npz file to write (parent folders are created).
    features: [N, D], N >= 2.
    metadata: JSON-serialisable facts about the features; ``num_examples``
      and ``feature_dim`` are added.
    keep_features: store the features too (KID needs them).

  Returns:
    The saved Reference.
  """
  features = _check_features(features, "features")
  mu, sigma = feature_statistics(features)
  metadata = {**dict(metadata or {}), "num_examples": int(features.shape[0]),
              "feature_dim": int(features.shape[1])}
  arrays = {"mu": mu, "sigma": sigma,
            "metadata": np.asarray(json.dumps(metadata, sort_keys=True))}
  stored = features.astype(np.float32) if keep_features else None
  if stored is not None:
    arrays["features"] = stored
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + ".tmp.npz"
  np.savez(temporary, **arrays)
  os.replace(temporary, path)
  return Reference(mu, sigma, stored, metadata)


def load_reference(path: str) -> Reference:
  """Loads a file written by ``save_reference`` (or pytorch-fid's .npz).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file lacks ``mu`` / ``sigma`` or their shapes disagree.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No reference statistics at {path}; compute them with"
        " scripts/fid_reference.py.")
  with np.load(path, allow_pickle=False) as contents:
    missing = {"mu", "sigma"} - set(contents.files)
    if missing:
      raise ValueError(
          f"{path} is not a reference-statistics file: it has no"
          f" {sorted(missing)} (keys: {sorted(contents.files)}).")
    mu = contents["mu"].astype(np.float64)
    sigma = contents["sigma"].astype(np.float64)
    features = contents["features"] if "features" in contents.files else None
    metadata = (json.loads(str(contents["metadata"]))
                if "metadata" in contents.files else {})
  d = mu.shape[0] if mu.ndim == 1 else -1
  if (d < 0 or sigma.shape != (d, d)
      or (features is not None and features.shape[1:] != (d,))):
    raise ValueError(
        f"{path}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}"
        f"{'' if features is None else f', features {features.shape}'}.")
  return Reference(mu, sigma, features, metadata)


def score_against_reference(features: Any, reference: Reference,
                            kid_subsets: int = 100,
                            kid_subset_size: int = 1000,
                            seed: int = 0) -> dict[str, float]:
  """FID and KID of a feature set (e.g. of samples) against a Reference.

  Args:
    features: [N, D], e.g. ``extractor.features(samples)``.
    reference: from ``load_reference``; KID is skipped (NaN) when it holds
      no features.
    kid_subsets, kid_subset_size, seed: see ``kid``.

  Returns:
    {"fid": float, "kid": float, "kid_se": float, "num_examples": N}.
  """
  features = _check_features(features, "features")
  if features.shape[1] != reference.mu.shape[0]:
    raise ValueError(
        f"Features of dimension {features.shape[1]} cannot be compared with"
        f" reference statistics of dimension {reference.mu.shape[0]}: were"
        " they made by another feature extractor?")
  scores = {"fid": frechet_distance(*feature_statistics(features),
                                    reference.mu, reference.sigma)}
  if reference.features is None:
    scores["kid"] = scores["kid_se"] = float("nan")
  else:
    scores["kid"], scores["kid_se"] = kid(
        features, reference.features, kid_subsets, kid_subset_size, seed)
  scores["num_examples"] = int(features.shape[0])
  return scores
