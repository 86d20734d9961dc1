"""One report comparing the families: ``scripts/compare.py``'s logic.

``compare(specs, out_dir)`` trains each config (or reuses a finished run of
it), evaluates every run the same way and writes ``report.md`` and a
self-contained ``report.html`` (images as base64 data URIs) to ``out_dir``:

* one table: family and model, parameters, steps x batch, wall time, train
  images/s, test NLL in nats and bits/dim with their standard errors and
  whether the figure is exact or a bound, FID and KID of samples (digit
  classifier features, ``gm_jax.quality``) and the time to draw one batch of
  samples;
* the sample grids side by side (also as one labelled picture,
  ``samples.png``), the train and eval curves of every run in one figure
  (``gm_jax.plots``);
* the command, date, device, load and library versions.

Runs live in ``runs_dir/<config name>[_quick]``. A workdir that already
holds a finished run of the same config is evaluated without training; an
unfinished one is resumed only when this module started it (a
``<name>.compare.json`` file next to it says so); a workdir of another
config, or someone else's unfinished run, is refused. Nothing in a workdir
is deleted or overwritten, and existing report files are kept unless
``overwrite``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from PIL import Image

from gm_jax import checkpoint as checkpoint_lib
from gm_jax import config_lib, data, launch, plots, quality, train
from gm_jax import metrics as metrics_lib

# The default config of each family on the embedded digits (the README's
# table); the flow is Glow, the faster of the two flow configs there.
DEFAULT_CONFIGS = {
    "vae": "configs/vae_mnist.py",
    "pixelcnn": "configs/pixelcnn_mnist.py",
    "flow": "configs/glow_mnist.py",
    "diffusion": "configs/diffusion_mnist.py",
}

# Further runs that --families can name (not in the default comparison):
# the other default configs and the methods added on top of the families.
VARIANT_CONFIGS = {
    "gated_pixelcnn": "configs/gated_pixelcnn_mnist.py",
    "realnvp": "configs/realnvp_mnist.py",
    "flow_vardeq": "configs/glow_mnist.py:vardeq",
    "vdm": "configs/vdm_mnist.py",
    "iddpm": "configs/diffusion_mnist.py:iddpm",
}

# What each family's test NLL is. A flow's figure is -log p(x + u) of
# uniformly dequantized data: its exact continuous density, which bounds the
# discrete NLL from above in expectation over u.
LIKELIHOOD_KIND = {
    "vae": "bound",
    "pixelcnn": "exact",
    "flow": "exact",
    "diffusion": "bound",
    "vdm": "bound",
}

SAMPLES_FIGURE = "samples.png"  # every run's grid side by side, labelled
REPORT_FILES = ("report.md", "report.html", "curves.png", SAMPLES_FIGURE)
# Keys that do not change what a run trains: a finished run whose config
# differs from the requested one only here is reused.
_IGNORED_KEYS = ("train.compilation_cache_dir", "train.cpu_convolutions",
                 "train.cpu_forward_convolutions",
                 "train.fid_every",
                 "train.fid_samples", "train.fid_classifier_steps",
                 "train.sample_every", "train.num_samples",
                 "train.curve_eval_examples")
_MARKER_SUFFIX = ".compare.json"
CURVE_METRICS = ("loss", "nll_nats", "bpd", "fid")


class ReportError(launch.UsageError):
  """A refusal (existing files, a workdir of another run): one line."""


# ----------------------------------------------------------------------------
# Settings.


# Applied to every run of the report: it draws its own sample grids after
# training, so the runs draw none (their training is the same either way).
REPORT_OVERRIDES = (("train.sample_every", 0),)


def quick_overrides(config) -> list[tuple[str, Any]]:
  """The overrides of ``--quick``: a twentieth of the steps (at least 20),
  100 evaluation examples, a log line every fifth of the run, one
  checkpoint and evaluation at its end (on top of ``REPORT_OVERRIDES``)."""
  steps = max(20, config.train.num_steps // 20)
  return [("train.num_steps", steps), ("train.eval_examples", 100),
          ("train.log_every", max(1, steps // 5)),
          ("train.eval_every", steps), ("ckpt.every_steps", steps),
          ("optim.warmup_steps", min(config.optim.warmup_steps, steps // 5))]


@dataclasses.dataclass
class Settings:
  """How the runs are compared.

  Attributes:
    quick: apply ``quick_overrides`` to every config (stated in the report).
    overrides: ("section.key", text) pairs applied to every config after
      the quick ones, like --config.KEY=VALUE on the command line.
    fid_samples: samples for FID / KID per run.
    num_samples: samples per grid, also the batch whose sampling is timed.
    fid_classifier_steps: training steps of the digit classifier; None for
      its default (its cached weights are shared with evaluate.py).
    seed: seed of the samples and of KID's subsets.
    devices: the devices of the runs' data mesh (default: all).
  """

  quick: bool = False
  overrides: Sequence[tuple[str, str]] = ()
  fid_samples: int = 1000
  num_samples: int = 64
  fid_classifier_steps: Optional[int] = None
  seed: int = 0
  devices: Optional[Sequence[jax.Device]] = None


def load_config(spec: str, settings: Settings):
  """A config file's config with the quick and the given overrides, and
  the list of (key, value text) applied."""
  try:
    config = config_lib.load(spec)
  except (FileNotFoundError, ValueError) as e:
    raise launch.UsageError(str(e)) from None
  applied = [(key, str(value)) for key, value in REPORT_OVERRIDES]
  if settings.quick:
    applied += [(key, str(value)) for key, value in quick_overrides(config)]
  applied += list(settings.overrides)
  try:
    launch.apply_overrides(config, applied)
    config_lib.validate(config)
  except ValueError as e:
    raise launch.UsageError(f"{spec}: {e}") from None
  return config, applied


def run_name(spec: str, quick: bool) -> str:
  """The workdir name of a config spec: "configs/vae_mnist.py:smoke" ->
  "vae_mnist_smoke" (+ "_quick")."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "_" + "_".join(w.strip() for w in arg.split(",") if w.strip())
  return name + ("_quick" if quick else "")


