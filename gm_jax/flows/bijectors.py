"""Bijectors: invertible Flax layers with exact, cheap log-determinants.

The protocol
------------
A bijector is a ``Bijector``, a ``flax.linen.Module`` with two methods::

  forward_and_log_det(x) -> (y, log_det)   # data side -> latent side
  inverse_and_log_det(y) -> (x, log_det)

Calling it runs the forward direction, so ``bijector.apply(variables, x)``
and ``bijector.init(key, x)`` need no ``method=``.

``x`` and ``y`` are batched arrays ``[B, ...]`` (their shapes may differ, e.g.
``Squeeze``); ``log_det`` is per example, shape ``[B]``:
``log|det dy/dx|`` for the forward and ``log|det dx/dy|`` for the inverse, so
``inverse_and_log_det(forward(x))`` returns ``x`` and ``-log_det``. "Forward"
is the normalising direction (data to the Gaussian base), the one training
uses; sampling runs the inverse. To add a bijector, subclass ``Bijector``
and write these two methods; parameters that both directions need are best
created in one ``@nn.compact`` helper that both methods call (see
``ActNorm``), or in ``setup``. ``Chain`` composes bijectors and sums their
log-dets.

Class-conditional bijectors set ``takes_labels = True`` and take the class
labels ``[B]`` int32 as a second argument of both methods (``labels=None``
when unconditional); ``Chain`` passes its labels on to exactly those layers.

Every log-det here comes from a triangular (or diagonal) Jacobian structure:
element-wise maps, coupling layers (block triangular: additive, affine or
rational-quadratic spline), and the 1x1
convolution in LU form (W = P L (U + diag(s))). Nothing calls
``jnp.linalg.slogdet``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from gm_jax.convolutions import Conv, dot_general
from gm_jax.flows import splines
from gm_jax.losses import PIXEL_VALUES, sum_except_batch

Array = jax.Array

COUPLING_KINDS = ("affine", "additive", "spline")
MASKS = ("channel", "checkerboard")
SCALE_FNS = ("sigmoid", "tanh")
CONV_PARAMETERIZATIONS = ("lu", "plain")
PERMUTATIONS = ("reverse", "shuffle")
CONDITIONERS = ("plain", "glow")
# Glow multiplies the learned log-scales of its zero-initialised output
# layers by 3 (a larger effective step size for them).
GLOW_LOG_SCALE_FACTOR = 3.0


class Bijector(nn.Module):
  """The base of every bijector: the two directions, and ``__call__``."""

  # Whether the two directions take class labels as a second argument.
  takes_labels = False

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    """Returns y = f(x) [B, ...] and log|det df/dx| [B]."""
    raise NotImplementedError

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    """Returns x = f^-1(y) [B, ...] and log|det df^-1/dy| [B]."""
    raise NotImplementedError

  def __call__(self, x: Array, *args, **kwargs) -> Tuple[Array, Array]:
    """The forward direction: ``forward_and_log_det(x)``, or
    ``forward_and_log_det(x, labels)`` for a conditional bijector."""
    return self.forward_and_log_det(x, *args, **kwargs)


def _batch_constant(value: Array, batch_size: int) -> Array:
  """A per-example log-det [B] from one that does not depend on the example."""
  return jnp.broadcast_to(value, (batch_size,))


def _spatial_size(x: Array) -> int:
  """H * W for x [B, H, W, C] (the number of positions a per-channel map
  acts on)."""
  return math.prod(x.shape[1:-1])


def _random_orthogonal(seed: int, n: int) -> np.ndarray:
  """A fixed random orthogonal n x n matrix (QR of a Gaussian, sign-fixed)."""
  rng = np.random.RandomState(seed)
  q, r = np.linalg.qr(rng.randn(n, n))
  return q * np.sign(np.diag(r))[None, :]


# ----------------------------------------------------------------------------
# Composition.


class Chain(Bijector):
  """Composition: forward applies ``layers`` in order, inverse in reverse.

  log|det d(f_n o ... o f_1)/dx| = sum_i log|det df_i/dx_i| (chain rule).
  """

  layers: Sequence[nn.Module]
  takes_labels = True

  def forward_and_log_det(self, x: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    log_det = jnp.zeros((x.shape[0],), jnp.float32)
    for layer in self.layers:
      x, layer_log_det = _run(layer.forward_and_log_det, layer, x, labels)
      log_det = log_det + layer_log_det
    return x, log_det

  def inverse_and_log_det(self, y: Array,
                          labels: Optional[Array] = None
                          ) -> Tuple[Array, Array]:
    log_det = jnp.zeros((y.shape[0],), jnp.float32)
    for layer in reversed(self.layers):
      y, layer_log_det = _run(layer.inverse_and_log_det, layer, y, labels)
      log_det = log_det + layer_log_det
    return y, log_det


def _run(method, layer: nn.Module, x: Array,
         labels: Optional[Array]) -> Tuple[Array, Array]:
  """Calls one direction of ``layer``, with the labels if it takes them."""
  if getattr(layer, "takes_labels", False):
    return method(x, labels)
  return method(x)


# ----------------------------------------------------------------------------
# Preprocessing: dequantization, scaling, logit.


class UniformDequantize(Bijector):
  """Adds uniform noise to integer levels: y = x + u, u ~ U[0, 1)^D.

  Not a bijection of the reals but of the discrete data onto its bins: the
  inverse is floor (clipped to the levels). The map x -> x + u has unit
  Jacobian, so its log-det is 0; the dequantization bound
  log P(x) >= E_u log p(x + u) (each bin has volume 1 in level units) makes
  the flow's continuous likelihood of y a bound on the discrete one. Draws u
  from the Flax rng stream ``"dequantize"``.
  """

  num_bins: int = PIXEL_VALUES

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    if not self.has_rng("dequantize"):
      raise ValueError(
          "UniformDequantize draws its noise from the rng stream"
          " 'dequantize': pass a key (flow_log_prob(..., key=key), or"
          " rngs={'dequantize': key} to apply / init).")
    u = jax.random.uniform(self.make_rng("dequantize"), x.shape, jnp.float32)
    return x.astype(jnp.float32) + u, jnp.zeros((x.shape[0],), jnp.float32)

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    x = jnp.clip(jnp.floor(y), 0, self.num_bins - 1)
    return x, jnp.zeros((y.shape[0],), jnp.float32)


class ScalarAffine(Bijector):
  """y = scale * x + shift element-wise with constants; log-det = D log|scale|.

  With scale = 1 / 256 this maps dequantized levels [0, 256) to [0, 1) and
  contributes -D log 256, the D log(256) of the bits/dim accounting.
  """

  scale: float
  shift: float = 0.0

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    num_dims = math.prod(x.shape[1:])
    log_det = num_dims * math.log(abs(self.scale))
    return (x * self.scale + self.shift,
            jnp.full((x.shape[0],), log_det, jnp.float32))

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    num_dims = math.prod(y.shape[1:])
    log_det = -num_dims * math.log(abs(self.scale))
    return ((y - self.shift) / self.scale,
            jnp.full((y.shape[0],), log_det, jnp.float32))


class Logit(Bijector):
  """RealNVP's logit transform of data in [0, 1].

  p = alpha + (1 - 2 alpha) x keeps away from 0 and 1, then y = log p -
  log(1 - p). log|dy/dx| = log(1 - 2 alpha) - log p - log(1 - p) per element.
  """

  alpha: float = 0.05

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    p = self.alpha + (1.0 - 2.0 * self.alpha) * x
    y = jnp.log(p) - jnp.log1p(-p)
    log_det = math.log(1.0 - 2.0 * self.alpha) - jnp.log(p) - jnp.log1p(-p)
    return y, sum_except_batch(log_det)

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    p = jax.nn.sigmoid(y)
    x = (p - self.alpha) / (1.0 - 2.0 * self.alpha)
    # dp/dy = sigmoid(y) sigmoid(-y).
    log_det = (jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y) -
               math.log(1.0 - 2.0 * self.alpha))
    return x, sum_except_batch(log_det)


# ----------------------------------------------------------------------------
# Reshapes and permutations (volume preserving).


def squeeze2x2(x: Array) -> Array:
  """Space to depth: [B, H, W, C] -> [B, H/2, W/2, 4C] (each 2x2 patch's
  pixels become channels, ordered (row, col, channel))."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze2x2(y: Array) -> Array:
  """Depth to space, the inverse of ``squeeze2x2``."""
  b, h, w, c = y.shape
  y = y.reshape(b, h, w, 2, 2, c // 4)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)


class Squeeze(Bijector):
  """Space to depth as a bijector (a permutation: log-det 0)."""

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    return squeeze2x2(x), jnp.zeros((x.shape[0],), jnp.float32)

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    return unsqueeze2x2(y), jnp.zeros((y.shape[0],), jnp.float32)


class ChannelPermutation(Bijector):
  """A fixed channel permutation: ``"reverse"`` or a seeded ``"shuffle"``.

  Glow's baselines for the 1x1 convolution; log-det 0.
  """

  kind: str = "reverse"
  seed: int = 0
  # The permutation as an array (e.g. traced inside
  # ``architectures.GlowSteps``' scan), in place of the one ``kind`` and
  # ``seed`` give.
  permutation: Optional[Array] = None

  @staticmethod
  def seeded(kind: str, seed: int, num_channels: int) -> np.ndarray:
    """The permutation of ``kind`` and ``seed`` (int32 [C])."""
    if kind not in PERMUTATIONS:
      raise ValueError(
          f"ChannelPermutation kind={kind!r}, expected one of"
          f" {PERMUTATIONS}.")
    if kind == "reverse":
      return np.arange(num_channels, dtype=np.int32)[::-1].copy()
    return np.random.RandomState(seed).permutation(num_channels).astype(
        np.int32)

  def _permutation(self, num_channels: int):
    if self.permutation is not None:
      return self.permutation
    return self.seeded(self.kind, self.seed, num_channels)

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    perm = self._permutation(x.shape[-1])
    return x[..., perm], jnp.zeros((x.shape[0],), jnp.float32)

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    perm = self._permutation(y.shape[-1])
    inverse_perm = (np.argsort(perm) if isinstance(perm, np.ndarray)
                    else jnp.argsort(perm))
    return y[..., inverse_perm], jnp.zeros((y.shape[0],), jnp.float32)


# ----------------------------------------------------------------------------
# Actnorm and the invertible 1x1 convolution.


class ActNorm(Bijector):
  """Glow's activation normalisation: y = (x + b) * exp(log_s) per channel.

  Data-dependent initialisation (``data_init``, the default): the first
  call (inside ``init``) sets b = -mean and log_s = -log std of the incoming
  batch per channel (over batch and space), so the output starts at zero
  mean and unit variance. The batch given to ``init`` is the one used, so
  an initialisation batch of its own only needs its own ``init`` call; under
  ``jax.jit`` with a sharded batch these means are over the global batch.
  Without ``data_init`` the layer starts as the identity (b = 0,
  log_s = 0). log-det = H * W * sum_c log_s_c.
  """

  eps: float = 1e-6
  data_init: bool = True

  @nn.compact
  def _parameters(self, x: Array) -> Tuple[Array, Array]:
    """bias [C], log_scale [C]; ``x`` [B, ..., C] is read only at init."""
    axes = tuple(range(x.ndim - 1))

    def init_bias(key, shape):
      del key, shape
      return -jnp.mean(x, axis=axes)

    def init_log_scale(key, shape):
      del key, shape
      mean = jnp.mean(x, axis=axes)
      variance = jnp.mean(jnp.square(x - mean), axis=axes)
      return -0.5 * jnp.log(variance + self.eps)

    if not self.data_init:
      init_bias = init_log_scale = nn.initializers.zeros
    num_channels = x.shape[-1]
    bias = self.param("bias", init_bias, (num_channels,))
    log_scale = self.param("log_scale", init_log_scale, (num_channels,))
    return bias, log_scale

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    bias, log_scale = self._parameters(x)
    log_det = _spatial_size(x) * jnp.sum(log_scale)
    return (x + bias) * jnp.exp(log_scale), _batch_constant(log_det, x.shape[0])

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    bias, log_scale = self._parameters(y)
    log_det = -_spatial_size(y) * jnp.sum(log_scale)
    return y * jnp.exp(-log_scale) - bias, _batch_constant(log_det, y.shape[0])


def _apply_channel_matrix(x: Array, w: Array) -> Array:
  """A 1x1 convolution: y[..., i] = sum_j w[i, j] x[..., j], as one matrix
  product over all positions (``convolutions.dot_general``)."""
  return dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ())))


