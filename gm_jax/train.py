"""The shared trainer: ``build(config, mesh)`` and
``train_and_evaluate(config, workdir)``.

``build`` turns a config into everything that runs on devices: the family,
the optax optimizer, the abstract train state and the jitted init, train,
evaluate, sample and visualize functions with explicit shardings on a 1-D
"data" mesh (state replicated and donated, batch split on its leading axis).
Training, inference restores, the scripts and the benchmarks all start from
it. Randomness is stateless (``fold_in(key, step)``), so a restarted run
continues bit for bit. Nothing here branches on the model family.

Outputs under ``workdir``: config.json, metrics.jsonl, tensorboard/,
samples/step_<7-digit step>[_<name>].png, checkpoints/ (see
``gm_jax.checkpoint`` for what is guaranteed about them), LOCK while a
trainer runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import config_lib, convolutions, input_pipeline
from gm_jax import metrics as metrics_lib
from gm_jax import sharding as sharding_lib
from gm_jax.families import make_family, with_model_defaults
from gm_jax.family import Family

Hook = Callable[[int, "TrainState"], None]


class NonFiniteError(FloatingPointError):
  """The loss or the gradient stopped being finite."""


@dataclasses.dataclass(frozen=True)
class TrainState:
  """The state of a run: a pytree, replicated, saved in every checkpoint.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the family's parameters.
    ema_params: their exponential moving average (for evaluation).
    opt_state: the optax optimizer's state.
    family_state: the state of the family's ``loss_state`` (see
      ``gm_jax.family.LossState``), or None for a stateless objective.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  family_state: Any = None

  def replace(self, **changes) -> TrainState:
    return dataclasses.replace(self, **changes)


_STATE_FIELDS = ("step", "params", "ema_params", "opt_state")


def _flatten_state(state: TrainState):
  # family_state is a child only when set. orbax writes a None child into
  # the checkpoint's tree metadata and then refuses to restore a tree
  # without it, so a None field would break the checkpoints of stateless
  # runs written before the field existed; left out, their trees (and
  # files) stay exactly as they were.
  names = _STATE_FIELDS + (("family_state",) if state.family_state is not None
                           else ())
  return ([(jax.tree_util.GetAttrKey(name), getattr(state, name))
           for name in names], names)


def _unflatten_state(names, children) -> TrainState:
  return TrainState(**dict(zip(names, children, strict=True)))


jax.tree_util.register_pytree_with_keys(TrainState, _flatten_state,
                                        _unflatten_state)


