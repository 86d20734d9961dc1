"""Samples from a trained model into PNG grids.

  python scripts/sample.py --workdir=/tmp/vae_mnist --num=64 --out=/tmp/s.png

Writes the samples (EMA parameters) to --out, and next to it every extra
picture the family offers (for the VAE: <out>_reconstruction.png and
<out>_interpolation.png, from test images). Sampling settings of the model
config can be overridden with --config=<file> --config.model.KEY=VALUE.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gm_jax import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (default: <workdir>/config.json).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default:"
                           " <workdir>/samples/sampled_step_<N>.png).")
flags.mark_flags_as_required(["workdir"])
launch.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  launch.initialize_distributed()
  from gm_jax import data, metrics, sharding, train

  config = launch.load_config(_CONFIG.value, _WORKDIR.value)
  family, params, step, mesh = train.restore_for_inference(
      config, _WORKDIR.value, _STEP.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples",
                                   f"sampled_step_{step:07d}.png")
  key = jax.random.PRNGKey(_SEED.value)
  t0 = time.perf_counter()
  images = jax.jit(family.sample, static_argnums=2)(params, key, _NUM.value)
  images = np.asarray(jax.device_get(images))
  seconds = time.perf_counter() - t0
  pictures = {"": images}
  if family.visualize is not None:
    source = data.load_source(config.data, config.data.eval_split)
    size = config.train.eval_batch_size
    batch = sharding.global_batch(source, np.arange(size) % len(source),
                                  mesh)
    extra = jax.jit(family.visualize)(params, batch, key)
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