class Invertible1x1Conv(Bijector):
  """Glow's invertible 1x1 convolution, y = W x at every position.

  ``"lu"``: W = P L (U + diag(sign * exp(log_s))) with P a fixed
  permutation, L unit lower triangular, U strictly upper triangular and the
  signs fixed; log|det W| = sum log_s, inverse by two triangular solves.
  Initialised to a random rotation (its LU factors), fixed by ``seed``.
  ``"plain"``: W a free matrix (initialised to the same rotation); its
  log|det| is sum log|diag| of a pivoted LU factorisation, its inverse by LU
  solves. Either way log-det = H * W_img * log|det W|.
  """

  parameterization: str = "lu"
  seed: int = 0
  # The seeded constants as arrays (``seeded_factors``' dict, e.g. traced
  # inside ``architectures.GlowSteps``' scan), in place of those ``seed``
  # gives.
  factors: Optional[dict] = None

  @staticmethod
  def seeded_factors(parameterization: str, seed: int,
                     num_channels: int) -> dict:
    """The constants fixed by ``seed`` (float32 numpy arrays): "rotation",
    the initial W; for "lu" also its factors: "p" (fixed), "sign" (fixed
    signs of diag(U)), and the initial "lower", "upper", "log_s"."""
    if parameterization not in CONV_PARAMETERIZATIONS:
      raise ValueError(
          f"Invertible1x1Conv parameterization={parameterization!r},"
          f" expected one of {CONV_PARAMETERIZATIONS}.")
    c = num_channels
    rotation = _random_orthogonal(seed, c)
    if parameterization == "plain":
      return {"rotation": rotation.astype(np.float32)}
    p, l0, u0 = scipy.linalg.lu(rotation)
    lower_mask = np.tril(np.ones((c, c)), -1)
    return {k: np.asarray(v, np.float32) for k, v in {
        "rotation": rotation, "p": p, "sign": np.sign(np.diag(u0)),
        "lower": l0 * lower_mask, "upper": u0 * lower_mask.T,
        "log_s": np.log(np.abs(np.diag(u0)))}.items()}

  @nn.compact
  def _matrices(self, num_channels: int) -> Tuple[Array, Array, Array]:
    """Returns W [C, C], W^-1 [C, C] and log|det W| (scalar)."""
    c = num_channels
    factors = self.factors
    if factors is None:
      factors = self.seeded_factors(self.parameterization, self.seed, c)
    elif self.parameterization not in CONV_PARAMETERIZATIONS:
      raise ValueError(
          f"Invertible1x1Conv parameterization={self.parameterization!r},"
          f" expected one of {CONV_PARAMETERIZATIONS}.")
    eye = jnp.eye(c, dtype=jnp.float32)
    if self.parameterization == "plain":
      w = self.param("kernel", lambda key, shape: jnp.asarray(
          factors["rotation"], jnp.float32), (c, c))
      lu, pivots = jax.scipy.linalg.lu_factor(w)
      log_det = jnp.sum(jnp.log(jnp.abs(jnp.diag(lu))))
      w_inv = jax.scipy.linalg.lu_solve((lu, pivots), eye)
      return w, w_inv, log_det

    # Static factors of the initial rotation: P and the signs of diag(U)
    # stay fixed (they are discrete), the rest is learned.
    lower_mask = np.tril(np.ones((c, c), np.float32), -1)
    upper_mask = lower_mask.T
    lower = self.param("lower", lambda key, shape: jnp.asarray(
        factors["lower"], jnp.float32), (c, c))
    upper = self.param("upper", lambda key, shape: jnp.asarray(
        factors["upper"], jnp.float32), (c, c))
    log_s = self.param("log_s", lambda key, shape: jnp.asarray(
        factors["log_s"], jnp.float32), (c,))
    l_mat = lower * lower_mask + eye
    u_mat = upper * upper_mask + jnp.diag(factors["sign"] * jnp.exp(log_s))
    p = jnp.asarray(factors["p"], jnp.float32)
    w = p @ l_mat @ u_mat
    # W^-1 = U^-1 L^-1 P^T, two triangular solves.
    l_inv = jax.scipy.linalg.solve_triangular(
        l_mat, eye, lower=True, unit_diagonal=True)
    u_inv = jax.scipy.linalg.solve_triangular(u_mat, eye, lower=False)
    w_inv = u_inv @ l_inv @ p.T
    return w, w_inv, jnp.sum(log_s)

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    w, _, log_det = self._matrices(x.shape[-1])
    return (_apply_channel_matrix(x, w),
            _batch_constant(_spatial_size(x) * log_det, x.shape[0]))

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    _, w_inv, log_det = self._matrices(y.shape[-1])
    return (_apply_channel_matrix(y, w_inv),
            _batch_constant(-_spatial_size(y) * log_det, y.shape[0]))


