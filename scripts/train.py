"""Trains a model from a config file; rerunning with the same workdir resumes.

  python scripts/train.py --config=configs/vae_mnist.py --workdir=/tmp/vae
  python scripts/train.py --config=configs/vae_mnist.py:smoke --workdir=/tmp/s \
      --config.optim.learning_rate=3e-4

Multi-host (one process per host; see README "Launching on a cluster"):

  python scripts/train.py --config=... --workdir=<shared dir> \
      --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gm_jax import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/vae_mnist.py[:smoke].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint folder.")
flags.mark_flags_as_required(["config", "workdir"])
launch.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  launch.initialize_distributed()
  from gm_jax import train  # after jax.distributed, before any JAX use
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if results and launch.is_main_process():
    shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items())
    print(f"Final test metrics: {shown}", flush=True)


if __name__ == "__main__":
  launch.run(main)
