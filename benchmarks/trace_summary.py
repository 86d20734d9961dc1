"""Where a step's time goes, from a ``jax.profiler`` trace.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes
``perfetto_trace.json.gz`` (Chrome trace events). On a GPU its device
tracks ("/device:GPU:0 ...") hold one event per kernel; on the CPU there are
none, and XLA's own host threads hold one event per op. ``summarize`` adds
up the complete events ("ph": "X") of the device tracks where there are
any, else of XLA's threads, by name, so that one table says which kernels
or ops cost a step most.

  python benchmarks/trace_summary.py /tmp/trace_dir --steps=5
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib


def latest_trace(directory: str | pathlib.Path) -> pathlib.Path:
  """The newest ``perfetto_trace.json.gz`` under ``directory``."""
  traces = sorted(pathlib.Path(directory).rglob("perfetto_trace.json.gz"),
                  key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
  return traces[-1]


def summarize(path: str | pathlib.Path, top: int = 20) -> dict:
  """{"device": bool, "total_us": float, "rows": [(name, us, calls)]}: the
  time of each event name, most first, on the device tracks if the trace
  has any (``device`` True), else on XLA's host threads."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  device_pids = {
      e["pid"] for e in events
      if e.get("ph") == "M" and e.get("name") == "process_name"
      and "/device:" in str(e.get("args", {}).get("name", ""))}
  # Without device tracks (the CPU), XLA's ops run on its own threads
  # ("tf_XLAEigen/...", "tf_XLAPjRtCpuClient/..."), next to the runtime's
  # wrappers ("ThunkExecutor::Execute", nesting the ops) and, on the
  # "python" thread, Python frames ("$file.py:12 f"): those are left out.
  xla_threads = {
      (e["pid"], e["tid"]) for e in events
      if e.get("ph") == "M" and e.get("name") == "thread_name"
      and str(e.get("args", {}).get("name", "")).startswith("tf_XLA")}
  time_by_name: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if device_pids:
      if e.get("pid") not in device_pids:
        continue
    elif ((e.get("pid"), e.get("tid")) not in xla_threads
          or "::" in e.get("name", "")):
      continue
    time_by_name[e.get("name", "?")] += float(e["dur"])
    calls[e.get("name", "?")] += 1
  return dict(device=bool(device_pids),
              total_us=sum(time_by_name.values()),
              rows=[(name, us, calls[name])
                    for name, us in time_by_name.most_common(top)])


def format_summary(summary: dict, steps: int = 1) -> str:
  """The summary as a Markdown table, times per step."""
  where = ("device kernels" if summary["device"]
           else "XLA's host ops (no device tracks)")
  total = summary["total_us"] or 1.0
  lines = [f"{where}: {summary['total_us'] / 1e3 / steps:.2f} ms per step",
           "", "| name | ms / step | calls / step | share |", "|---|---|---|---|"]
  for name, us, n in summary["rows"]:
    lines.append(f"| `{name[:90]}` | {us / 1e3 / steps:.3f} | {n / steps:g} |"
                 f" {100 * us / total:.1f}% |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory")
  parser.add_argument("--steps", type=int, default=1,
                      help="steps in the trace, to report per step")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args()
  print(format_summary(summarize(latest_trace(args.directory), args.top),
                       args.steps))


if __name__ == "__main__":
  main()