# ----------------------------------------------------------------------------
# Zero-initialised output layers and the coupling conditioners.


class ZeroConv(nn.Module):
  """Glow's "Conv2dZeros": y = (conv(x) + b) * exp(factor * logs).

  Kernel, bias and the per-channel ``logs`` [features] all start at zero, so
  the output is exactly 0 at initialisation; the factor (3 in Glow) scales
  the learned log-scale, a larger effective step size for it. Parameters:
  "conv" (kernel [kh, kw, C_in, features], bias [features]) and "logs".
  """

  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  log_scale_factor: float = GLOW_LOG_SCALE_FACTOR

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = Conv(self.features, self.kernel_size,
             kernel_init=nn.initializers.zeros,
             bias_init=nn.initializers.zeros, name="conv")(x)
    logs = self.param("logs", nn.initializers.zeros, (self.features,))
    return h * jnp.exp(self.log_scale_factor * logs)


class ZeroDense(nn.Module):
  """Glow's "linear_zeros": y = (x W + b) * exp(factor * logs) on [B, N]
  inputs; W, b and ``logs`` start at zero, so y = 0 at initialisation."""

  features: int
  log_scale_factor: float = GLOW_LOG_SCALE_FACTOR

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(self.features, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, name="dense")(x)
    logs = self.param("logs", nn.initializers.zeros, (self.features,))
    return h * jnp.exp(self.log_scale_factor * logs)


