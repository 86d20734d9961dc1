"""The base experiment config, argument parsing for ``get_config`` and checks.

Every file in ``configs/`` builds on ``base_config()`` and fills in the
sections::

  config.seed
  config.data    where the images come from (see gm_jax.data)
  config.model   everything the family's ``make`` needs; nothing else
  config.optim   optimizer, learning-rate schedule, clipping, EMA
  config.train   steps, batch sizes, logging / eval / sample cadence
  config.ckpt    checkpoint cadence and retention

``get_config(arg)`` takes a comma-separated argument string; ``smoke`` in it
shrinks the run to seconds for tests. Configs are returned locked, so an
override of a key that does not exist (a typo) fails loudly.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Optional

import ml_collections

SCHEDULES = ("constant", "cosine", "exponential", "piecewise")
OPTIMIZERS = ("adam", "adamw", "adamax")
EVAL_PARAMS = ("ema", "params")


def base_config() -> ml_collections.ConfigDict:
  """The defaults shared by every experiment (unlocked: the caller fills it)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded_mnist"  # embedded_mnist|embedded_rgb|tfds|folder
  config.data.name = ""  # tfds name, e.g. "mnist", "binarized_mnist", "cifar10"
  config.data.path = ""  # the image folder, for source="folder"
  config.data.data_dir = ""  # tfds data_dir; "" uses tfds's default
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 0  # folder source: resize to this square size; 0 keeps
  config.data.grayscale = False  # folder source: convert to one channel
  config.data.cache_in_memory = True  # read a tfds split into RAM once
  # Training-time augmentation, a pure function of (seed, step, row): see
  # gm_jax.input_pipeline.Augment.
  config.data.random_flip = False  # mirror left-right with probability 1/2
  config.data.random_shift = 0  # max integer shift in pixels (reflect pad)

  config.model = ml_collections.ConfigDict()
  config.model.family = ""
  config.model.image_shape = (28, 28, 1)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # adam | adamw | adamax
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "constant"  # constant|cosine|exponential|piecewise
  config.optim.warmup_steps = 0
  config.optim.decay_rate = 1.0  # exponential: lr * decay_rate^(step / decay_steps)
  config.optim.decay_steps = 1
  config.optim.min_learning_rate_ratio = 0.0  # cosine floor, relative
  config.optim.piecewise_boundaries = ()  # piecewise: steps where lr drops
  config.optim.piecewise_factor = 0.1  # piecewise: lr multiplier per boundary
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0
  config.optim.grad_clip = 0.0  # global-norm clip; 0 disables
  # A penalty l2_penalty / 2 * sum(w^2) over the weight matrices and kernels
  # (parameters with 2 or more dims) added to the loss: the classic L2
  # regulariser, unlike adamw's decoupled weight_decay.
  config.optim.l2_penalty = 0.0
  # Split each step's global batch into this many micro-batches whose
  # gradients are averaged before one update (for batches the devices cannot
  # hold at once); a step is still one update of train.batch_size examples.
  config.optim.grad_accumulation = 1
  # EMA of the parameters, used for evaluation and samples; the decay warms up
  # as min(ema_decay, (1 + step) / (10 + step)). 0: EMA params = params.
  config.optim.ema_decay = 0.999

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 10_000
  config.train.batch_size = 128  # global, over all devices and processes
  # Examples that the initialisation sees (data-dependent initialisation:
  # actnorm, weight norm): the first init_batch_size of the first training
  # batch; 0 = all of it. Sharded when the devices divide it, else held
  # whole by every device.
  config.train.init_batch_size = 0
  config.train.eval_batch_size = 256  # global
  config.train.eval_examples = -1  # test examples per periodic eval; -1 = all
  # Examples of the evaluations before the last step (the curve's points):
  # -1 = eval_examples. The last step's evaluation, the run's figure, always
  # uses eval_examples; fewer here makes a costly evaluation's curve cheap.
  config.train.curve_eval_examples = -1
  config.train.log_every = 100
  config.train.eval_every = 2_000
  config.train.sample_every = 2_000  # 0: no sample grids during training
  config.train.num_samples = 64
  # Parameters used for evaluation, samples and inference: the EMA (Polyak
  # average) or the raw parameters.
  config.train.eval_params = "ema"
  # Sample quality during training: FID and KID of fid_samples samples from
  # the evaluation parameters against the eval split, every fid_every steps
  # and at the last step, written with the eval metrics (0: off). Features:
  # the digit classifier for grey images (trained once, about a minute, and
  # cached; fid_classifier_steps > 0 trains it for that many steps instead
  # of its default), the FID Inception-v3 for colour images (its weights in
  # the feature-extractor cache, see gm_jax.quality.inception).
  config.train.fid_every = 0
  config.train.fid_samples = 1000
  config.train.fid_classifier_steps = 0
  config.train.compilation_cache_dir = "~/.cache/gm_jax/jax_compilation_cache"
  # On the CPU backend, the library that runs the convolutions of the
  # initialisation and the train step: "eigen" (XLA:CPU's own, YNNPACK
  # keeping the matrix products and reductions; faster for most of these
  # models), "ynnpack" (XLA's default, faster for flows' few-channel
  # coupling outputs) or "xla" (no YNNPACK: XLA's own kernels for products
  # and reductions too; faster for iwae_mnist's dense IWAE at k >= 5). The
  # same function, rounded differently; accelerators ignore it. See
  # gm_jax.convolutions.cpu_compiler_options.
  config.train.cpu_convolutions = "eigen"
  # The same choice for the functions without gradients: evaluation,
  # sampling and the visualisations. "xla" ran every family's evaluation
  # and sampling as fast as "eigen" (within 3%) or faster (IWAE bound 8%,
  # DDIM 11%).
  config.train.cpu_forward_convolutions = "xla"

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every_steps = 1_000
  config.ckpt.max_to_keep = 3
  return config