# ----------------------------------------------------------------------------
# Runs: reuse, resume or train.


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(workdir: str, config) -> list[str]:
  """["model.width: 16 -> 32", ...] between a workdir's config (with the
  defaults of keys added since) and ``config``, except keys that do not
  change what is trained."""
  saved = _flatten(json.loads(launch.workdir_config(workdir)
                              .to_json_best_effort()))
  wanted = _flatten(json.loads(config.to_json_best_effort()))
  return [f"{key}: {saved.get(key, '<unset>')!r} ->"
          f" {wanted.get(key, '<unset>')!r}"
          for key in sorted(set(saved) | set(wanted))
          if key not in _IGNORED_KEYS and saved.get(key) != wanted.get(key)]


def latest_step(workdir: str) -> int:
  """The newest checkpoint step of a workdir (0 without checkpoints)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return 0
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    return max(checkpointer.all_steps(), default=0)
  finally:
    checkpointer.close()


def plan_run(workdir: str, config, spec: str) -> str:
  """"train" (a new or empty workdir), "resume" (a run this module started)
  or "reuse" (a finished run of the same config).

  Raises:
    ReportError: the workdir holds another config's run, someone else's
      unfinished run, or files that are not a run.
  """
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return "train"
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise ReportError(f"{workdir} is not empty and holds no run"
                      " (no config.json): pass another --runs folder.")
  differences = config_differences(workdir, config)
  if differences:
    raise ReportError(
        f"{workdir} holds a run of another config than {spec} (differing"
        f" keys: {'; '.join(differences)}): pass another --runs folder or"
        " the same overrides.")
  if latest_step(workdir) >= config.train.num_steps:
    return "reuse"
  if os.path.exists(workdir + _MARKER_SUFFIX):
    return "resume"
  raise ReportError(
      f"{workdir} holds an unfinished run that compare did not start:"
      f" finish it with scripts/train.py --config={spec} --workdir={workdir}"
      " or pass another --runs folder.")


def _read_marker(workdir: str) -> dict:
  path = workdir + _MARKER_SUFFIX
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_marker(workdir: str, marker: dict) -> None:
  path = workdir + _MARKER_SUFFIX
  with open(path + ".tmp", "w") as f:
    json.dump(marker, f, indent=2)
  os.replace(path + ".tmp", path)


def train_run(workdir: str, config, spec: str, resume: bool,
              devices: Optional[Sequence[jax.Device]] = None) -> float:
  """Trains (or resumes) ``config`` in ``workdir``; returns the training
  wall time summed over the sessions this module ran."""
  marker = _read_marker(workdir) if resume else {
      "config": spec, "train_seconds": 0.0, "sessions": 0}
  _write_marker(workdir, marker)  # before training: the run is ours
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, devices=devices)
  marker["train_seconds"] += time.perf_counter() - start
  marker["sessions"] += 1
  _write_marker(workdir, marker)
  return marker["train_seconds"]


# ----------------------------------------------------------------------------
# Evaluation of a run.


@dataclasses.dataclass
class Row:
  """One run's line of the report."""

  name: str
  spec: str
  family: str
  model: str
  num_params: int
  steps: int
  batch_size: int
  status: str  # "trained", "resumed" or "reused"
  wall_seconds: Optional[float]
  images_per_sec: Optional[float]
  likelihood: str  # "exact" or "bound"
  likelihood_note: str
  overrides: list[tuple[str, str]]
  metrics: dict[str, Any]
  sample_seconds: float
  grid: np.ndarray  # uint8 [H, W, C]
  workdir: str