def zero_output_layer(conditioner: str, features: int,
                      name: Optional[str] = None) -> nn.Module:
  """The zero-initialised 3x3 output conv of a conditioner: a plain conv
  (``"plain"``) or Glow's ``ZeroConv`` with its learned scale (``"glow"``)."""
  if conditioner == "glow":
    return ZeroConv(features, name=name)
  if conditioner == "plain":
    return Conv(features, (3, 3), kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.zeros, name=name)
  raise ValueError(
      f"conditioner={conditioner!r}, expected one of {CONDITIONERS}.")


class ConvNet(nn.Module):
  """A coupling conditioner whose output layer is zero-initialised.

  ``num_res_blocks == 0``: Glow's conv3x3 -> ReLU -> conv1x1 -> ReLU ->
  zero-conv3x3. Otherwise RealNVP-style: conv3x3, ``num_res_blocks``
  residual blocks h + conv3x3(ReLU(conv3x3(ReLU(h)))), ReLU, zero-conv3x3.
  The zero output makes every coupling start as the identity.

  ``conditioner="plain"``: every conv has a bias, the output conv is a
  plain zero-initialised conv. ``"glow"`` (openai/glow's ``f``): each hidden
  conv has no bias and is followed by an actnorm (data-initialised when
  ``actnorm_data_init``; its log-det is not needed, the conditioner need not
  be invertible), and the output layer is a ``ZeroConv``.
  """

  out_channels: int
  width: int = 64
  num_res_blocks: int = 0
  conditioner: str = "plain"
  actnorm_data_init: bool = True
  # The residual blocks as one ``nn.scan`` (parameters stacked under
  # "res_blocks"): the same function, compiled once instead of
  # num_res_blocks times.
  scan_res_blocks: bool = False

  def _hidden(self, h: Array, kernel_size: Tuple[int, int]) -> Array:
    """One hidden conv (before its ReLU), normalised as ``conditioner``
    says."""
    return _hidden_conv(h, self.width, kernel_size, self.conditioner,
                        self.actnorm_data_init)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = self._hidden(x, (3, 3))
    if self.num_res_blocks == 0:
      h = self._hidden(nn.relu(h), (1, 1))
    if self.scan_res_blocks and self.num_res_blocks > 0:
      blocks = nn.scan(_ResBlock, variable_axes={"params": 0},
                       split_rngs={"params": True},
                       length=self.num_res_blocks)
      h, _ = blocks(self.width, self.conditioner, self.actnorm_data_init,
                    name="res_blocks")(h, None)
    else:
      for _ in range(self.num_res_blocks):
        r = self._hidden(nn.relu(h), (3, 3))
        r = self._hidden(nn.relu(r), (3, 3))
        h = h + r
    return zero_output_layer(self.conditioner, self.out_channels)(nn.relu(h))


