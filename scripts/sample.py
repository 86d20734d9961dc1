"""Samples from a trained model into PNG grids.

  python scripts/sample.py --workdir=/tmp/vae_mnist --num=64 --out=/tmp/s.png
  python scripts/sample.py --workdir=/tmp/ddpm --config.model.sampler=ddim \
      --config.model.sample_steps=50

Writes the samples (EMA parameters) to --out, and next to it every extra
picture the family offers, laid out in rows (the VAE:
<out>_reconstruction.png, test images above their reconstructions, and
<out>_interpolation.png, one path per row; flows: <out>_temperatures.png, one
row per visualize temperature; diffusion: <out>_samplers.png, the same noise
through DDPM in row 0 and DDIM in row 1). Uses the workdir's config.json;
``--config.KEY=VALUE`` overrides sampling settings (an override that changes
the parameters' shapes is refused). Only the EMA parameters are restored;
nothing in the workdir is moved.
"""

import os
import time

from absl import app, flags

from gm_jax import launch

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples (> 0).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default:"
                           " <workdir>/samples/sampled_step_<N>.png).")
launch.define_config_flag(
    required=False,
    help_text="Config file (default: <workdir>/config.json).")
flags.mark_flags_as_required(["workdir"])
launch.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = launch.load_config(flags.FLAGS.config, _WORKDIR.value)
  launch.initialize_distributed()
  import jax  # after jax.distributed
  import numpy as np

  from gm_jax import data, input_pipeline, metrics, train

  built, params, step = train.restore_for_inference(config, _WORKDIR.value,
                                                    _STEP.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples",
                                   f"sampled_step_{step:07d}.png")
  key = jax.random.PRNGKey(_SEED.value)
  t0 = time.perf_counter()
  images = np.asarray(jax.device_get(built.sample(params, key, _NUM.value)))
  seconds = time.perf_counter() - t0
  pictures = {"": images}
  if built.visualize is not None:
    source = data.load_source(config.data, config.data.eval_split)
    size = config.train.eval_batch_size
    batch = input_pipeline.global_batch(
        source, np.arange(size) % len(source), built.mesh)
    extra = built.visualize(params, batch, key)
    pictures.update({f"_{k}": np.asarray(jax.device_get(v))
                     for k, v in extra.items()})
  if launch.is_main_process():
    stem, ext = os.path.splitext(out)
    for suffix, value in pictures.items():
      path = f"{stem}{suffix}{ext or '.png'}"
      metrics.save_png(path, metrics.image_grid(value))
      print(f"Wrote {path}")
    print(f"{_NUM.value} samples from step {step} in {seconds:.1f}s"
          " (including compilation).")


if __name__ == "__main__":
  launch.run(main)