def describe_model(model) -> str:
  """e.g. "VAE (conv), binary data (dynamic)" from a model config, with the
  sampler where the family has a choice of them."""
  names = {"vae": "VAE", "pixelcnn": "autoregressive", "flow": "flow",
           "diffusion": "diffusion U-Net", "vdm": "VDM"}
  text = names.get(model.family, model.family)
  if model.get("architecture"):
    text += f" ({model.architecture})"
  binarize = model.get("binarize", "none")
  text += (", 8-bit data" if binarize == "none"
           else f", binary data ({binarize})")
  if model.get("sampler"):
    text += f", {model.sampler} sampler ({model.sample_steps} steps)"
  return text


def likelihood_kind(model) -> str:
  """"exact" or "bound": what a family's test NLL is for this model."""
  if model.family == "flow" and model.get("dequantization") == "variational":
    return "bound"
  return LIKELIHOOD_KIND.get(model.family, "bound")


def likelihood_note(model) -> str:
  """How a family's test NLL is computed ("" when plainly exact)."""
  if model.family == "vae":
    return f"IWAE, k = {model.iwae_samples}"
  if model.family == "diffusion":
    timesteps = model.get("eval_timesteps", 0)
    return ("variational, all timesteps" if not timesteps else
            f"variational, {timesteps}-timestep estimate")
  if model.family == "vdm":
    steps = model.get("eval_timesteps", 0)
    return ("variational, continuous time" if not steps else
            f"variational, {steps} steps")
  if model.family == "flow":
    if model.get("dequantization") == "variational":
      return "variational dequantization (Flow++)"
    return "density of uniformly dequantized data"
  return ""


def train_images_per_sec(workdir: str, batch_size: int) -> Optional[float]:
  """The median over log intervals of steps/s x batch (the trainer leaves
  compilation out)."""
  rates = [r["steps_per_sec"] for r in metrics_lib.read_metrics(workdir,
                                                                "train")
           if isinstance(r.get("steps_per_sec"), (int, float))]
  return statistics.median(rates) * batch_size if rates else None


def final_likelihood(built, params, config, workdir: str, step: int,
                     eval_source) -> dict[str, Any]:
  """The eval record the trainer wrote at ``step``; computed (and not
  written) when a run lacks it."""
  for record in reversed(metrics_lib.read_metrics(workdir, "eval")):
    if record["step"] == step and "nll_nats" in record:
      return record
  return train.evaluate_dataset(
      built.evaluate, params, eval_source, config.train.eval_batch_size,
      config.train.eval_examples, jax.random.PRNGKey(config.seed),
      built.mesh, memory_hint=train.memory_hint(config.model))


class _Extractors:
  """Feature extractors and reference statistics, one per data config."""

  def __init__(self, classifier_steps: Optional[int]):
    self._classifier_steps = classifier_steps
    self._made: dict[str, tuple] = {}

  def get(self, config):
    key = config.data.to_json_best_effort() + str(
        tuple(config.model.image_shape))
    if key not in self._made:
      settings = None
      if self._classifier_steps:
        settings = quality.ClassifierSettings(
            num_steps=self._classifier_steps)
      extractor = quality.build_extractor(
          quality.default_extractor(tuple(config.model.image_shape)),
          config.data, settings=settings)
      reference = quality.split_reference(extractor, config.data,
                                          config.data.eval_split)
      self._made[key] = extractor, reference
    return self._made[key]


