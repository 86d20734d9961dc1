"""The shared trainer: ``train_and_evaluate(config, workdir)``.

One ``jax.jit``-compiled step with explicit shardings on a 1-D "data" mesh
(state replicated and donated, batch split on its leading axis), stateless
randomness (``fold_in(key, step)``), optax optimizer with EMA, periodic
evaluation on the test split with the EMA parameters, sample grids, metrics
to ``metrics.jsonl`` and TensorBoard, and checkpoints from which a restarted
run continues bit for bit. It never branches on the model family.

Outputs under ``workdir``: config.json, metrics.jsonl, tensorboard/,
samples/step_<7-digit step>.png, checkpoints/.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import config_lib
from gm_jax import data as data_lib
from gm_jax import metrics as metrics_lib
from gm_jax import sharding as sharding_lib
from gm_jax.families import make_family
from gm_jax.family import Family

log = logging.getLogger(__name__)

Hook = Callable[[int, "TrainState"], None]


class NonFiniteError(FloatingPointError):
  """The loss or the gradient stopped being finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


# ----------------------------------------------------------------------------
# Optimizer.


def make_schedule(optim: ml_collections.ConfigDict,
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
  """Clipping, Adam(W) and the schedule, as one optax transformation."""
  schedule = make_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  if optim.name == "adamw" and optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim.weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------
# Steps.


def make_init_fn(family: Family, tx: optax.GradientTransformation):
  def init_fn(key, batch):
    params = family.init(key, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=params, opt_state=tx.init(params))
  return init_fn


def make_train_step(family: Family, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float):
  """The un-jitted step: (state, batch, base_key) -> (state, metrics)."""

  def train_step(state: TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(family.loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, batch, key, state.step)
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
    new_state = TrainState(step=state.step + 1, params=params,
                           ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------
# Data.


def _prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs ``iterator`` in a background thread, ``size`` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def worker():
    try:
      for item in iterator:
        if stop.is_set():
          return
        q.put(item)
    except Exception as e:  # surface loader errors in the main thread
      q.put(e)
    q.put(done)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(num_examples: int, batch_size: int, seed: int,
                  step: int) -> np.ndarray:
  """The example indices of the global batch at ``step``.

  Each epoch is a permutation drawn from (seed, epoch); batches walk through
  it and drop the incomplete remainder, so the order is a pure function of
  (seed, step) and any process can compute any step's batch.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={batch_size} exceeds the {num_examples}"
                     " training examples.")
  epoch, position = divmod(step, steps_per_epoch)
  permutation = _epoch_permutation(num_examples, seed, epoch)
  return permutation[position * batch_size:(position + 1) * batch_size]


def train_batches(source: data_lib.ImageSource, batch_size: int, seed: int,
                  start_step: int, mesh) -> Iterator[dict[str, jax.Array]]:
  """Global batches for steps start_step, start_step + 1, ... (a pure
  function of (seed, step): resuming reads exactly what an uninterrupted run
  would have read)."""
  step = start_step
  while True:
    indices = train_indices(len(source), batch_size, seed, step)
    yield sharding_lib.global_batch(source, indices, mesh)
    step += 1


# ----------------------------------------------------------------------------
# Evaluation and samples.


def evaluate_dataset(evaluate_fn, params, source: data_lib.ImageSource,
                     batch_size: int, num_examples: int, key, mesh
                     ) -> dict[str, float]:
  """Means of the per-example metrics over the first ``num_examples`` test
  examples (all of them if negative). The last batch is padded by repeating
  examples; padded rows are dropped before averaging."""
  total = len(source) if num_examples < 0 else min(num_examples, len(source))
  sums: dict[str, float] = {}
  for batch_index, start in enumerate(range(0, total, batch_size)):
    valid = min(batch_size, total - start)
    indices = np.arange(start, start + batch_size) % total
    batch = sharding_lib.global_batch(source, indices, mesh)
    out = evaluate_fn(params, batch, jax.random.fold_in(key, batch_index))
    for name, values in jax.device_get(out).items():
      values = np.asarray(values, np.float64)
      if values.shape != (batch_size,):
        raise ValueError(
            f"evaluate() must return per-example [B] arrays; {name!r} has"
            f" shape {values.shape}.")
      sums[name] = sums.get(name, 0.0) + float(values[:valid].sum())
  return {name: value / total for name, value in sums.items()}


def _save_grid(writer: metrics_lib.MetricWriter, workdir: str, step: int,
               name: str, images) -> str:
  images = np.asarray(jax.device_get(images))
  grid = metrics_lib.image_grid(images)
  suffix = "" if name == "samples" else f"_{name}"
  path = os.path.join(workdir, "samples", f"step_{step:07d}{suffix}.png")
  if jax.process_index() == 0:
    metrics_lib.save_png(path, grid)
  writer.write_image(step, name, grid)
  return path


# ----------------------------------------------------------------------------
# The run.


def _setup_compilation_cache(cache_dir: str) -> None:
  if not cache_dir:
    return
  cache_dir = os.path.expanduser(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict,
                          has_checkpoint: bool) -> None:
  """Writes config.json, refusing to resume with a different model."""
  path = os.path.join(workdir, "config.json")
  if has_checkpoint and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    current = json.loads(config.to_json_best_effort())
    if saved.get("model") != current["model"]:
      keys = sorted(
          k for k in set(saved.get("model", {})) | set(current["model"])
          if saved.get("model", {}).get(k) != current["model"].get(k))
      raise ValueError(
          f"The workdir {workdir} holds checkpoints of a different model"
          f" (config.model keys that differ: {keys}). Use a new workdir or the"
          " original model config.")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _abstract(tree, sharding):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _check_image_shape(source: data_lib.ImageSource, config, split: str):
  want = tuple(config.model.image_shape)
  got = tuple(source.image_shape)
  if got != want:
    raise ValueError(
        f"The {split} data ({config.data.source}"
        f"{':' + config.data.name if config.data.name else ''}) has images of"
        f" shape {got} but config.model.image_shape is {want}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None,
                       hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: an experiment config (see gm_jax.config_lib).
    workdir: where outputs and checkpoints live; reusing it resumes.
    devices: the devices of the data mesh (default: all).
    hooks: called as ``hook(step, state)`` on the host after every step.

  Returns:
    The final evaluation metrics (means over the test split).
  """
  config_lib.validate(config)
  _setup_compilation_cache(config.train.compilation_cache_dir)
  family = make_family(config.model)
  mesh = sharding_lib.make_mesh(devices)
  sharding_lib.check_batch_size(config.train.batch_size, mesh,
                                "train.batch_size")
  sharding_lib.check_batch_size(config.train.eval_batch_size, mesh,
                                "train.eval_batch_size")
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)

  train_source = data_lib.load_source(config.data, config.data.train_split)
  eval_source = data_lib.load_source(config.data, config.data.eval_split)
  _check_image_shape(train_source, config, "train")
  _check_image_shape(eval_source, config, "eval")
  if len(train_source) < config.train.batch_size:
    raise ValueError(
        f"train.batch_size={config.train.batch_size} exceeds the"
        f" {len(train_source)} training examples.")

  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  num_steps = config.train.num_steps
  tx, schedule = make_optimizer(config.optim, num_steps)
  init_fn = make_init_fn(family, tx)
  init_key, train_key, eval_key, sample_key = jax.random.split(
      jax.random.PRNGKey(config.seed), 4)

  checkpointer = checkpoint_lib.Checkpointer(workdir, config.ckpt.max_to_keep)
  _check_workdir_config(workdir, config, bool(checkpointer.all_steps()))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)

  first_batch = next(train_batches(train_source, config.train.batch_size,
                                   config.seed, 0, mesh))
  jit_init = jax.jit(init_fn, in_shardings=(replicated, batch_sharding),
                     out_shardings=replicated)
  abstract_state = _abstract(jax.eval_shape(init_fn, init_key, first_batch),
                             replicated)
  start_step, state = checkpointer.restore_latest(abstract_state)
  if state is None:
    t0 = time.perf_counter()
    state = jit_init(init_key, first_batch)
    start_step = 0
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    _print(f"Initialised {config.model.family} with {num_params:,} parameters"
           f" in {time.perf_counter() - t0:.1f}s on {mesh.size} device(s).")
  else:
    _print(f"Resumed from the checkpoint at step {start_step} in {workdir}.")
  del first_batch

  train_step = jax.jit(
      make_train_step(family, tx, schedule, config.optim.ema_decay),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  evaluate_fn = jax.jit(family.evaluate,
                        in_shardings=(replicated, batch_sharding, replicated),
                        out_shardings=replicated)
  sample_fn = jax.jit(family.sample, static_argnums=(2,),
                      out_shardings=replicated)
  visualize_fn = None
  if family.visualize is not None:
    visualize_fn = jax.jit(family.visualize,
                           in_shardings=(replicated, batch_sharding, replicated),
                           out_shardings=replicated)

  def run_eval(step: int, state: TrainState) -> dict[str, float]:
    t0 = time.perf_counter()
    results = evaluate_dataset(
        evaluate_fn, state.ema_params, eval_source,
        config.train.eval_batch_size, config.train.eval_examples, eval_key,
        mesh)
    results["eval_seconds"] = time.perf_counter() - t0
    writer.write_scalars(step, "eval", results)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                      if k != "eval_seconds")
    _print(f"[eval] step {step}: {shown} ({results['eval_seconds']:.1f}s)")
    return results

  def run_samples(step: int, state: TrainState) -> None:
    key = jax.random.fold_in(sample_key, step)
    images = sample_fn(state.ema_params, key, config.train.num_samples)
    path = _save_grid(writer, workdir, step, "samples", images)
    if visualize_fn is not None:
      indices = np.arange(config.train.eval_batch_size) % len(eval_source)
      batch = sharding_lib.global_batch(eval_source, indices, mesh)
      for name, pictures in visualize_fn(state.ema_params, batch, key).items():
        _save_grid(writer, workdir, step, name, pictures)
    _print(f"[samples] step {step}: {path}")

  def check_finite(step: int, metrics) -> dict[str, float]:
    """Fetches a step's metrics; raises if that step was not finite."""
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      raise NonFiniteError(
          f"Non-finite training at step {step}: loss={float(metrics['loss'])},"
          f" grad_norm={float(metrics['grad_norm'])}. The state after this"
          " step was not checkpointed; the latest checkpoint is at step"
          f" {checkpointer.latest_step()}. Lower optim.learning_rate or set"
          " optim.grad_clip.")
    return {k: float(v) for k, v in metrics.items() if k != "finite"}

  batches = _prefetch(train_batches(train_source, config.train.batch_size,
                                    config.seed, start_step, mesh))
  progress = metrics_lib.Progress(start_step, num_steps)
  final: dict[str, float] = {}
  pending = None  # (step, metrics) of the last dispatched step, not yet checked
  interval = metrics_lib.IntervalMeans()
  compile_reported = start_step >= num_steps
  try:
    for step in range(start_step, num_steps):
      batch = next(batches)
      t0 = time.perf_counter()
      state, step_metrics = train_step(state, batch, train_key)
      if not compile_reported:
        jax.block_until_ready(step_metrics)
        _print(f"First step (with compilation) took"
               f" {time.perf_counter() - t0:.1f}s.")
        compile_reported = True
      if pending is not None:  # check one step behind to keep the device busy
        interval.add(check_finite(*pending))
      pending = (step, step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done, state)

      if done % config.train.log_every == 0 or done == num_steps:
        interval.add(check_finite(*pending))
        pending = None
        speed = progress.report(done)
        scalars = interval.means()  # over the steps since the last log
        scalars["steps_per_sec"] = speed["steps_per_sec"]
        writer.write_scalars(done, "train", scalars)
        _print(f"step {done}/{num_steps} | loss {scalars['loss']:.4f} |"
               f" {speed['steps_per_sec']:.2f} steps/s |"
               f" ETA {metrics_lib.format_duration(speed['eta_sec'])}")

      if done % config.ckpt.every_steps == 0 or done == num_steps:
        if pending is not None:
          interval.add(check_finite(*pending))
          pending = None
        checkpointer.save(done, state)
      if done % config.train.eval_every == 0 or done == num_steps:
        final = run_eval(done, state)
      if done % config.train.sample_every == 0 or done == num_steps:
        run_samples(done, state)
    if pending is not None:
      check_finite(*pending)
    if start_step >= num_steps:
      _print(f"Training already finished at step {start_step}; evaluating.")
      final = run_eval(start_step, state)
  finally:
    checkpointer.close()
    writer.close()
  return final


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          step: Optional[int] = None, *,
                          devices: Optional[Sequence[jax.Device]] = None):
  """Loads a workdir's checkpoint for evaluation or sampling.

  Args:
    config: the config the workdir was trained with (model and optim must
      match; train and data may differ).
    workdir: the training run's folder.
    step: the checkpoint step; None for the newest readable one.
    devices: the devices of the data mesh (default: all).

  Returns:
    (family, ema_params, step, mesh).

  Raises:
    FileNotFoundError: the workdir has no checkpoint (at that step).
  """
  config_lib.validate(config)
  family = make_family(config.model)
  mesh = sharding_lib.make_mesh(devices)
  replicated = sharding_lib.replicated(mesh)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  shape = (config.train.eval_batch_size,) + tuple(config.model.image_shape)
  dummy = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  abstract_state = _abstract(
      jax.eval_shape(make_init_fn(family, tx), jax.random.PRNGKey(0), dummy),
      replicated)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    available = checkpointer.all_steps()
    if not available:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}.")
    if step is None:
      step, state = checkpointer.restore_latest(abstract_state)
    elif step not in available:
      raise FileNotFoundError(
          f"No checkpoint at step {step} in {checkpointer.directory};"
          f" available steps: {available}.")
    else:
      state = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  return family, state.ema_params, step, mesh


def _print(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
