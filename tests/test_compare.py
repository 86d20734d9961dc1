"""The cross-family report (gm_jax.report, scripts/compare.py): a tiny run
of every family's smoke config, its tables and embedded images, reuse of
finished runs, refusals, and the HTML in a real browser."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from gm_jax import config_lib, families, metrics, report
from tests.conftest import script_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
# What each family's test NLL is, stated independently of gm_jax.report.
EXPECTED_KIND = {"vae": "bound", "pixelcnn": "exact", "flow": "exact",
                 "diffusion": "bound"}
# The VAE as an MLP: it compiles faster than the conv net.
SMOKE_SPECS = [spec + (":smoke,mlp" if family == "vae" else ":smoke")
               for family, spec in report.DEFAULT_CONFIGS.items()]
NUM_SAMPLES = 16
GRID_SIDE = 4 * (28 + 1) + 1  # 16 digits, 4 x 4, one pixel of padding


def tiny_settings(**changes):
  """One device (compiles faster than the suite's eight), and the training
  grids of the size the report samples (the compilation cache serves
  both)."""
  settings = dict(fid_samples=40, num_samples=NUM_SAMPLES,
                  fid_classifier_steps=3, devices=jax.devices()[:1],
                  overrides=[("train.compilation_cache_dir", ""),
                             ("train.num_samples", str(NUM_SAMPLES))])
  settings.update(changes)
  return report.Settings(**settings)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
  """report.compare over the smoke config of every family (4 steps each)."""
  out = str(tmp_path_factory.mktemp("report"))
  cache = str(tmp_path_factory.mktemp("xdg"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", cache)
    rows = report.compare(SMOKE_SPECS, out, settings=tiny_settings())
  return out, rows, cache


def markdown_table(path):
  """The first table of a markdown file as a list of dicts."""
  lines = [line for line in open(path).read().splitlines()
           if line.startswith("| ")]
  cells = [[c.strip() for c in line.strip("|").split(" | ")]
           for line in lines]
  header = cells[0]
  width = len(header)
  body = []
  for line in cells[1:]:
    if len(line) != width or line[0] not in families.FAMILIES:
      break  # the next table (the samples) starts
    body.append(dict(zip(header, line, strict=True)))
  return body


def number(cell):
  """The leading number of a cell ("98.21 ± 1.16", "14,417", "3.33")."""
  return float(cell.split(" ")[0].replace(",", ""))


def test_report_has_every_family_with_finite_numbers(smoke_report):
  out, rows, _ = smoke_report
  table = markdown_table(os.path.join(out, "report.md"))
  # The four families of the default comparison (further families, such as
  # vdm, are variants that --families names).
  assert sorted(r["family"] for r in table) == sorted(
      {"vae", "pixelcnn", "flow", "diffusion"})
  assert set(report.DEFAULT_CONFIGS) | set(report.VARIANT_CONFIGS) >= set(
      families.FAMILIES)
  for line, row in zip(table, rows, strict=True):
    assert line["config"] == f"`{row.spec}`"
    assert line["steps x batch"] == "4 x 8"
    assert line["likelihood"].split(" ")[0] == EXPECTED_KIND[line["family"]]
    for name in ("parameters", "train images/s", "test NLL (nats)",
                 "test bits/dim", "FID", "KID",
                 f"sample {NUM_SAMPLES} (s)"):
      assert math.isfinite(number(line[name])), (line["family"], name)
    assert "±" in line["test NLL (nats)"] and "±" in line["KID"]
    assert number(line["parameters"]) == row.num_params > 0
    assert row.metrics["nll_nats_stderr"] > 0
    # The two units of one figure: nats / (784 log 2) = bits/dim.
    assert row.metrics["bpd"] == pytest.approx(
        row.metrics["nll_nats"] / (784 * math.log(2)), rel=1e-5)
    assert row.metrics["fid_num_samples"] == 40
    assert row.metrics["fid_extractor"].startswith("mnist_classifier-")
    assert row.status == "trained" and row.wall_seconds > 0
  text = open(os.path.join(out, "report.md")).read()
  for needed in ("command:", "date:", "device:", "jax 0.", "flax ",
                 "40 samples per run", "Mode: full", "curves.png"):
    assert needed in text, needed


def _data_uri_images(html_text):
  sources = re.findall(r"<img [^>]*src='([^']*)'", html_text)
  images = []
  for source in sources:
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:80]
    images.append(Image.open(io.BytesIO(base64.b64decode(
        source[len(prefix):]))))
  return images


def test_html_embeds_decodable_images(smoke_report):
  out, rows, _ = smoke_report
  text = open(os.path.join(out, "report.html")).read()
  assert "http://" not in text and "https://" not in text  # self-contained
  images = _data_uri_images(text)
  assert len(images) == len(rows) + 1  # the grids, then the curves
  for image, row in zip(images, rows, strict=False):
    assert image.size == (GRID_SIDE, GRID_SIDE) and image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), row.grid[..., 0])
    saved = Image.open(os.path.join(out, f"samples_{row.name}.png"))
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(image))
  curves = images[-1]
  assert curves.size[0] > 400 and curves.size[1] > 200
  # The labelled side-by-side picture: one panel per run, wider than tall.
  picture = Image.open(os.path.join(out, "samples.png"))
  assert picture.size[0] >= 250 * len(rows) and picture.size[1] > 200
  for row in rows:
    assert f"<td>{row.family}</td>" in text


def _files_and_mtimes(folder):
  return {os.path.join(root, name): os.stat(os.path.join(root, name)
                                            ).st_mtime_ns
          for root, _, names in os.walk(folder) for name in names}


def test_finished_runs_are_reused_without_training(smoke_report, tmp_path):
  out, rows, cache = smoke_report
  runs = os.path.join(out, "runs")
  before = _files_and_mtimes(runs)
  records = metrics.read_metrics(rows[0].workdir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", cache)
    again = report.compare(SMOKE_SPECS[:1], str(tmp_path), runs_dir=runs,
                           settings=tiny_settings())
  assert _files_and_mtimes(runs) == before  # nothing written or touched
  assert metrics.read_metrics(rows[0].workdir) == records
  assert again[0].status == "reused" and again[0].steps == 4
  assert again[0].wall_seconds == pytest.approx(rows[0].wall_seconds)
  assert again[0].metrics["nll_nats"] == rows[0].metrics["nll_nats"]
  text = open(tmp_path / "report.md").read()
  assert "(reused)" in text and "Reused finished runs" in text

  # Another config for the same workdir is refused, naming the key.
  with pytest.raises(report.ReportError,
                     match=r"another config.*train.num_steps: 4 -> 5"):
    report.compare(SMOKE_SPECS[:1], str(tmp_path / "other"), runs_dir=runs,
                   settings=tiny_settings(overrides=[
                       ("train.compilation_cache_dir", ""),
                       ("train.num_samples", str(NUM_SAMPLES)),
                       ("train.num_steps", "5")]))
  assert _files_and_mtimes(runs) == before
  assert not os.path.exists(tmp_path / "other")


def test_existing_report_is_not_overwritten(smoke_report):
  out, _, _ = smoke_report
  before = _files_and_mtimes(out)
  with pytest.raises(report.ReportError, match="already holds report.md"):
    report.compare(SMOKE_SPECS, out, settings=tiny_settings())
  assert _files_and_mtimes(out) == before


def test_plan_of_a_workdir(tmp_path):
  """train (new or empty), resume (compare's own unfinished run), reuse
  (finished: tested above) or a refusal naming the way out."""
  config, _ = report.load_config(SMOKE_SPECS[0], tiny_settings())
  workdir = str(tmp_path / "run")
  assert report.plan_run(workdir, config, SMOKE_SPECS[0]) == "train"
  os.makedirs(workdir)
  assert report.plan_run(workdir, config, SMOKE_SPECS[0]) == "train"
  (tmp_path / "run" / "notes.txt").write_text("mine")
  with pytest.raises(report.ReportError, match="holds no run"):
    report.plan_run(workdir, config, SMOKE_SPECS[0])
  (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(report.ReportError,
                     match="unfinished run that compare did not start.*"
                     "scripts/train.py"):
    report.plan_run(workdir, config, SMOKE_SPECS[0])
  (tmp_path / "run.compare.json").write_text(json.dumps(
      {"config": SMOKE_SPECS[0], "train_seconds": 1.0, "sessions": 1}))
  assert report.plan_run(workdir, config, SMOKE_SPECS[0]) == "resume"


def test_quick_overrides_shorten_every_default_config():
  for spec in [*report.DEFAULT_CONFIGS.values(),
               *report.VARIANT_CONFIGS.values()]:
    full = config_lib.load(spec)
    quick, applied = report.load_config(spec, report.Settings(quick=True))
    assert 20 <= quick.train.num_steps <= full.train.num_steps // 10
    assert quick.train.eval_examples == 100
    assert quick.train.eval_every == quick.train.num_steps
    assert quick.train.sample_every == 0  # the report draws the grids
    assert quick.train.num_steps % quick.train.log_every == 0
    assert ("train.num_steps", str(quick.train.num_steps)) in applied
  assert report.run_name("configs/vae_mnist.py:smoke,mlp", True) == (
      "vae_mnist_smoke_mlp_quick")


def test_full_runs_draw_no_grids_and_reuse_runs_that_did(tmp_path):
  """The full report's runs draw no in-training sample grids either (the
  report draws its own); a finished run of the same config that drew them,
  or that evaluated its curve on more examples, is reused, not refused."""
  spec = report.DEFAULT_CONFIGS["vae"]
  config, applied = report.load_config(spec, report.Settings())
  assert config.train.sample_every == 0
  assert applied == [("train.sample_every", "0")]
  assert config.train.num_steps == config_lib.load(spec).train.num_steps
  workdir = tmp_path / "run"
  workdir.mkdir()
  old = config_lib.load(spec)
  old.unlock()
  old.train.sample_every, old.train.curve_eval_examples = 1000, -1
  (workdir / "config.json").write_text(old.to_json_best_effort())
  assert report.config_differences(str(workdir), config) == []
  old.model.latent_dim += 1
  (workdir / "config.json").write_text(old.to_json_best_effort())
  assert report.config_differences(str(workdir), config) == [
      f"model.latent_dim: {old.model.latent_dim!r} ->"
      f" {config.model.latent_dim!r}"]


def _script(*args, **env):
  return subprocess.run([sys.executable, "scripts/compare.py", *args],
                        cwd=REPO, env={**script_env(), **env},
                        capture_output=True, text=True, timeout=300)


def _one_line(stderr):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_script_refusals_are_one_line(smoke_report, tmp_path):
  out, _, _ = smoke_report
  before = _files_and_mtimes(out)
  proc = _script(f"--out={out}", "--families=vae")
  assert proc.returncode == 2
  assert "already holds" in _one_line(proc.stderr)
  assert "--overwrite" in proc.stderr
  assert _files_and_mtimes(out) == before
  proc = _script(f"--out={tmp_path}", "--families=vae,gan")
  assert proc.returncode == 2 and "gan" in _one_line(proc.stderr)
  proc = _script(f"--out={tmp_path}", "--families=vae",
                 "--config.train.num_stepz=3")
  assert proc.returncode == 2 and "num_stepz" in _one_line(proc.stderr)
  assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"no browser at {CHROMIUM} (apt-get install"
                    " chromium)")
def test_report_images_load_in_chromium(smoke_report, tmp_path):
  """Headless Chromium opens report.html; a script added to a copy marks
  the body once the page has loaded with how many images decoded."""
  out, rows, _ = smoke_report
  text = open(os.path.join(out, "report.html")).read()
  probe = ("<script>window.addEventListener('load', function () {"
           " var images = Array.from(document.images);"
           " var good = images.filter(function (i) {"
           " return i.complete && i.naturalWidth > 0; }).length;"
           " document.body.setAttribute('data-loaded',"
           " good + '/' + images.length); });</script>")
  page = tmp_path / "report.html"
  page.write_text(text.replace("</body>", probe + "</body>"))
  profile = tmp_path / "profile"
  command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
  proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  marker = re.search(r'data-loaded="(\d+)/(\d+)"', proc.stdout)
  assert marker, proc.stdout[-2000:]
  assert marker.group(1) == marker.group(2) == str(len(rows) + 1)
  shutil.rmtree(profile, ignore_errors=True)
