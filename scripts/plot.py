"""Training and evaluation curves of one or more workdirs into one PNG.

  python scripts/plot.py /tmp/vae_mnist /tmp/pixelcnn_mnist --out=curves.png
  python scripts/plot.py /tmp/vae_mnist --metrics=loss,nll_nats,bpd

One panel per metric; per run, train records as a line and evaluations as
dashed markers.
"""

from absl import app, flags

from gm_jax import launch

_OUT = flags.DEFINE_string("out", "curves.png", "The PNG to write.")
_METRICS = flags.DEFINE_list(
    "metrics", None, "Metric names to draw (default: all recorded).")
_LABELS = flags.DEFINE_list("labels", None, "A legend label per workdir.")


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("Give one or more workdirs.")
  if _LABELS.value and len(_LABELS.value) != len(workdirs):
    raise launch.UsageError(f"--labels has {len(_LABELS.value)} names for"
                            f" {len(workdirs)} workdirs.")
  from gm_jax import plots
  names = plots.plot_curves(workdirs, _OUT.value, _METRICS.value,
                            _LABELS.value)
  print(f"Wrote {_OUT.value} ({', '.join(names)})")


if __name__ == "__main__":
  launch.run(main)
