"""Test NLL of a trained model: a workdir's newest (or chosen) checkpoint.

  python scripts/evaluate.py --workdir=/tmp/vae_mnist
  python scripts/evaluate.py --workdir=/tmp/vae_mnist --k=5000 --step=3000

Uses the workdir's config.json unless --config is given. Reports the mean
per-example metrics (nll_nats, bpd, ...) over the evaluation split with the
EMA parameters, and writes them to <workdir>/eval_step_<N>.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gm_jax import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (default: <workdir>/config.json).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_K = flags.DEFINE_integer(
    "k", None, "Importance samples for models with an importance-weighted"
    " bound (sets config.model.iwae_samples).")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", -1, "Evaluate on the first N examples (-1: all).")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: data.eval_split).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation's randomness.")
flags.mark_flags_as_required(["workdir"])
launch.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  launch.initialize_distributed()
  from gm_jax import data, train  # after jax.distributed

  config = launch.load_config(_CONFIG.value, _WORKDIR.value)
  config.unlock()
  if _K.value is not None:
    if "iwae_samples" not in config.model:
      raise ValueError(f"--k: the {config.model.family!r} family has no"
                       " importance-weighted bound (config.model.iwae_samples).")
    config.model.iwae_samples = _K.value
    config.model.iwae_chunk = min(config.model.iwae_chunk, _K.value)
  split = _SPLIT.value or config.data.eval_split
  config.lock()

  family, params, step, mesh = train.restore_for_inference(
      config, _WORKDIR.value, _STEP.value)
  source = data.load_source(config.data, split)
  evaluate_fn = jax.jit(family.evaluate)
  t0 = time.perf_counter()
  results = train.evaluate_dataset(
      evaluate_fn, params, source, config.train.eval_batch_size,
      _NUM_EXAMPLES.value, jax.random.PRNGKey(_SEED.value), mesh)
  results["eval_seconds"] = time.perf_counter() - t0
  if launch.is_main_process():
    shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items())
    print(f"step {step}, split {split!r}: {shown}", flush=True)
    path = os.path.join(_WORKDIR.value, f"eval_step_{step}.json")
    with open(path, "w") as f:
      json.dump({"step": step, "split": split, **results}, f, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":
  launch.run(main)