def _hidden_conv(h: Array, width: int, kernel_size: Tuple[int, int],
                 conditioner: str, actnorm_data_init: bool) -> Array:
  """``ConvNet``'s hidden conv (before its ReLU), normalised as
  ``conditioner`` says; call it from a compact method."""
  if conditioner == "plain":
    return Conv(width, kernel_size)(h)
  h = Conv(width, kernel_size, use_bias=False)(h)
  return ActNorm(data_init=actnorm_data_init)(h)[0]


class _ResBlock(nn.Module):
  """One residual block of ``ConvNet``, h + conv(ReLU(conv(ReLU(h)))), as
  the body of a scan: (h, None) -> (h, None)."""

  width: int
  conditioner: str
  actnorm_data_init: bool

  @nn.compact
  def __call__(self, h: Array, _) -> Tuple[Array, None]:
    r = _hidden_conv(nn.relu(h), self.width, (3, 3), self.conditioner,
                     self.actnorm_data_init)
    r = _hidden_conv(nn.relu(r), self.width, (3, 3), self.conditioner,
                     self.actnorm_data_init)
    return h + r, None


def checkerboard_mask(height: int, width: int, parity: int) -> np.ndarray:
  """[H, W, 1] float mask, 1 where (row + col + parity) is even (kept fixed)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return ((rows + cols + parity) % 2 == 0).astype(np.float32)[..., None]


def bounded_log_scale(raw: Array, scale_fn: str,
                      tanh_scale: Optional[Array] = None) -> Array:
  """log s of an affine coupling, bounded and 0 at raw = 0 (identity init).

  ``"sigmoid"``: log s = log sigmoid(raw + 2) - log sigmoid(2), Glow's
  sigmoid(h + 2) divided by its value at 0, so s in (0, 1.135).
  ``"tanh"``: log s = tanh_scale * tanh(raw) with a learned per-channel
  tanh_scale (RealNVP).
  """
  if scale_fn == "sigmoid":
    return jax.nn.log_sigmoid(raw + 2.0) - jax.nn.log_sigmoid(2.0)
  if scale_fn == "tanh":
    return tanh_scale * jnp.tanh(raw)
  raise ValueError(f"scale_fn={scale_fn!r}, expected one of {SCALE_FNS}.")


class Coupling(Bijector):
  """Additive (NICE), affine (RealNVP) or rational-quadratic spline (NSF)
  coupling with a channel or checkerboard mask.

  With the kept part x_a and the changed part x_b (selected by the mask),
  theta = NN(x_a) and y_b = g_theta(x_b) element-wise, y_a = x_a:
  additive y_b = x_b + t; affine y_b = x_b * s + t with log s =
  bounded(raw); spline y_b = RQS_theta(x_b) (see ``splines``). The
  Jacobian is block triangular with identity on x_a, so log-det = sum over
  x_b of log g'_theta(x_b) (log s for affine, 0 for additive). The
  conditioner's zero-initialised last layer makes it start as the identity.

  Attributes:
    kind: ``"affine"``, ``"additive"`` or ``"spline"``.
    mask: ``"channel"`` (keeps channels [:C//2] for parity 0, the rest for
      parity 1; needs C >= 2) or ``"checkerboard"`` (keeps pixels with even
      row + col + parity).
    parity: 0 or 1, which half is kept.
    scale_fn: ``"sigmoid"`` or ``"tanh"``, see ``bounded_log_scale``.
    width, num_res_blocks, conditioner, actnorm_data_init: the conditioner,
      see ``ConvNet``.
    spline_bins, spline_bound: the spline's K bins on [-bound, bound].
    scan_res_blocks: the conditioner's residual blocks as one scan (see
      ``ConvNet``).
  """

  kind: str = "affine"
  mask: str = "channel"
  parity: int = 0
  scale_fn: str = "sigmoid"
  width: int = 64
  num_res_blocks: int = 0
  conditioner: str = "plain"
  actnorm_data_init: bool = True
  spline_bins: int = 8
  spline_bound: float = 3.0
  scan_res_blocks: bool = False

  def _params_per_element(self) -> int:
    if self.kind == "affine":
      return 2
    if self.kind == "additive":
      return 1
    if self.kind == "spline":
      return splines.spline_num_params(self.spline_bins)
    raise ValueError(
        f"Coupling kind={self.kind!r}, expected one of {COUPLING_KINDS}.")

  @nn.compact
  def _conditioner(self, kept: Array,
                   num_out: int) -> Tuple[Array, Optional[Array]]:
    """NN(kept) -> raw parameters [..., num_out, P], tanh scale or None."""
    per_element = self._params_per_element()
    h = ConvNet(per_element * num_out, self.width, self.num_res_blocks,
                self.conditioner, self.actnorm_data_init,
                scan_res_blocks=self.scan_res_blocks,
                name="conditioner")(kept)
    tanh_scale = None
    if self.kind == "affine" and self.scale_fn == "tanh":
      tanh_scale = self.param("tanh_scale", nn.initializers.ones, (num_out,))
    return h.reshape(h.shape[:-1] + (num_out, per_element)), tanh_scale

  def _elementwise(self, z: Array, raw: Array, tanh_scale: Optional[Array],
                   inverse: bool) -> Tuple[Array, Array]:
    """g_theta(z) (or its inverse) and the element-wise log|derivative|."""
    if self.kind == "spline":
      return splines.rational_quadratic_spline(z, raw, self.spline_bound,
                                               inverse)
    shift = raw[..., 0]
    if self.kind == "additive":
      return (z - shift if inverse else z + shift), jnp.zeros_like(z)
    log_scale = bounded_log_scale(raw[..., 1], self.scale_fn, tanh_scale)
    if inverse:
      return (z - shift) * jnp.exp(-log_scale), -log_scale
    return z * jnp.exp(log_scale) + shift, log_scale

  def _check(self, x: Array) -> None:
    if self.mask not in MASKS:
      raise ValueError(f"Coupling mask={self.mask!r}, expected one of {MASKS}.")
    if self.mask == "channel" and x.shape[-1] < 2:
      raise ValueError(
          "Coupling with mask='channel' needs at least 2 channels, got input"
          f" of shape {x.shape}.")

  def _split(self, x: Array) -> Tuple[Array, Array]:
    half = x.shape[-1] // 2
    if self.parity == 0:
      return x[..., :half], x[..., half:]
    return x[..., half:], x[..., :half]

  def _merge(self, kept: Array, changed: Array) -> Array:
    parts = (kept, changed) if self.parity == 0 else (changed, kept)
    return jnp.concatenate(parts, axis=-1)

  def _transform(self, x: Array, inverse: bool) -> Tuple[Array, Array]:
    self._check(x)
    if self.mask == "channel":
      kept, changed = self._split(x)
      raw, tanh_scale = self._conditioner(kept, changed.shape[-1])
      changed, log_det = self._elementwise(changed, raw, tanh_scale, inverse)
      return self._merge(kept, changed), sum_except_batch(log_det)
    keep = jnp.asarray(checkerboard_mask(x.shape[1], x.shape[2], self.parity))
    raw, tanh_scale = self._conditioner(x * keep, x.shape[-1])
    changed, log_det = self._elementwise(x, raw, tanh_scale, inverse)
    y = keep * x + (1 - keep) * changed
    return y, sum_except_batch((1 - keep) * log_det)

  def forward_and_log_det(self, x: Array) -> Tuple[Array, Array]:
    return self._transform(x, inverse=False)

  def inverse_and_log_det(self, y: Array) -> Tuple[Array, Array]:
    return self._transform(y, inverse=True)
