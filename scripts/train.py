"""Trains a model from a config file; rerunning with the same workdir resumes.

  python scripts/train.py --config=configs/vae_mnist.py --workdir=/tmp/vae
  python scripts/train.py --config=configs/vae_mnist.py:smoke --workdir=/tmp/s \
      --config.optim.learning_rate=3e-4

One trainer per workdir (a LOCK file names it). SIGTERM saves a checkpoint
and exits 0; the same command continues bit-identically.

Multi-host (one process per host; see README "Launching on accelerators"):

  python scripts/train.py --config=... --workdir=<shared dir> \
      --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK
"""

from absl import app, flags

from gm_jax import launch

launch.define_config_flag(
    required=True,
    help_text="Experiment config file, e.g. configs/vae_mnist.py[:smoke].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint folder.")
flags.mark_flags_as_required(["workdir"])
launch.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = launch.load_config(flags.FLAGS.config)
  launch.initialize_distributed()
  from gm_jax import train  # after jax.distributed, before any JAX use
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if results and launch.is_main_process():
    shown = ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.4f}"
                      for k, v in results.items())
    print(f"Final test metrics: {shown}", flush=True)


if __name__ == "__main__":
  launch.run(main)