def evaluate_run(name: str, spec: str, config, overrides, workdir: str,
                 status: str, wall_seconds: Optional[float],
                 settings: Settings, extractors: _Extractors) -> Row:
  """Restores a run's evaluation parameters and measures its row: the
  recorded final likelihood, FID / KID of ``settings.fid_samples`` samples
  and the time of one batch of ``settings.num_samples`` samples (after a
  first batch that compiles the sampler)."""
  built, params, step = train.restore_for_inference(
      config, workdir, devices=settings.devices)
  eval_source = data.load_source(config.data, config.data.eval_split)
  results = dict(final_likelihood(built, params, config, workdir, step,
                                  eval_source))
  extractor, reference = extractors.get(config)
  batch = settings.num_samples
  key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), 1)
  # Batches of one size throughout: the sampler compiles once, in batch 0.
  first = train.draw_samples(built.sample, params,
                             jax.random.fold_in(key, 0), batch, batch)
  start = time.perf_counter()
  timed = train.draw_samples(built.sample, params,
                             jax.random.fold_in(key, 1), batch, batch)
  sample_seconds = time.perf_counter() - start
  parts = [first, timed]
  rest = settings.fid_samples - 2 * batch
  if rest > 0:
    parts.append(train.draw_samples(
        built.sample, params, jax.random.fold_in(key, 2),
        -(-rest // batch) * batch, batch))
  samples = np.concatenate(parts)[:settings.fid_samples]
  results.update(quality.sample_scores(extractor, samples, reference,
                                       seed=settings.seed))
  return Row(
      name=name, spec=spec, family=config.model.family,
      model=describe_model(config.model), num_params=built.num_params,
      steps=step, batch_size=config.train.batch_size, status=status,
      wall_seconds=wall_seconds,
      images_per_sec=train_images_per_sec(workdir, config.train.batch_size),
      likelihood=likelihood_kind(config.model),
      likelihood_note=likelihood_note(config.model),
      overrides=list(overrides), metrics=results,
      sample_seconds=sample_seconds,
      grid=metrics_lib.image_grid(timed), workdir=workdir)


# ----------------------------------------------------------------------------
# The report.


def _plus_minus(value, stderr, digits: int) -> str:
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    return "n/a"
  text = f"{value:.{digits}f}"
  if isinstance(stderr, (int, float)) and math.isfinite(stderr):
    text += f" ± {stderr:.{digits}f}"
  return text


def _duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "n/a"
  minutes, rest = divmod(int(round(seconds)), 60)
  return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


TABLE_HEADER = ("family", "config", "model", "parameters", "steps x batch",
                "wall time", "train images/s", "test NLL (nats)",
                "test bits/dim", "likelihood", "FID", "KID",
                "sample {n} (s)")


def table_rows(rows: Sequence[Row], num_samples: int) -> list[list[str]]:
  """The header and one line of cells per run."""
  header = [h.format(n=num_samples) for h in TABLE_HEADER]
  lines = [header]
  for row in rows:
    m = row.metrics
    wall = _duration(row.wall_seconds)
    if row.status == "reused":
      wall = (f"{wall} (reused)" if row.wall_seconds is not None
              else "n/a (reused run, not timed here)")
    lines.append([
        row.family, f"`{row.spec}`", row.model, f"{row.num_params:,}",
        f"{row.steps:,} x {row.batch_size}", wall,
        "n/a" if row.images_per_sec is None else f"{row.images_per_sec:,.0f}",
        _plus_minus(m.get("nll_nats"), m.get("nll_nats_stderr"), 2),
        _plus_minus(m.get("bpd"), m.get("bpd_stderr"), 4),
        row.likelihood + (f" ({row.likelihood_note})"
                          if row.likelihood_note else ""),
        _plus_minus(m.get("fid"), None, 2),
        _plus_minus(m.get("kid"), m.get("kid_se"), 4),
        f"{row.sample_seconds:.2f}"])
  return lines


def environment(command: str) -> dict[str, str]:
  """Command, date, device, load and library versions."""
  devices = jax.devices()
  versions = []
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "numpy"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return {
      "command": command,
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "device": (f"{len(devices)} x {devices[0].device_kind}"
                 f" ({devices[0].platform}) on {platform.node() or 'a host'}"
                 f" with {os.cpu_count()} CPU cores"),
      "python": platform.python_version(),
      "libraries": ", ".join(versions),
  }


def _png_bytes(grid: np.ndarray) -> bytes:
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _notes(rows: Sequence[Row], settings: Settings, seconds: float
           ) -> list[str]:
  extractors = ", ".join(sorted({str(row.metrics.get("fid_extractor"))
                                 for row in rows}))
  notes = [f"Mode: {'--quick' if settings.quick else 'full'}."]
  for row in rows:
    if row.overrides:
      notes.append(f"{row.name} ran with " + ", ".join(
          f"{key}={value}" for key, value in row.overrides) + ".")
  notes += [
      "Test NLL: the trainer's final evaluation of the evaluation parameters"
      " on the eval split (± one standard error over examples). Binary and"
      " 8-bit data are different data: their NLLs do not compare. A flow's"
      " figure is the exact density of uniformly dequantized data, an upper"
      " bound on the NLL of the discrete data in expectation.",
      f"FID / KID: {settings.fid_samples} samples per run against the whole"
      f" eval split, features of {extractors} (KID ± its standard error"
      " over subsets); compare only scores of the same N and extractor.",
      f"Sample {settings.num_samples}: seconds for one batch of"
      f" {settings.num_samples} samples after a first batch that compiled"
      " the sampler (the grids below are that batch).",
      "Wall time: training from start to final metrics (compilation,"
      " evaluations, sample grids and checkpoints included); train"
      " images/s: the median over log intervals, without compilation.",
      f"This report took {_duration(seconds)}.",
  ]
  reused = [row.name for row in rows if row.status == "reused"]
  if reused:
    notes.append(f"Reused finished runs (not trained again): "
                 f"{', '.join(reused)}.")
  return notes


def write_markdown(path: str, rows: Sequence[Row], settings: Settings,
                   env: dict[str, str], notes: list[str],
                   grids: dict[str, str]) -> None:
  table = table_rows(rows, settings.num_samples)
  lines = ["# gm_jax: the families compared", ""]
  lines += [f"| {' | '.join(line)} |" for line in table[:1]]
  lines += ["|" + "---|" * len(table[0])]
  lines += [f"| {' | '.join(line)} |" for line in table[1:]]
  lines += ["", *[f"- {note}" for note in notes], "", "## Samples", ""]
  lines += ["| " + " | ".join(row.name for row in rows) + " |",
            "|" + "---|" * len(rows),
            "| " + " | ".join(f"![{row.name}]({grids[row.name]})"
                              for row in rows) + " |"]
  lines += ["", "## Curves", "", "![train and eval curves](curves.png)", "",
            "## Environment", ""]
  lines += [f"- {key}: `{value}`" if key == "command" else
            f"- {key}: {value}" for key, value in env.items()]
  lines += [f"- workdir of {row.name}: `{row.workdir}` ({row.status})"
            for row in rows]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: left; }
th { background: #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 1.5em; }
.grids img { width: 280px; image-rendering: pixelated; }
figure { margin: 0; }
"""


def write_html(path: str, rows: Sequence[Row], settings: Settings,
               env: dict[str, str], notes: list[str],
               curves_png: bytes) -> None:
  esc = html.escape
  table = table_rows(rows, settings.num_samples)

  def uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

  parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
           "<title>gm_jax: the families compared</title>",
           f"<style>{_STYLE}</style></head><body>",
           "<h1>gm_jax: the families compared</h1>", "<table>",
           "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table[0]) + "</tr>"]
  for line in table[1:]:
    parts.append("<tr>" + "".join(
        f"<td>{esc(cell.strip('`'))}</td>" for cell in line) + "</tr>")
  parts += ["</table>", "<ul>", *[f"<li>{esc(n)}</li>" for n in notes],
            "</ul>", "<h2>Samples</h2>", "<div class='grids'>"]
  for row in rows:
    parts.append(f"<figure><img alt='{esc(row.name)} samples'"
                 f" src='{uri(_png_bytes(row.grid))}'>"
                 f"<figcaption>{esc(row.name)}</figcaption></figure>")
  parts += ["</div>", "<h2>Curves</h2>",
            f"<img alt='train and eval curves' src='{uri(curves_png)}'>",
            "<h2>Environment</h2>", "<ul>"]
  parts += [f"<li>{esc(key)}: {esc(value)}</li>" for key, value in env.items()]
  parts += [f"<li>workdir of {esc(row.name)}: {esc(row.workdir)}"
            f" ({esc(row.status)})</li>" for row in rows]
  parts += ["</ul>", "</body></html>"]
  with open(path, "w") as f:
    f.write("\n".join(parts) + "\n")


def _grid_file(name: str) -> str:
  return f"samples_{name}.png"


def check_outputs(out_dir: str, names: Sequence[str], overwrite: bool) -> None:
  """Refuses (ReportError) when report files exist, unless ``overwrite``."""
  if overwrite:
    return
  existing = [f for f in (*REPORT_FILES, *map(_grid_file, names))
              if os.path.exists(os.path.join(out_dir, f))]
  if existing:
    raise ReportError(
        f"{out_dir} already holds {', '.join(existing)}: pass --overwrite to"
        " replace them or another --out.")


def compare(specs: Sequence[str], out_dir: str, *,
            runs_dir: Optional[str] = None,
            settings: Optional[Settings] = None, overwrite: bool = False,
            command: str = "(called from Python)") -> list[Row]:
  """Trains or reuses a run per config and writes the report.

  Args:
    specs: config specs ("configs/vae_mnist.py[:args]"), one run each.
    out_dir: where report.md, report.html, curves.png and the sample grids
      go.
    runs_dir: the workdirs' parent (default ``out_dir/runs``).
    settings: how to compare (default ``Settings()``).
    overwrite: replace existing report files.
    command: the command line, recorded in the report.

  Returns:
    The rows of the table.

  Raises:
    ReportError: existing report files, or a workdir that cannot be used
      (before anything is trained).
    launch.UsageError: a bad config spec or override.
  """
  settings = settings or Settings()
  started = time.perf_counter()
  load_at_start = os.getloadavg()[0]
  names = [run_name(spec, settings.quick) for spec in specs]
  if len(set(names)) != len(names):
    raise launch.UsageError(f"Configs given twice: {list(specs)}.")
  check_outputs(out_dir, names, overwrite)
  runs_dir = runs_dir or os.path.join(out_dir, "runs")
  loaded = [load_config(spec, settings) for spec in specs]
  workdirs = [os.path.join(runs_dir, name) for name in names]
  # Every workdir is checked before the first one trains.
  plans = [plan_run(w, c, s) for w, (c, _), s in zip(workdirs, loaded, specs,
                                                      strict=True)]
  os.makedirs(out_dir, exist_ok=True)
  extractors = _Extractors(settings.fid_classifier_steps)
  rows = []
  for name, spec, (config, overrides), workdir, plan in zip(
      names, specs, loaded, workdirs, plans, strict=True):
    print(f"== {name}: {spec} ({plan}) in {workdir}", flush=True)
    if plan == "reuse":
      wall = _read_marker(workdir).get("train_seconds")
      status = "reused"
    else:
      os.makedirs(runs_dir, exist_ok=True)
      wall = train_run(workdir, config, spec, resume=plan == "resume",
                       devices=settings.devices)
      status = "resumed" if plan == "resume" else "trained"
    rows.append(evaluate_run(name, spec, config, overrides, workdir, status,
                             wall, settings, extractors))
  curves_path = os.path.join(out_dir, "curves.png")
  plots.plot_curves(workdirs, curves_path, CURVE_METRICS, names,
                    title="train (lines) and eval (markers)")
  grids = {}
  for row in rows:
    grids[row.name] = _grid_file(row.name)
    metrics_lib.save_png(os.path.join(out_dir, grids[row.name]), row.grid)
  plots.plot_grids([row.grid for row in rows],
                   [f"{row.name}\n{row.model}" for row in rows],
                   os.path.join(out_dir, SAMPLES_FIGURE),
                   title=f"{settings.num_samples} samples of each run")
  notes = _notes(rows, settings, time.perf_counter() - started)
  env = environment(command)
  env["load average (1 min)"] = (f"{load_at_start:.2f} at start,"
                                 f" {os.getloadavg()[0]:.2f} at the end")
  write_markdown(os.path.join(out_dir, "report.md"), rows, settings, env,
                 notes, grids)
  with open(curves_path, "rb") as f:
    curves_png = f.read()
  write_html(os.path.join(out_dir, "report.html"), rows, settings, env,
             notes, curves_png)
  return rows