# ----------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(optim: ml_collections.ConfigDict,
                           num_steps: int) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up, then the schedule."""
  lr = optim.learning_rate
  warmup = optim.warmup_steps
  if optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(
        lr, max(num_steps - warmup, 1), alpha=optim.min_learning_rate_ratio)
  elif optim.schedule == "exponential":
    main = optax.exponential_decay(lr, optim.decay_steps, optim.decay_rate)
  elif optim.schedule == "piecewise":
    main = optax.piecewise_constant_schedule(
        lr, {int(b): optim.piecewise_factor
             for b in optim.piecewise_boundaries})
  else:
    raise ValueError(f"Unknown optim.schedule {optim.schedule!r}.")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict,
                   num_steps: int) -> tuple[optax.GradientTransformation,
                                            optax.Schedule]:
  """Clipping, Adam / AdamW / Adamax and the schedule, as one optax
  transformation."""
  schedule = learning_rate_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  if optim.name == "adamax":
    parts.append(optax.scale_by_adamax(b1=optim.b1, b2=optim.b2,
                                       eps=optim.eps))
  else:
    parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2,
                                     eps=optim.eps))
  if optim.name == "adamw" and optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim.weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------
# Steps.


def make_init_fn(family: Family, tx: optax.GradientTransformation):
  def init_fn(key, batch):
    params = family.init(key, batch)
    family_state = (family.loss_state.init() if family.loss_state is not None
                    else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=params, opt_state=tx.init(params),
                      family_state=family_state)
  return init_fn


def l2_penalty(params) -> jax.Array:
  """sum(w^2) / 2 over the parameters with 2 or more dimensions."""
  return sum(0.5 * jnp.sum(jnp.square(w))
             for w in jax.tree_util.tree_leaves(params) if w.ndim >= 2)


def make_train_step(family: Family, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float,
                    l2_coefficient: float = 0.0, accumulation: int = 1):
  """The un-jitted step: (state, batch, base_key) -> (state, metrics).

  With ``l2_coefficient`` > 0 the objective is loss + l2_coefficient *
  l2_penalty(params). With ``accumulation`` = k > 1 the batch [B, ...] is
  split into k micro-batches (rows j, j + k, j + 2k, ..., so that each
  device's share of the batch splits evenly and nothing moves between
  devices), their gradients and metrics are averaged in a ``lax.scan``, and
  one update is applied: the same step on the same B examples, with k times
  less activation memory. gm_jax keeps this in the step rather than using
  optax.MultiSteps so that a step stays one update: schedules, EMA, logging
  and checkpoints keep counting updates.

  A family with a ``loss_state`` is trained on ``loss_state.loss`` with
  ``state.family_state``; the per-example stats it returns (of every
  micro-batch, put back in the batch's order) update the family state once,
  inside the step.
  """
  stateful = family.loss_state is not None

  def objective(params, family_state, batch, key, step):
    if stateful:
      loss, (aux, stats) = family.loss_state.loss(params, family_state, batch,
                                                  key, step)
    else:
      loss, aux = family.loss(params, batch, key, step)
      stats = None
    if l2_coefficient > 0:
      penalty = l2_penalty(params)
      aux = dict(aux, l2_penalty=penalty)
      loss = loss + l2_coefficient * penalty
    return loss, (aux, stats)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def loss_and_grads(params, family_state, batch, key, step):
    """((loss, metrics), grads) and the stats apart (never summed)."""
    (loss, (aux, stats)), grads = grad_fn(params, family_state, batch, key,
                                          step)
    return ((loss, aux), grads), stats

  def gradients(params, family_state, batch, key, step):
    if accumulation == 1:
      return loss_and_grads(params, family_state, batch, key, step)
    micro = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(
            x.reshape((x.shape[0] // accumulation, accumulation)
                      + x.shape[1:]), 0, 1), batch)  # [k, B / k, ...]

    def body(total, inputs):
      index, micro_batch = inputs
      out, stats = loss_and_grads(params, family_state, micro_batch,
                                  jax.random.fold_in(key, index), step)
      return jax.tree_util.tree_map(jnp.add, total, out), stats

    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(
            loss_and_grads, params, family_state,
            jax.tree_util.tree_map(lambda x: x[0], micro), key, step)[0])
    total, stats = jax.lax.scan(body, zeros,
                                (jnp.arange(accumulation), micro))
    # [k, B / k, ...] -> [B, ...]: micro-batch j held rows j, j + k, ...,
    # so this is the batch's own order.
    stats = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), stats)
    return jax.tree_util.tree_map(lambda x: x / accumulation, total), stats

  def train_step(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    ((loss, aux), grads), stats = gradients(
        state.params, state.family_state, batch, key, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The EMA's decay warms up as (1 + t) / (10 + t) so that the random
    # initialisation is forgotten early in short runs.
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema_params = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    grad_norm = optax.global_norm(grads)
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   learning_rate=schedule(state.step),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    family_state = state.family_state
    if stateful:
      family_state = family.loss_state.update(family_state, stats)
    new_state = TrainState(step=state.step + 1, params=params,
                           ema_params=ema_params, opt_state=opt_state,
                           family_state=family_state)
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------
# Everything that runs on devices, built once.


class Built(NamedTuple):
  """What ``build`` makes of a config (the jitted functions take sharded
  global arrays; see ``input_pipeline``)."""

  config: ml_collections.ConfigDict
  family: Family
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves with shardings
  init: Callable  # (key, batch) -> TrainState
  train_step: Callable  # (state, batch, key) -> (state, metrics); donates
  evaluate: Callable  # (params, batch, key) -> {name: [B]}
  sample: Callable  # (params, key, num) -> [num, H, W, C]
  visualize: Optional[Callable]  # (params, batch, key) -> {name: images}

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(
        self.abstract_state.params))


def build(config: ml_collections.ConfigDict,
          mesh: Optional[jax.sharding.Mesh] = None) -> Built:
  """The family, optimizer, abstract state and jitted functions of a config.

  Nothing is computed: the abstract state comes from ``jax.eval_shape`` on a
  batch of ``config.model.image_shape`` images.
  """
  config_lib.validate(config)
  family = make_family(config.model)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  sharding_lib.check_batch_size(config.train.eval_batch_size, mesh,
                                "train.eval_batch_size")
  replicated = sharding_lib.replicated(mesh)
  batched = sharding_lib.batch_sharding(mesh)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  init_fn = make_init_fn(family, tx)
  shape = (config.train.batch_size,) + tuple(config.model.image_shape)
  batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(init_fn, jax.random.PRNGKey(0), batch))
  data_in = (replicated, batched, replicated)
  init_batched = input_pipeline.init_sharding(
      config.train.batch_size, config.train.init_batch_size, mesh)
  # On CPU, the library of the kernels: one choice for the initialisation
  # and the train step, another for the functions without gradients
  # (evaluation, sampling, visualisation), where YNNPACK's matrix products
  # and reductions stop paying. Each function compiles with its own.
  options = convolutions.cpu_compiler_options(config.train.cpu_convolutions)
  forward_options = convolutions.cpu_compiler_options(
      config.train.cpu_forward_convolutions)

  def synced_jit(fn, name, forward=False, **jit_kwargs):
    return sharding_lib.SyncedJit(
        fn, name, compiler_options=forward_options if forward else options,
        **jit_kwargs)

  visualize = None
  if family.visualize is not None:
    visualize = synced_jit(family.visualize, "visualize", forward=True,
                           in_shardings=data_in, out_shardings=replicated)
  return Built(
      config=config, family=family, mesh=mesh, tx=tx,
      abstract_state=abstract_state,
      init=synced_jit(init_fn, "init", in_shardings=(replicated, init_batched),
                      out_shardings=replicated),
      train_step=synced_jit(
          make_train_step(family, tx, schedule, config.optim.ema_decay,
                          config.optim.l2_penalty,
                          config.optim.grad_accumulation), "train_step",
          in_shardings=data_in, out_shardings=(replicated, replicated),
          donate_argnums=(0,)),
      evaluate=synced_jit(family.evaluate, "evaluate", forward=True,
                          in_shardings=data_in, out_shardings=replicated),
      sample=synced_jit(family.sample, "sample", forward=True,
                        static_argnums=(2,), out_shardings=replicated),
      visualize=visualize)


# ----------------------------------------------------------------------------
# Evaluation.

# Per-example metrics whose standard error over examples is reported too.
STDERR_METRICS = ("nll_nats", "bpd")
# A per-example metric "<name>_estimator_var" is the variance of a Monte
# Carlo estimate inside ``evaluate`` (e.g. the diffusion bound's timestep
# draws); it is reported as "<name>_estimator_sd" (root mean variance, per
# example) and "<name>_estimator_stderr" (that noise's share of the standard
# error of the mean, already included in "<name>_stderr").
ESTIMATOR_VAR_SUFFIX = "_estimator_var"
# A per-example vector [B, D] (e.g. the VAE's posterior means) is reported
# as the number of its D components whose variance over the examples is
# above this (the "active units" of Burda et al., 2016).
ACTIVITY_THRESHOLD = 1e-2


def evaluate_dataset(evaluate_fn, params, source, batch_size: int,
                     num_examples: int, key, mesh,
                     on_batch: Optional[Callable[[int, int, dict], None]] = None,
                     memory_hint: str = "") -> dict[str, float]:
  """Means of the per-example metrics over the first ``num_examples``
  examples of ``source`` (all if negative), plus ``<name>_stderr`` (the
  standard error of the mean over examples) for nll_nats and bpd, the
  estimator noise of metrics that report it (``ESTIMATOR_VAR_SUFFIX``), and
  for per-example vectors [B, D] the count of active components
  (``ACTIVITY_THRESHOLD``).

  ``on_batch(done, total, running_means)`` is called after every batch (for
  progress displays). Before the first batch, a jitted ``evaluate_fn`` is
  compiled and its working memory checked (``check_memory``, naming
  ``memory_hint``).
  """
  total = input_pipeline.num_eval_examples(source, num_examples)
  sums: dict[str, float] = {}
  squares: dict[str, float] = {}
  done = 0
  batches = input_pipeline.eval_batches(source, batch_size, num_examples, mesh)
  for index, (batch, valid) in enumerate(batches):
    batch_key = jax.random.fold_in(key, index)
    if index == 0 and hasattr(evaluate_fn, "lower"):
      check_memory(evaluate_fn.lower(params, batch, batch_key).compile(),
                   f"evaluate (a batch of {batch_size})", memory_hint)
    out = evaluate_fn(params, batch, batch_key)
    for name, values in jax.device_get(out).items():
      values = np.asarray(values, np.float64)
      if values.shape[:1] != (batch_size,) or values.ndim > 2:
        raise ValueError(
            f"evaluate() must return per-example [B] or [B, D] arrays;"
            f" {name!r} has shape {values.shape}.")
      sums[name] = sums.get(name, 0.0) + values[:valid].sum(axis=0)
      squares[name] = squares.get(name, 0.0) + np.square(
          values[:valid]).sum(axis=0)
    done += valid
    if on_batch is not None:
      on_batch(done, total, {k: float(v) / done for k, v in sums.items()
                             if np.ndim(v) == 0})
  vectors = {name for name, value in sums.items() if np.ndim(value)}
  results = {name: float(value) / total for name, value in sums.items()
             if name not in vectors}
  for name in sorted(vectors):
    variance = squares[name] / total - np.square(sums[name] / total)
    results[name] = float(np.sum(variance > ACTIVITY_THRESHOLD))
  for name in STDERR_METRICS:
    if name in sums and total > 1:
      variance = max(squares[name] / total - results[name] ** 2, 0.0)
      results[f"{name}_stderr"] = float(np.sqrt(variance * total / (total - 1)
                                                / total))
  for name in [k for k in results if k.endswith(ESTIMATOR_VAR_SUFFIX)]:
    base = name[:-len(ESTIMATOR_VAR_SUFFIX)]
    mean_variance = max(results.pop(name), 0.0)
    results[f"{base}_estimator_sd"] = float(np.sqrt(mean_variance))
    results[f"{base}_estimator_stderr"] = float(np.sqrt(mean_variance / total))
  return results


def draw_samples(sample_fn, params, key, num: int, chunk: int) -> np.ndarray:
  """``num`` samples as a host array [num, H, W, C], drawn ``chunk`` at a
  time (chunk i with ``fold_in(key, i)``), so any ``num`` compiles the
  sampler for one size."""
  chunk = min(num, chunk)
  return np.concatenate([
      np.asarray(jax.device_get(sample_fn(params, jax.random.fold_in(key, i),
                                          chunk)))
      for i in range(-(-num // chunk))])[:num]


def available_memory_bytes(device: jax.Device) -> Optional[int]:
  """Memory free for new buffers on ``device``: the allocator's limit minus
  what is in use on accelerators, MemAvailable of the host for CPU devices
  (None where unknown)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    except OSError:
      return None
  return None


def check_memory(compiled, what: str, hint: str = "") -> None:
  """Raises MemoryError (one line) when a compiled program's new buffers
  (working memory and outputs, from XLA's memory analysis) exceed the free
  memory of a device; CPU devices share the host's memory, so their needs
  add up. A too-large program otherwise dies in the allocator, or in the
  kernel's out-of-memory killer, without saying why."""
  stats = compiled.memory_analysis()
  if stats is None:
    return
  needed = int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes)
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    needed *= jax.local_device_count()
  available = available_memory_bytes(device)
  if available is None or needed <= available:
    return
  gib = 2.0**30
  raise MemoryError(
      f"{what} needs {needed / gib:.1f} GiB of working memory"
      f" {'on the host' if device.platform == 'cpu' else 'per device'},"
      f" more than the {available / gib:.1f} GiB free: lower"
      f" train.eval_batch_size{' or ' + hint if hint else ''}.")


