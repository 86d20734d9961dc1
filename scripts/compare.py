"""Trains (or reuses) every family's default config and compares them.

  python scripts/compare.py --out=/tmp/compare            # < 30 min, 2 cores
  python scripts/compare.py --quick --out=/tmp/quick      # < 5 min
  python scripts/compare.py --families=vae,flow --out=/tmp/two \\
      --config.train.num_steps=500
  python scripts/compare.py --configs=configs/realnvp_mnist.py --out=/tmp/r
  python scripts/compare.py --runs=/tmp --out=/tmp/report  # README's runs

Writes OUT/report.md and a self-contained OUT/report.html (one table: model,
parameters, steps x batch, wall time, train images/s, test NLL in nats and
bits/dim, exact or bound, FID / KID, sampling time; the sample grids; the
curves of every run; command, date, device and versions), plus curves.png,
samples_<run>.png and samples.png (every grid side by side, labelled). Runs live in RUNS/<config name>[_quick] (default
RUNS = OUT/runs): a finished run of the same config is evaluated without
training again; a workdir of another config is refused. Existing report
files are kept unless --overwrite. --config.KEY=VALUE overrides apply to
every config. See gm_jax/report.py.
"""

import shlex
import sys

from absl import app, flags

from gm_jax import launch

_OUT = flags.DEFINE_string("out", None, "Folder of the report.")
_RUNS = flags.DEFINE_string("runs", None,
                            "Parent folder of the runs (default: OUT/runs).")
_FAMILIES = flags.DEFINE_list(
    "families", None, "Runs to compare by name: the families' default configs"
    " (vae, pixelcnn, flow, diffusion; the default is these four) or the"
    " variants gated_pixelcnn, realnvp, flow_vardeq, vdm, iddpm"
    " (report.VARIANT_CONFIGS).")
_CONFIGS = flags.DEFINE_list(
    "configs", None, "Config specs to compare instead of the families'"
    " defaults, e.g. configs/realnvp_mnist.py,configs/vae_mnist.py:mlp.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "A twentieth of the steps, 100 eval examples and 256"
    " FID samples (stated in the report).")
_FID_SAMPLES = flags.DEFINE_integer(
    "fid_samples", None, "Samples per run for FID / KID (default 1000,"
    " 256 with --quick).", lower_bound=2)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 64, "Samples per grid (the timed batch).", lower_bound=1)
_FID_CLASSIFIER_STEPS = flags.DEFINE_integer(
    "fid_classifier_steps", None,
    "Training steps of the digit classifier (default: its settings').")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples and of KID.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace existing report files in --out.")
flags.mark_flags_as_required(["out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from gm_jax import report
  if _FAMILIES.value and _CONFIGS.value:
    raise launch.UsageError("Give --families or --configs, not both.")
  if _CONFIGS.value:
    specs = _CONFIGS.value
  else:
    known = {**report.DEFAULT_CONFIGS, **report.VARIANT_CONFIGS}
    families = _FAMILIES.value or list(report.DEFAULT_CONFIGS)
    unknown = sorted(set(families) - set(known))
    if unknown:
      raise launch.UsageError(f"Unknown families {unknown}; known: {list(known)}.")
    specs = [known[f] for f in families]
  fid_samples = _FID_SAMPLES.value or (256 if _QUICK.value else 1000)
  settings = report.Settings(
      quick=_QUICK.value, overrides=launch.overrides(),
      fid_samples=fid_samples, num_samples=_NUM_SAMPLES.value,
      fid_classifier_steps=_FID_CLASSIFIER_STEPS.value, seed=_SEED.value)
  report.compare(specs, _OUT.value, runs_dir=_RUNS.value, settings=settings,
                 overwrite=_OVERWRITE.value, command=shlex.join(sys.argv))
  print(f"Wrote {_OUT.value}/report.md and {_OUT.value}/report.html")


if __name__ == "__main__":
  launch.run(main)
