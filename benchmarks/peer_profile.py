"""Where a PyTorch peer's train step spends its time: the counterpart of
``layer_costs.py``'s split of a gm_jax step (layers against the rest).

It runs one of the peers' scripts (../shared/peers, the same command
``side_by_side.sh`` runs) unchanged, except that the first timing call of
its ``_common.time_fn`` (the train step, in every peer script) runs its
timed steps under ``torch.profiler``. It then prints the self CPU time per
step of PyTorch's operators, grouped: convolutions (forward and backward),
matrix products, normalisations, the optimizer, and the rest (elementwise
work, the loss, copies). The profiler adds a little time per operator, so
the groups' shares matter more than their sum. torch only: run it with the
peers' interpreter.

  $PEERSENV/bin/python benchmarks/peer_profile.py ddpm_unet.py --ddim-steps 0
  $PEERSENV/bin/python benchmarks/peer_profile.py pixelcnn.py --model pixelcnn --sample-n 0
"""

from __future__ import annotations

import collections
import os
import runpy
import sys

GROUPS = (
    # (group, substrings of the operator's name), first match wins.
    ("convolutions", ("conv",)),
    ("matrix products", ("::mm", "::bmm", "::addmm", "::baddbmm", "matmul",
                         "einsum", "linear", "scaled_dot_product")),
    ("normalisations", ("group_norm", "layer_norm", "batch_norm",
                        "vector_norm")),
    ("optimizer", ("_foreach", "adam", "Optimizer", "lerp")),
)


def group_of(name: str) -> str:
  for group, keys in GROUPS:
    if any(k in name for k in keys):
      return group
  return "rest"


def report(events, steps: int) -> str:
  """The table of ``events`` ((name, self CPU microseconds) pairs, the
  profiler's key averages) per step, by group, then the top operators."""
  by_group: collections.Counter = collections.Counter()
  by_name: collections.Counter = collections.Counter()
  for name, us in events:
    by_group[group_of(name)] += us
    by_name[name] += us
  total = sum(by_group.values()) or 1.0
  lines = [f"self CPU time per step: {total / 1e3 / steps:.1f} ms", "",
           "| group | ms / step | share |", "|---|---|---|"]
  for group, us in by_group.most_common():
    lines.append(f"| {group} | {us / 1e3 / steps:.1f} |"
                 f" {100 * us / total:.0f}% |")
  lines += ["", "| operator | group | ms / step |", "|---|---|---|"]
  for name, us in by_name.most_common(15):
    lines.append(f"| `{name}` | {group_of(name)} | {us / 1e3 / steps:.2f} |")
  return "\n".join(lines)


def main() -> None:
  if len(sys.argv) < 2:
    sys.exit("usage: peer_profile.py PEER_SCRIPT [its arguments]")
  import torch
  peers = os.environ.get("PEERS", os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
      "peers"))
  script = os.path.join(peers, sys.argv[1])
  if not os.path.exists(script):
    sys.exit(f"no peer script {script} (set $PEERS to the peers' folder)")
  sys.path.insert(0, peers)
  import _common  # the peers' shared timing code
  timed = _common.time_fn
  profiled = []

  def time_fn(fn, warmup, steps):
    if profiled:
      return timed(fn, warmup, steps)
    for _ in range(warmup):
      fn()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      times = timed(fn, 0, steps)
    profiled.append(report(
        [(e.key, e.self_cpu_time_total) for e in prof.key_averages()],
        steps))
    return times
  _common.time_fn = time_fn
  sys.argv = [script] + sys.argv[2:]
  os.chdir(peers)
  runpy.run_path(script, run_name="__main__")
  print("\n".join(profiled) or "the peer script timed nothing")


if __name__ == "__main__":
  main()