def memory_hint(model_config) -> str:
  """The model's chunk-size keys with their values (e.g. the VAE's
  ``model.iwae_chunk=1000``), which bound an evaluation's working memory."""
  return " or ".join(f"model.{k}={v}" for k, v in sorted(model_config.items())
                     if "chunk" in k)


# ----------------------------------------------------------------------------
# The run's pieces.


def _setup_compilation_cache(cache_dir: str) -> None:
  if not cache_dir:
    return
  cache_dir = os.path.expanduser(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def read_saved_config(workdir: str) -> Optional[dict]:
  """A workdir's config.json as saved (None without one), its model section
  completed with the keys its family gained since (at their defaults, which
  keep the former behaviour), so that adding a model key does not make an
  older run look like another model."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if isinstance(saved.get("model"), dict):
    saved["model"] = with_model_defaults(saved["model"])
  return saved


def config_differences(saved: Optional[dict], config, sections: Sequence[str]
                       ) -> list[str]:
  """["model.latent_dim: 16 -> 5", ...] between a saved config.json and
  ``config`` in the given sections."""
  if saved is None:
    return []
  current = json.loads(config.to_json_best_effort())
  out = []
  for section in sections:
    old, new = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        out.append(f"{section}.{key}: {old.get(key, '<unset>')!r} ->"
                   f" {new.get(key, '<unset>')!r}")
  return out


def _restore_for_training(checkpointer, built: Built, saved_config, workdir):
  """The newest intact checkpoint, or None for a fresh start; refuses to
  restart a workdir whose checkpoints are all damaged."""
  config = built.config
  model_diff = config_differences(saved_config, config, ["model"])
  if model_diff and checkpointer.all_steps():
    raise checkpoint_lib.CheckpointMismatchError(
        f"The workdir {workdir} holds checkpoints of a different model"
        f" (config.model keys that differ: {'; '.join(model_diff)}). Use a"
        " new workdir or the original model config; nothing was moved.")
  try:
    restored = checkpointer.restore_latest(built.abstract_state)
  except checkpoint_lib.CheckpointMismatchError as e:
    diff = config_differences(saved_config, config, ["model", "optim"])
    raise checkpoint_lib.CheckpointMismatchError(
        f"{e} Config keys that differ from {workdir}/config.json:"
        f" {'; '.join(diff) or 'none'}. Nothing was moved.") from None
  quarantined = os.path.join(workdir, checkpoint_lib.CORRUPT_DIR)
  damaged = [name for name in (os.listdir(quarantined)
                               if os.path.isdir(quarantined) else [])
             if checkpoint_lib.TMP_MARKER not in name]  # not unfinished saves
  if restored is None and damaged:
    raise checkpoint_lib.CheckpointError(
        f"{workdir} has no intact checkpoint but damaged ones in"
        f" {quarantined}: refusing to start over from step 0 here. Repair"
        " them or use a new workdir.")
  return restored


class _LaggedMetrics:
  """Fetches each step's metrics one step late (so the host never waits for
  the device), raises NonFiniteError for a non-finite step, and keeps the
  means since the last log line."""

  def __init__(self, interval_state: Optional[dict], latest_checkpoint):
    self.interval = metrics_lib.IntervalMeans(interval_state)
    self._latest_checkpoint = latest_checkpoint
    self._pending = None

  def push(self, step: int, metrics) -> None:
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      raise NonFiniteError(
          f"Non-finite training at step {step} (the update from step"
          f" {step - 1}): loss={float(metrics['loss'])},"
          f" grad_norm={float(metrics['grad_norm'])}. Step {step} and later"
          " were not saved; the latest checkpoint is at step"
          f" {self._latest_checkpoint()}. Lower optim.learning_rate or set"
          " optim.grad_clip.")
    self.interval.add({k: float(v) for k, v in metrics.items()
                       if k != "finite"})


def eval_params(state: TrainState, train_config):
  """The parameters that evaluation and samples use (config.train.eval_params:
  the EMA or the raw ones)."""
  return state.params if train_config.eval_params == "params" else (
      state.ema_params)


class _Outputs:
  """Evaluations, sample grids and log lines, with their cadence."""

  def __init__(self, built: Built, workdir: str, eval_source,
               writer: metrics_lib.MetricWriter, keys):
    self.built, self.workdir, self.eval_source = built, workdir, eval_source
    self.train, self.writer = built.config.train, writer
    self.eval_key, self.sample_key = keys
    self._quality = None  # (extractor, reference), made on first use

  def due(self, every: int, step: int) -> bool:
    """Every ``every`` steps and at the last; never for ``every`` = 0."""
    return every > 0 and step > 0 and (step % every == 0 or
                                       step == self.train.num_steps)

  def evaluation_due(self, step: int) -> bool:
    """Whether the likelihood (eval_every) or the sample quality
    (fid_every) is due at ``step``."""
    return self.due(self.train.eval_every, step) or self.fid_due(step)

  def fid_due(self, step: int) -> bool:
    return self.due(self.train.fid_every, step)

  def eval_examples(self, step: int) -> int:
    """Examples of the likelihood evaluation at ``step``: eval_examples at
    the last step (the run's figure), curve_eval_examples before it when
    set."""
    curve = self.train.curve_eval_examples
    if curve < 0 or step >= self.train.num_steps:
      return self.train.eval_examples
    return curve

  def sample_path(self, step: int, name: str = "samples") -> str:
    suffix = "" if name == "samples" else f"_{name}"
    return os.path.join(self.workdir, "samples", f"step_{step:07d}{suffix}.png")

  def evaluate(self, step: int, params) -> dict[str, Any]:
    """The evaluations due at ``step`` as one eval record: the likelihood
    (means over the eval split) when eval_every is due, FID / KID when
    fid_every is; both at the last step, and the likelihood when nothing is
    due (a finished run's final metrics)."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if self.due(self.train.eval_every, step) or not self.fid_due(step):
      results.update(evaluate_dataset(
          self.built.evaluate, params, self.eval_source,
          self.train.eval_batch_size, self.eval_examples(step), self.eval_key,
          self.built.mesh, memory_hint=memory_hint(self.built.config.model)))
    if self.fid_due(step):
      results.update(self.sample_quality(step, params))
    results["eval_seconds"] = time.perf_counter() - t0
    self.writer.write_scalars(step, "eval", results)
    numbers = {k: v for k, v in results.items() if not isinstance(v, str)}
    shown = ", ".join(f"{k} {v:.4f}" if not isinstance(v, str) else
                      f"{k} {v}" for k, v in results.items()
                      if k not in metrics_lib.TIMING_KEYS)
    _print(f"[eval] step {step}: {shown} ({results['eval_seconds']:.1f}s)")
    if not all(np.isfinite(v) for v in numbers.values()):
      _print(f"WARNING: non-finite evaluation metrics at step {step}.")
    return results

  def sample_quality(self, step: int, params) -> dict[str, Any]:
    """FID / KID of train.fid_samples samples against the eval split, with
    the number of samples and the feature extractor's id."""
    from gm_jax import quality  # only runs with fid_every > 0 need it
    config = self.built.config
    if self._quality is None:
      settings = None
      if self.train.fid_classifier_steps > 0:
        settings = quality.ClassifierSettings(
            num_steps=self.train.fid_classifier_steps)
      extractor = quality.build_extractor(
          quality.default_extractor(tuple(config.model.image_shape)),
          config.data, settings=settings, verbose=jax.process_index() == 0)
      reference = quality.split_reference(
          extractor, config.data, config.data.eval_split,
          verbose=jax.process_index() == 0)
      self._quality = extractor, reference
    extractor, reference = self._quality
    # A stream of its own: the sample grid of this step keeps its draws.
    key = jax.random.fold_in(jax.random.fold_in(self.sample_key, step), 1)
    samples = draw_samples(self.built.sample, params, key,
                           self.train.fid_samples, self.train.eval_batch_size)
    return quality.sample_scores(extractor, samples, reference, seed=step)

  def samples(self, step: int, params) -> None:
    key = jax.random.fold_in(self.sample_key, step)
    pictures = {"samples": self.built.sample(params, key,
                                             self.train.num_samples)}
    if self.built.visualize is not None:
      indices = (np.arange(self.train.eval_batch_size)
                 % len(self.eval_source))
      batch = input_pipeline.global_batch(self.eval_source, indices,
                                          self.built.mesh)
      pictures.update(self.built.visualize(params, batch, key))
    for name, images in pictures.items():
      grid = metrics_lib.image_grid(np.asarray(jax.device_get(images)))
      if jax.process_index() == 0:
        metrics_lib.save_png(self.sample_path(step, name), grid)
      self.writer.write_image(step, name, grid)
    _print(f"[samples] step {step}: {self.sample_path(step)}")

  def catch_up(self, step: int, state) -> Optional[dict]:
    """After a restore at ``step``: what was due there but never written
    (the run was killed between the save and them). Returns the eval
    metrics recorded at ``step``, if any."""
    recorded = [r for r in _records(self.workdir, "eval") if r["step"] == step]
    if self.evaluation_due(step) and not recorded:
      recorded = [self.evaluate(step, eval_params(state, self.train))]
    if (self.due(self.train.sample_every, step)
        and not os.path.exists(self.sample_path(step))):
      self.samples(step, eval_params(state, self.train))
    return recorded[-1] if recorded else None

  def log(self, step: int, scalars: dict, speed: dict) -> None:
    """A train record and log line; speed and ETA leave out compilation
    (right after the first step there is no timed step yet)."""
    rate = speed["steps_per_sec"]
    if np.isfinite(rate):
      scalars.update(steps_per_sec=rate)
    self.writer.write_scalars(step, "train", scalars)
    _print(f"step {step}/{self.train.num_steps} | loss {scalars['loss']:.4f} |"
           f" {rate:.2f} steps/s |"
           f" ETA {metrics_lib.format_duration(speed['eta_sec'])}")


def _records(workdir: str, split: str) -> list[dict]:
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return []
  return metrics_lib.read_metrics(workdir, split)


# ----------------------------------------------------------------------------
# The run.


class CompileAhead:
  """Compiles a jitted function for given argument specs in a thread.

  The trainer compiles its train step while the main thread initialises
  (compiling and running the init) or, resuming, catches up on what was
  due at the restored step: on 2 cores the first step of
  ``iddpm_cifar10`` waited 30.6-32.0 s instead of 38.0-38.7 s
  (benchmarks/README.md, "Compilation"). The compiled executable lands in
  the jitted function's cache, so the first call with arguments of these
  shapes, dtypes and shardings runs it without compiling again.
  ``result()`` waits, re-raises an error of the compilation and returns its
  seconds; ``close()`` only waits (used when the run failed on its own: a
  thread left compiling inside XLA at interpreter exit can abort the
  process).
  """

  def __init__(self, jitted, *specs):
    self._error: Optional[BaseException] = None
    self.seconds = 0.0

    def work():
      t0 = time.perf_counter()
      try:
        jitted.lower(*specs).compile()
      except BaseException as e:  # raised by result()
        self._error = e
      self.seconds = time.perf_counter() - t0

    self._thread = threading.Thread(target=work, name="gm_jax-compile-ahead")
    self._thread.start()

  def close(self) -> None:
    self._thread.join()

  def result(self) -> float:
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self.seconds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None,
                       hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: an experiment config (see gm_jax.config_lib).
    workdir: where outputs and checkpoints live; reusing it resumes.
    devices: the devices of the data mesh (default: all).
    hooks: called as ``hook(step, state)`` on the host after every step, once
      its checkpoint (if due) is dispatched and before its evaluation.

  Returns:
    The final evaluation metrics (means over the test split, and FID / KID
    with train.fid_every > 0); empty when the run stopped early for a
    preemption (SIGTERM).
  """
  _setup_compilation_cache(config.train.compilation_cache_dir)
  built = build(config, sharding_lib.make_mesh(devices))
  sharding_lib.check_batch_size(config.train.batch_size, built.mesh,
                                "train.batch_size")
  train_source, eval_source = input_pipeline.load_sources(config)
  init_key, train_key, eval_key, sample_key = jax.random.split(
      jax.random.PRNGKey(config.seed), 4)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with checkpoint_lib.WorkdirLock(workdir, enabled=is_main):
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.ckpt.max_to_keep)
    checkpointer.quarantine_leftovers()
    restored = _restore_for_training(checkpointer, built,
                                     read_saved_config(workdir), workdir)
    if is_main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    start = restored.step if restored else 0
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main,
                                      resume_step=start)
    if writer.dropped_records:
      _print(f"Dropped {writer.dropped_records} records after step {start}"
             " from metrics.jsonl: those steps run again.")
    outputs = _Outputs(built, workdir, eval_source, writer,
                       (eval_key, sample_key))
    batches = input_pipeline.train_batches(
        train_source, config.train.batch_size, config.seed, start, built.mesh,
        input_pipeline.Augment.from_config(config))
    ahead = None
    if start < config.train.num_steps:
      ahead = CompileAhead(built.train_step, built.abstract_state,
                           input_pipeline.batch_spec(
                               train_source, config.train.batch_size,
                               built.mesh), train_key)
    try:
      if restored:
        state = restored.state
        _print(f"Resumed from the checkpoint at step {start} in {workdir}.")
        final = outputs.catch_up(start, state) or {}
      else:
        t0 = time.perf_counter()
        state = built.init(init_key, input_pipeline.init_batch(
            train_source, input_pipeline.train_indices(
                len(train_source), config.train.batch_size, config.seed, 0),
            config.train.init_batch_size, built.mesh))
        _print(f"Initialised {config.model.family} with {built.num_params:,}"
               f" parameters in {time.perf_counter() - t0:.1f}s on"
               f" {built.mesh.size} device(s).")
        final = {}
      if ahead is not None:
        t0 = time.perf_counter()
        seconds = ahead.result()
        _print(f"Compiled the train step in {seconds:.1f}s alongside the"
               f" {'catch-up' if restored else 'initialisation'} (waited"
               f" {time.perf_counter() - t0:.1f}s more for it).")
      lagged = _LaggedMetrics((restored.host_state if restored else {}).get(
          "interval"), checkpointer.latest_step)
      final = _train_loop(built, state, start, batches, train_key, lagged,
                          checkpointer, outputs, hooks, final)
    finally:
      if ahead is not None:
        ahead.close()
      batches.close()
      checkpointer.close()
      writer.close()
  return {k: v for k, v in final.items() if k not in ("step", "split")}


def _train_loop(built: Built, state: TrainState, start: int, batches,
                train_key, lagged: _LaggedMetrics, checkpointer,
                outputs: _Outputs, hooks: Sequence[Hook], final: dict) -> dict:
  """Steps ``start + 1 .. num_steps`` with their logs, checkpoints, hooks,
  evaluations and samples, in that order; stops after saving on SIGTERM."""
  config = built.config
  num_steps = config.train.num_steps
  progress = metrics_lib.Progress(start, num_steps)
  watch = checkpoint_lib.PreemptionWatch(checkpointer)
  with watch.watching():
    for step in range(start, num_steps):
      done = step + 1
      t0 = time.perf_counter()
      state, step_metrics = built.train_step(state, next(batches), train_key)
      lagged.push(done, step_metrics)
      if step == start:  # report compilation, keep it out of the ETA
        jax.block_until_ready(step_metrics)
        _print(f"First step took"
               f" {time.perf_counter() - t0:.1f}s.")
        progress = metrics_lib.Progress(done, num_steps)
        batches.wait_seconds = 0.0
      if outputs.due(config.train.log_every, done):
        lagged.flush()
        speed = progress.report(done)
        scalars = lagged.interval.means()
        scalars["data_wait_fraction"] = batches.wait_seconds / speed["seconds"]
        batches.wait_seconds = 0.0
        outputs.log(done, scalars, speed)
      preempted = watch.requested(done)
      if outputs.due(config.ckpt.every_steps, done) or preempted:
        lagged.flush()  # never save a state after a non-finite step
        checkpointer.save(done, state, {"interval": lagged.interval.state()})
      for hook in hooks:
        hook(done, state)
      if preempted:
        checkpointer.wait()
        _print(f"Preempted: saved the checkpoint at step {done} and"
               " stopped. Run the same command again to continue.")
        return {}
      if outputs.evaluation_due(done):
        final = outputs.evaluate(done, eval_params(state, config.train))
      if outputs.due(config.train.sample_every, done):
        outputs.samples(done, eval_params(state, config.train))
  lagged.flush()
  if start >= num_steps:
    _print(f"Training already finished at step {start}.")
    if not final:
      final = outputs.evaluate(start, eval_params(state, config.train))
  return final


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          step: Optional[int] = None, *,
                          devices: Optional[Sequence[jax.Device]] = None
                          ) -> tuple[Built, Any, int]:
  """Loads a workdir's EMA parameters alone for evaluation or sampling.

  Reads only (never creates, moves or deletes anything in ``workdir``);
  only the EMA parameters (or the raw ones, with
  ``config.train.eval_params="params"``) are restored (an orbax partial
  restore), so optimizer settings cannot break it.

  Args:
    config: the workdir's config, possibly with inference-only overrides.
    workdir: the training run's folder.
    step: the checkpoint step; None for the newest intact one.
    devices: the devices of the data mesh (default: all).

  Returns:
    (built, ema_params, step).

  Raises:
    FileNotFoundError: the workdir has no checkpoint (at that step).
    CheckpointMismatchError: the config builds parameters of another
      structure than the checkpoint's (e.g. an override of a model size).
  """
  built = build(config, sharding_lib.make_mesh(devices))
  field = "params" if config.train.eval_params == "params" else "ema_params"
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if not checkpointer.all_steps():
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}.")
    try:
      if step is None:
        restored = checkpointer.restore_latest(built.abstract_state,
                                               only=field)
      else:
        restored = checkpointer.restore(step, built.abstract_state,
                                        only=field)
    except checkpoint_lib.CheckpointMismatchError as e:
      diff = config_differences(read_saved_config(workdir), config, ["model"])
      raise checkpoint_lib.CheckpointMismatchError(
          f"{e} Overridden model keys: {'; '.join(diff) or 'none'}; only keys"
          " that keep the parameters' shapes can be changed at inference."
      ) from None
  finally:
    checkpointer.close()
  return built, restored.state, restored.step


def _print(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
