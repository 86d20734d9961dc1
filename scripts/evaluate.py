"""Test NLL of a trained model: a workdir's newest (or chosen) checkpoint.

  python scripts/evaluate.py --workdir=/tmp/vae_mnist
  python scripts/evaluate.py --workdir=/tmp/vae_mnist --step=2000 \
      --config.model.iwae_samples=1000

Uses the workdir's config.json; ``--config.KEY=VALUE`` overrides
inference-only keys (IWAE samples, sampler, evaluation timesteps, batch
size). An override that changes the parameters' shapes is refused. Only the
EMA parameters are restored, and nothing in the workdir is moved or changed;
a damaged newest checkpoint is skipped. Reports the mean per-example metrics
(nll_nats, bpd, ...) and their standard errors over the evaluation split,
fails (exit 1) if any is not finite, and writes them with the settings that
produced them to ``<workdir>/eval/step_<N>_<split>_n<examples>_seed<S>[_<h>]
.json`` (``<h>`` a short hash of the overrides, so runs with different
settings never overwrite each other).
"""

import hashlib
import json
import os
import time

from absl import app, flags

from gm_jax import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", -1, "Evaluate on the first N examples (-1: all).")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: data.eval_split).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation's randomness.")
_LIKELIHOOD = flags.DEFINE_enum(
    "likelihood", None, ["bound", "ode"],
    "Diffusion models: report the variational bound or the probability-flow"
    " ODE likelihood (config.model.eval_likelihood; default: the config's).")
_FID = flags.DEFINE_bool("fid", False, "Also report FID and KID of samples.")
_FID_SAMPLES = flags.DEFINE_integer("fid_samples", 1000,
                                    "Samples for FID/KID.", lower_bound=2)
_FID_EXTRACTOR = flags.DEFINE_enum(
    "fid_extractor", None, ["mnist_classifier", "inception"],
    "Feature extractor (default: by the images' channels).")
_FID_WEIGHTS = flags.DEFINE_string(
    "fid_weights", None, "The FID Inception weights file"
    " (pt_inception-2015-12-05-6726825d.pth).")
_FID_CLASSIFIER_STEPS = flags.DEFINE_integer(
    "fid_classifier_steps", None,
    "Training steps of the digit classifier (default: its settings').")
launch.define_config_flag(
    required=False,
    help_text="Config file (default: <workdir>/config.json).")
flags.mark_flags_as_required(["workdir"])
flags.register_validator("num_examples", lambda n: n == -1 or n > 0,
                         "--num_examples must be positive, or -1 for all.")
launch.define_distributed_flags()


def _output_path(workdir, step, split, num_examples, seed):
  overrides = launch.overrides()
  tag = "_ode" if _LIKELIHOOD.value == "ode" else ""
  if overrides:
    text = json.dumps(sorted(overrides))
    tag += "_" + hashlib.sha256(text.encode()).hexdigest()[:8]
  n = "all" if num_examples < 0 else str(num_examples)
  return os.path.join(workdir, "eval",
                      f"step_{step:07d}_{split}_n{n}_seed{seed}{tag}.json")


def _sample_quality(config, built, params, split, jax):
  """{"fid", "kid", "kid_se", "fid_num_samples", "fid_extractor",
  "sample_seconds"} of samples from params."""
  from gm_jax import quality, train
  name = _FID_EXTRACTOR.value or quality.default_extractor(
      tuple(config.model.image_shape))
  settings = None
  if _FID_CLASSIFIER_STEPS.value:
    settings = quality.ClassifierSettings(
        num_steps=_FID_CLASSIFIER_STEPS.value)
  extractor = quality.build_extractor(name, config.data,
                                      weights=_FID_WEIGHTS.value,
                                      settings=settings)
  reference = quality.split_reference(extractor, config.data, split)
  t0 = time.perf_counter()
  samples = train.draw_samples(built.sample, params,
                               jax.random.PRNGKey(_SEED.value + 1),
                               _FID_SAMPLES.value,
                               config.train.eval_batch_size)
  sample_seconds = time.perf_counter() - t0
  return {**quality.sample_scores(extractor, samples, reference,
                                  seed=_SEED.value),
          "sample_seconds": sample_seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  config = launch.load_config(flags.FLAGS.config, workdir)
  if _LIKELIHOOD.value is not None:
    if config.model.get("family") != "diffusion":
      raise app.UsageError(
          f"--likelihood applies to diffusion models; this workdir holds a"
          f" {config.model.get('family')!r} model.")
    config.unlock()
    config.model.eval_likelihood = _LIKELIHOOD.value
    config.lock()
  launch.initialize_distributed()
  import jax  # after jax.distributed

  from gm_jax import data, input_pipeline, train

  split = _SPLIT.value or config.data.eval_split
  built, params, step = train.restore_for_inference(config, workdir,
                                                    _STEP.value)
  source = data.load_source(config.data, split)
  last_print = [time.perf_counter()]

  def progress(done, total, means):
    now = time.perf_counter()
    if now - last_print[0] > 10 or done == total:
      last_print[0] = now
      shown = ", ".join(f"{k} {v:.4f}" for k, v in means.items()
                        if k in ("nll_nats", "bpd"))
      if launch.is_main_process():
        print(f"  {done}/{total} examples: running {shown}", flush=True)

  t0 = time.perf_counter()
  results = train.evaluate_dataset(
      built.evaluate, params, source, config.train.eval_batch_size,
      _NUM_EXAMPLES.value, jax.random.PRNGKey(_SEED.value), built.mesh,
      on_batch=progress, memory_hint=train.memory_hint(config.model))
  seconds = time.perf_counter() - t0
  if _FID.value:
    results.update(_sample_quality(config, built, params, split, jax))
  bad = sorted(k for k, v in results.items()
               if isinstance(v, float) and not abs(v) < float("inf")
               and k not in ("kid", "kid_se"))  # NaN without features
  if launch.is_main_process():
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in results.items())
    print(f"step {step}, split {split!r}: {shown} ({seconds:.1f}s)",
          flush=True)
    path = _output_path(workdir, step, split, _NUM_EXAMPLES.value,
                        _SEED.value)
    record = {"step": step, "split": split,
              "num_examples": input_pipeline.num_eval_examples(
                  source, _NUM_EXAMPLES.value),
              "seed": _SEED.value, "overrides": dict(launch.overrides()),
              "model": json.loads(config.model.to_json_best_effort()),
              "eval_seconds": seconds, **results}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
    print(f"Wrote {path}")
  if bad:
    raise FloatingPointError(
        f"Non-finite evaluation metrics {bad} at step {step}: the checkpoint"
        " holds a diverged model.")


if __name__ == "__main__":
  launch.run(main)