class _AllowedArgs(Exception):
  """Carries a config's allowed arguments out of ``get_config`` (raised by
  ``parse_args`` while ``config_args`` asks)."""

  def __init__(self, allowed: Iterable[str]):
    super().__init__()
    self.allowed = tuple(sorted(allowed))


# True only inside config_args: parse_args then reports instead of parsing.
_reporting_args = False


def parse_args(arg: Optional[str], allowed: Iterable[str]) -> set[str]:
  """Splits ``get_config``'s argument "smoke,mlp" into {"smoke", "mlp"}.

  Raises:
    ValueError: naming any word not in ``allowed``.
  """
  if _reporting_args:
    raise _AllowedArgs(allowed)
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = words - set(allowed)
  if unknown:
    raise ValueError(
        f"Unknown config argument(s) {sorted(unknown)}; this config accepts"
        f" {sorted(allowed)}.")
  return words


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
  """A config file's path: as given, else relative to the repository root
  (so "configs/vae_mnist.py" works from any working directory)."""
  if os.path.isfile(path):
    return path
  in_repo = os.path.join(REPO_ROOT, path)
  if not os.path.isabs(path) and os.path.isfile(in_repo):
    return in_repo
  raise FileNotFoundError(f"Config file {path!r} does not exist.")


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads "configs/x.py" or "configs/x.py:arg1,arg2" like the command line.

  The file is imported from its path (no ``sys.path`` edits) and its
  ``get_config(arg)`` is called with the text after the colon (None when
  there is none). The result is locked.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file has no ``get_config`` or rejects the argument.
  """
  path, _, arg = spec.partition(":")
  path = resolve_config_path(path)
  config = _get_config_fn(path)(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"get_config in {path!r} returned {type(config)}, not a"
                     " ConfigDict.")
  config.lock()
  return config


def _get_config_fn(path: str):
  """The ``get_config`` of the config file at ``path``, imported from its
  path (no ``sys.path`` edits)."""
  name = "gm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ValueError(f"Config file {path!r} defines no get_config(arg).")
  return get_config


def config_args(folder: Optional[str] = None) -> dict[str, tuple[str, ...]]:
  """{file name: the sorted ``:args`` its get_config accepts} for every
  ``*.py`` in ``folder`` (default: the repository's configs/).

  Each file is imported and its ``get_config`` called once with
  ``parse_args`` in a reporting mode, which hands back the ``allowed`` words
  instead of parsing; a config that never calls ``parse_args`` accepts none.
  Imports every family, so it is for help texts, not for every start-up.
  """
  global _reporting_args
  folder = folder or os.path.join(REPO_ROOT, "configs")
  accepted = {}
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    get_config = _get_config_fn(os.path.join(folder, name))
    _reporting_args = True
    try:
      get_config(None)
      accepted[name] = ()
    except _AllowedArgs as reported:
      accepted[name] = reported.allowed
    finally:
      _reporting_args = False
  return accepted


def evaluate_times(config: ml_collections.ConfigDict, times: int,
                   curve_examples: int = -1) -> None:
  """Evaluates ``times`` times per run: ``train.eval_every`` becomes a
  reference to ``train.num_steps // times``, so an override of num_steps
  keeps the count (the last evaluation is at num_steps). Needs
  num_steps >= times; an explicit eval_every override replaces it. With
  ``curve_examples`` > 0 the evaluations before the last use that many
  examples (``train.curve_eval_examples``); the last uses eval_examples."""
  config.train.eval_every = config.train.get_ref("num_steps") // times
  config.train.curve_eval_examples = curve_examples


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks the schedule of a run to a few seconds (model sizes are the
  config file's business)."""
  config.train.num_steps = 4
  config.train.batch_size = 8
  config.train.init_batch_size = 0
  config.train.eval_batch_size = 8
  config.train.eval_examples = 16
  config.train.curve_eval_examples = -1
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.sample_every = 4
  config.train.num_samples = 4
  config.ckpt.every_steps = 2
  config.optim.warmup_steps = min(config.optim.warmup_steps, 2)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that ml_collections' types cannot, with messages that name
  the key. Raises ValueError."""
  def need(cond, message):
    if not cond:
      raise ValueError(f"Invalid config: {message}")

  need(config.optim.name in OPTIMIZERS,
       f"optim.name={config.optim.name!r}, expected one of {OPTIMIZERS}.")
  need(config.optim.schedule in SCHEDULES,
       f"optim.schedule={config.optim.schedule!r}, expected one of"
       f" {SCHEDULES}.")
  need(config.train.eval_params in EVAL_PARAMS,
       f"train.eval_params={config.train.eval_params!r}, expected one of"
       f" {EVAL_PARAMS}.")
  need(config.optim.l2_penalty >= 0,
       f"optim.l2_penalty={config.optim.l2_penalty} must be >= 0.")
  need(config.optim.grad_accumulation >= 1
       and config.train.batch_size % config.optim.grad_accumulation == 0,
       f"optim.grad_accumulation={config.optim.grad_accumulation} must be"
       f" >= 1 and divide train.batch_size={config.train.batch_size}.")
  need(config.optim.learning_rate > 0,
       f"optim.learning_rate={config.optim.learning_rate} must be positive.")
  need(0.0 <= config.optim.ema_decay < 1.0,
       f"optim.ema_decay={config.optim.ema_decay} must be in [0, 1).")
  need(config.train.num_steps >= 0,
       f"train.num_steps={config.train.num_steps} must be >= 0.")
  for key in ("batch_size", "eval_batch_size", "log_every", "eval_every"):
    need(config.train[key] > 0, f"train.{key}={config.train[key]} must be > 0.")
  need(0 <= config.train.init_batch_size <= config.train.batch_size,
       f"train.init_batch_size={config.train.init_batch_size} must be in"
       f" [0, train.batch_size={config.train.batch_size}] (0: the whole"
       " first batch).")
  need(config.train.curve_eval_examples == -1
       or config.train.curve_eval_examples >= 1,
       f"train.curve_eval_examples={config.train.curve_eval_examples} must be"
       " >= 1 or -1 (= train.eval_examples).")
  need(config.train.sample_every >= 0,
       f"train.sample_every={config.train.sample_every} must be >= 0 (0: off).")
  need(config.train.fid_every >= 0,
       f"train.fid_every={config.train.fid_every} must be >= 0 (0: off).")
  for key in ("cpu_convolutions", "cpu_forward_convolutions"):
    need(config.train[key] in ("eigen", "ynnpack", "xla"),
         f"train.{key}={config.train[key]!r} must be 'eigen', 'ynnpack' or"
         " 'xla'.")
  need(config.train.fid_samples >= 2,
       f"train.fid_samples={config.train.fid_samples} must be >= 2.")
  need(config.train.fid_classifier_steps >= 0,
       f"train.fid_classifier_steps={config.train.fid_classifier_steps} must"
       " be >= 0 (0: the classifier's default).")
  need(config.ckpt.every_steps > 0,
       f"ckpt.every_steps={config.ckpt.every_steps} must be > 0.")
  need(0 <= config.data.random_shift < min(tuple(config.model.image_shape)[:2]),
       f"data.random_shift={config.data.random_shift} must be >= 0 and"
       " smaller than the image.")
  need(len(tuple(config.model.image_shape)) == 3,
       f"model.image_shape={tuple(config.model.image_shape)} must be"
       " (H, W, C).")
