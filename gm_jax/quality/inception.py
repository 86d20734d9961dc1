"""The FID Inception-v3 network in Flax, and its weights read without torch.

FID on CIFAR-10-scale data is defined by one network: the TensorFlow
Inception-v3 graph "inception-2015-12-05" of the original FID code, whose
weights pytorch-fid ships ported to PyTorch as

  pt_inception-2015-12-05-6726825d.pth  (about 91 MB)
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

gm_jax downloads nothing: fetch that file once on a machine with internet
access and pass its path (``--weights=PATH``), or put it at
``<cache_dir>/pt_inception-2015-12-05-6726825d.pth`` (cache_dir as for the
classifier: $XDG_CACHE_HOME/gm_jax/feature_extractors or
~/.cache/gm_jax/feature_extractors), where it is found by default. The .pth
file is read with a restricted unpickler and NumPy (torch is not needed; both
torch's zip layout and its older single-stream layout are read). An .npz
file with the same keys and torch's array layouts (OIHW kernels) loads too;
``convert_weights`` writes one.

The network is torchvision's Inception3 with pytorch-fid's FID patches:

* every conv is Conv (no bias) -> BatchNorm(eps = 1e-3) -> ReLU;
* the average pools of the A, C and first E blocks (Mixed_5b-d, 6b-e, 7b)
  exclude the zero padding from the mean (count_include_pad=False, as
  TensorFlow's pooling);
* the last E block (Mixed_7c) max-pools in its pool branch;
* features are the 2048 channels of the global average pool ("pool3");
* inputs: images in [0, 1] resized to 299 x 299 with bilinear interpolation
  (half-pixel centres, no antialiasing: torch's
  ``F.interpolate(mode="bilinear", align_corners=False)``), then mapped to
  [-1, 1]. Grey images are repeated to 3 channels.

Its 94 conv + BatchNorm layers hold 21,785,568 parameters (conv kernels and
BatchNorm scales and offsets; the running means and variances are Flax
``batch_stats``). torchvision's inception_v3 adds the 1000-way fc layer and
the auxiliary classifier to these for its documented 27,161,264.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import pickle
import zipfile
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gm_jax.quality.features import (
  FeatureExtractor,
  batched_apply,
  default_cache_dir,
  to_uint8,
)

NAME = "inception_v3_fid"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               f"fid_weights/{WEIGHTS_FILE}")
INPUT_SIZE = 299
FEATURE_DIM = 2048
# The smallest input the network takes (each spatial size stays >= 1).
MIN_INPUT_SIZE = 75


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: the conv stride.
    padding: (ph, pw) zeros added on both sides (torch's convention).
    precision: matmul precision of the conv; HIGHEST keeps float32 on GPUs
      that would otherwise use TF32.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool over the valid (unpadded) pixels only."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


def _stack(conv, x: jax.Array, name: str, *layers) -> jax.Array:
  """One branch of an Inception block: ``conv`` layers run in turn, named
  ``name_1``, ``name_2``, ... (torchvision's names). Each layer is
  (features, kh, kw) with "same" padding, or (features, kh, kw, 2) for a
  stride-2 layer without padding."""
  for i, (features, kh, kw, *stride) in enumerate(layers, 1):
    stride = stride[0] if stride else 1
    padding = ((kh - 1) // 2, (kw - 1) // 2) if stride == 1 else (0, 0)
    x = conv(features, (kh, kw), strides=stride, padding=padding,
             name=f"{name}_{i}")(x)
  return x


class _InceptionBlock(nn.Module):
  """Branches run side by side on the input, concatenated on channels."""

  precision: Any = jax.lax.Precision.HIGHEST

  def branches(self, conv, x: jax.Array) -> list[jax.Array]:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    return jnp.concatenate(self.branches(conv, x), axis=-1)


class InceptionA(_InceptionBlock):
  """Mixed_5b-d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1 -> 224 + pool."""

  pool_features: int = 32

  def branches(self, conv, x):
    return [
        conv(64, (1, 1), name="branch1x1")(x),
        _stack(conv, x, "branch5x5", (48, 1, 1), (64, 5, 5)),
        _stack(conv, x, "branch3x3dbl", (64, 1, 1), (96, 3, 3), (96, 3, 3)),
        conv(self.pool_features, (1, 1), name="branch_pool")(
            _avg_pool_3x3(x)),
    ]


class InceptionB(_InceptionBlock):
  """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2."""

  def branches(self, conv, x):
    return [
        conv(384, (3, 3), strides=2, name="branch3x3")(x),
        _stack(conv, x, "branch3x3dbl", (64, 1, 1), (96, 3, 3),
               (96, 3, 3, 2)),
        _max_pool_3x3_stride2(x),
    ]


class InceptionC(_InceptionBlock):
  """Mixed_6b-e: factorised 7x7 convolutions (1x7 and 7x1), 768 channels."""

  channels_7x7: int = 128

  def branches(self, conv, x):
    c7 = self.channels_7x7
    return [
        conv(192, (1, 1), name="branch1x1")(x),
        _stack(conv, x, "branch7x7", (c7, 1, 1), (c7, 1, 7), (192, 7, 1)),
        _stack(conv, x, "branch7x7dbl", (c7, 1, 1), (c7, 7, 1), (c7, 1, 7),
               (c7, 7, 1), (192, 1, 7)),
        conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x)),
    ]


class InceptionD(_InceptionBlock):
  """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2."""

  def branches(self, conv, x):
    return [
        _stack(conv, x, "branch3x3", (192, 1, 1), (320, 3, 3, 2)),
        _stack(conv, x, "branch7x7x3", (192, 1, 1), (192, 1, 7),
               (192, 7, 1), (192, 3, 3, 2)),
        _max_pool_3x3_stride2(x),
    ]


class InceptionE(_InceptionBlock):
  """Mixed_7b-c: split 1x3 / 3x1 branches, 2048 channels.

  Attributes:
    pool: "avg" (Mixed_7b) or "max" (Mixed_7c, a quirk of the FID graph that
      pytorch-fid reproduces).
  """

  pool: str = "avg"

  def branches(self, conv, x):
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
    # The 3x3 and the double-3x3 branches each end in a 1x3 and a 3x1 conv
    # side by side.
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    dbl = _stack(conv, x, "branch3x3dbl", (448, 1, 1), (384, 3, 3))
    return [
        conv(320, (1, 1), name="branch1x1")(x),
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
        conv(192, (1, 1), name="branch_pool")(pooled),
    ]


class FIDInceptionV3(nn.Module):
  """Inception-v3 up to pool3, as FID uses it; submodule names follow
  torchvision's so that parameter paths map one to one onto state-dict keys.

  Call it on preprocessed images (``preprocess``): float [N, H, W, 3] in
  [-1, 1], H, W >= 75 (299 for FID).
  """

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the pool3 features, float32 [N, 2048]."""
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = self.precision
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # [N, 73, 73, 64]
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [N, 35, 35, 192]
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64),
                                ("Mixed_5d", 64)):  # [N, 35, 35, 256 / 288]
      x = InceptionA(pool_features=pool_features, precision=p, name=name)(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # [N, 17, 17, 768]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):  # [N, 17, 17, 768]
      x = InceptionC(channels_7x7=c7, precision=p, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # [N, 8, 8, 1280]
    for name, pool in (("Mixed_7b", "avg"), ("Mixed_7c", "max")):
      x = InceptionE(pool=pool, precision=p, name=name)(x)  # [N, 8, 8, 2048]
    return jnp.mean(x, axis=(1, 2))  # [N, 2048]


def preprocess(images: jax.Array, size: Optional[int] = INPUT_SIZE
               ) -> jax.Array:
  """uint8 images -> the network's input.

  x = 2 resize(images / 255) - 1, with grey images repeated to 3 channels.

  Args:
    images: uint8 [N, H, W, C], C in {1, 3}.
    size: output height and width (bilinear, half-pixel centres, no
      antialiasing), or None to keep the input size.

  Returns:
    float32 [N, size, size, 3] in [-1, 1].
  """
  if images.shape[-1] not in (1, 3):
    raise ValueError(
        "The Inception network takes grey or RGB images, got"
        f" {images.shape[-1]} channels.")
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if size is not None and x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear",
                         antialias=False)
  return 2.0 * x - 1.0


# ---------------------------------------------------------------------------
# Parameter names: Flax paths <-> torch state-dict keys.

# (collection, last Flax name) -> (last torch name, kernel needs OIHW->HWIO)
_FLAX_TO_TORCH = {
    ("params", "kernel"): "weight",  # under .../conv
    ("params", "scale"): "weight",  # under .../bn
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Keys of the pytorch-fid file that the pool3 features do not use.
_UNUSED_KEYS = ("fc.weight", "fc.bias")


def variable_shapes() -> dict:
  """The Flax variables' shapes ({"params": ..., "batch_stats": ...}),
  traced without computing anything."""
  model = FIDInceptionV3()
  dummy = jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


def torch_key(path: tuple[str, ...]) -> str:
  """The state-dict key of a Flax variable path, e.g.
  ("params", "Mixed_5b", "branch1x1", "conv", "kernel")
  -> "Mixed_5b.branch1x1.conv.weight"."""
  collection, *modules, leaf = path
  return ".".join(modules + [_FLAX_TO_TORCH[(collection, leaf)]])


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  # Flax kernels are HWIO, torch's are OIHW.
  return value.transpose(3, 2, 0, 1) if path[-1] == "kernel" else value


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple:
  """The torch-layout shape of a Flax variable's shape."""
  if path[-1] == "kernel":
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def state_dict_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
  """Flax variables -> a torch-layout state dict (the inverse of
  ``variables_from_state_dict``, without the unused fc layer)."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  return {torch_key(path): _to_torch_layout(path, np.asarray(value))
          for path, value in flat.items()}


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              source: str = "the state dict",
                              shapes: Optional[Mapping] = None) -> dict:
  """A pytorch-fid FID Inception state dict -> Flax variables.

  Every conv, BatchNorm scale / offset and running statistic must be present
  with the reference shape (kernels OIHW, transposed here to HWIO). Allowed
  extras: ``fc.weight`` [1008, 2048], ``fc.bias`` [1008] and
  ``*.num_batches_tracked``.

  Args:
    state_dict: key -> array in torch's layout.
    source: the file name, for messages.
    shapes: the Flax variables' shapes to fill; default
      ``variable_shapes()`` (the whole network). Any submodule built from
      BasicConv2d layers works the same way.

  Returns:
    {"params": ..., "batch_stats": ...} of float32 arrays.

  Raises:
    ValueError: one line naming the source and the first problems: missing
      or unexpected keys, or shapes that differ from the reference.
  """
  expected = traverse_util.flatten_dict(
      dict(shapes) if shapes is not None else variable_shapes())
  problems = []
  flat = {}
  for path, shape_struct in expected.items():
    key = torch_key(path)
    if key not in state_dict:
      problems.append(f"missing {key}")
      continue
    value = np.asarray(state_dict[key])
    expected_shape = _torch_shape(path, shape_struct.shape)
    if value.shape != expected_shape:
      problems.append(
          f"{key} has shape {value.shape}, expected {expected_shape}")
      continue
    flat[path] = _to_flax_layout(path, value).astype(np.float32)
  known = {torch_key(path) for path in expected} | set(_UNUSED_KEYS)
  unexpected = sorted(k for k in state_dict
                      if k not in known and not k.endswith("num_batches_tracked"))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys such as"
                    f" {unexpected[0]}")
  fc = state_dict.get("fc.weight")
  if fc is not None and tuple(np.shape(fc)) != (1008, FEATURE_DIM):
    problems.append(f"fc.weight has shape {tuple(np.shape(fc))}, expected"
                    " (1008, 2048) (torchvision's ImageNet Inception has 1000"
                    " classes and is not the FID network)")
  if problems:
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ValueError(
        f"{source} does not hold the FID Inception weights ({WEIGHTS_FILE}):"
        f" {shown}{more}.")
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------
# Reading torch's .pth files with NumPy.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """Stands in for torch.FloatStorage etc.: only the dtype matters."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat storage named in the pickle; its bytes are attached later."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: Optional[np.ndarray] = None


class _TensorRef(collections.namedtuple(
    "_TensorRef", "storage offset shape strides")):
  """A tensor as (storage, element offset, shape, element strides)."""


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Replaces torch._utils._rebuild_tensor(_v2); the remaining arguments
  (requires_grad, backward hooks, metadata) do not affect the values."""
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a state dict, allowing only the few globals it needs
  (OrderedDict, torch's tensor rebuilders and storage types); any other
  global is refused, so a hostile file cannot run code."""

  def __init__(self, file, storages: dict):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor",
                                             "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"refusing {module}.{name}: not part of a plain tensor state dict")

  def persistent_load(self, saved_id):
    # ("storage", storage_type, key, location, numel[, view_metadata])
    if not (isinstance(saved_id, tuple) and saved_id[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
    storage_type, key, _, numel = saved_id[1:5]
    if len(saved_id) > 5 and saved_id[5] is not None:
      raise pickle.UnpicklingError("storage views are not supported")
    if str(key) not in self._storages:
      self._storages[str(key)] = _Storage(storage_type.dtype, int(numel))
    return self._storages[str(key)]


def _materialise(value, source: str):
  """Turns the _TensorRefs of an unpickled object into NumPy arrays."""
  if isinstance(value, dict):
    return {k: _materialise(v, source) for k, v in value.items()}
  if not isinstance(value, _TensorRef):
    return value
  data = value.storage.data
  if data is None:
    raise ValueError(f"{source}: a tensor's storage has no data.")
  if any(n == 0 for n in value.shape):
    return np.zeros(value.shape, data.dtype)
  # The largest element index the tensor touches must lie in the storage.
  extent = value.offset + sum(
      (n - 1) * s for n, s in zip(value.shape, value.strides, strict=True))
  if (value.offset < 0 or min(value.strides, default=0) < 0
      or extent >= data.size):
    raise ValueError(f"{source}: a tensor reaches past the end of its"
                     " storage.")
  view = np.lib.stride_tricks.as_strided(
      data[value.offset:], shape=value.shape,
      strides=[s * data.itemsize for s in value.strides])
  return np.array(view)  # a contiguous copy


def _read_zip_layout(path: str) -> Any:
  """torch >= 1.6: a zip of <prefix>/data.pkl and <prefix>/data/<key>."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: a torch zip file has one data.pkl, found"
                       f" {len(pickles)}.")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}
    result = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])),
                                 storages).load()
    for key, storage in storages.items():
      dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
      raw = archive.read(f"{prefix}data/{key}")
      storage.data = np.frombuffer(raw, dtype, count=storage.numel)
  return result


def _read_legacy_layout(path: str) -> Any:
  """torch < 1.6: pickles of the magic number, the protocol, the system
  info, the object and the storage keys, then per key an int64 element
  count and the raw bytes."""
  with open(path, "rb") as f:
    storages: dict[str, _Storage] = {}
    if _StateDictUnpickler(f, storages).load() != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a torch file (no magic number).")
    if _StateDictUnpickler(f, storages).load() != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported torch file protocol.")
    sys_info = _StateDictUnpickler(f, storages).load()
    order = "<" if sys_info.get("little_endian", True) else ">"
    result = _StateDictUnpickler(f, storages).load()
    keys = _StateDictUnpickler(f, storages).load()
    for key in keys:
      storage = storages[str(key)]
      count = int(np.frombuffer(f.read(8), order + "i8")[0])
      dtype = storage.dtype.newbyteorder(order)
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{path} is truncated.")
      storage.data = np.frombuffer(raw, dtype)
  return result


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a ``torch.save``d state dict of tensors as NumPy arrays.

  Both of torch's layouts are read: the zip archive (torch >= 1.6) and the
  older stream of pickles. Only plain tensors in (ordered) dicts are
  accepted; the unpickler refuses any other global.

  Raises:
    ValueError: the file is not such a state dict.
  """
  try:
    with open(path, "rb") as f:
      is_zip = f.read(4) == b"PK\x03\x04"
    result = (_read_zip_layout if is_zip else _read_legacy_layout)(path)
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError,
          AttributeError, IndexError, TypeError) as e:
    raise ValueError(f"{path} is not a readable torch state dict: {e}") from e
  result = _materialise(result, path)
  if isinstance(result, dict) and isinstance(result.get("state_dict"), dict):
    result = result["state_dict"]
  if not isinstance(result, dict):
    raise ValueError(f"{path} holds a {type(result).__name__}, not a state"
                     " dict.")
  return result


def read_weights(path: str) -> dict[str, np.ndarray]:
  """A state dict from a .pth (torch.save) or .npz (same keys) file."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as contents:
      return {k: contents[k] for k in contents.files}
  return read_torch_state_dict(path)


def default_weights_path() -> str:
  """<default cache dir>/pt_inception-2015-12-05-6726825d.pth."""
  return os.path.join(default_cache_dir(), WEIGHTS_FILE)


def _missing_weights_message(path: str) -> str:
  return (f"FID Inception weights not found at {path}: download {WEIGHTS_URL}"
          f" (pytorch-fid's {WEIGHTS_FILE}) and pass its path with --weights"
          f" (or put it at {default_weights_path()}).")


def load_variables(path: Optional[str] = None) -> dict:
  """The FID Inception's Flax variables from a weights file.

  Args:
    path: a .pth or .npz file; None looks at ``default_weights_path()``.

  Raises:
    FileNotFoundError: one line naming the file and where to get it.
    ValueError: one line when the keys or shapes do not match.
  """
  path = os.path.expanduser(path) if path else default_weights_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path))
  return variables_from_state_dict(read_weights(path), path)


def convert_weights(source: str, destination: str) -> None:
  """Checks a weights file and writes it as an .npz with the same keys."""
  state_dict = read_weights(source)
  variables_from_state_dict(state_dict, source)  # validates
  np.savez(destination, **{k: np.asarray(v) for k, v in state_dict.items()})


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@functools.partial(jax.jit, static_argnames=("resize_to",))
def _pool3(variables, images, resize_to):
  return FIDInceptionV3().apply(variables, preprocess(images, resize_to))


def make_features_fn(variables: Mapping, resize_to: Optional[int] = INPUT_SIZE):
  """A uint8 [B, H, W, C] -> pool3 float32 [B, 2048] function (jitted).

  The weights are an argument of the jitted function, not constants closed
  over: 21.8M constants in the program would make XLA compile for minutes.
  """
  variables = jax.device_put(variables)
  return functools.partial(_pool3, variables, resize_to=resize_to)


def inception_extractor(weights: Optional[str] = None, *,
                        batch_size: int = 50,
                        variables: Optional[Mapping] = None,
                        resize_to: Optional[int] = INPUT_SIZE
                        ) -> FeatureExtractor:
  """The FID Inception feature extractor (pool3, 2048-d).

  Args:
    weights: path of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
      (or an .npz with its keys); None looks at ``default_weights_path()``.
    batch_size: images per jitted call (one compilation for any N).
    variables: Flax variables to use instead of a file (tests, or weights
      already loaded); ``weights`` is then ignored.
    resize_to: input resolution (299 for FID); None keeps the images' size
      (they must then be at least 75 x 75).

  Returns:
    A FeatureExtractor taking any image size, grey or RGB.
  """
  if variables is None:
    path = os.path.expanduser(weights) if weights else default_weights_path()
    variables = load_variables(path)
    identity = f"{NAME}-{_file_sha256(path)[:16]}"
    metadata = {"id": identity, "weights": os.path.abspath(path)}
  else:
    metadata = {"id": f"{NAME}-custom", "weights": None}
  features_fn = make_features_fn(variables, resize_to)

  def features(images: Any) -> np.ndarray:
    return batched_apply(features_fn, to_uint8(images), batch_size)

  return FeatureExtractor(NAME, None, FEATURE_DIM, features,
                          {**metadata, "name": NAME, "resize_to": resize_to})
