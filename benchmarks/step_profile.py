r"""Where one train step's time goes: XLA:CPU's compiled step, op by op, beside PyTorch's profile of the same step.

  taskset -c 1 python -m benchmarks.step_profile [--size small|minilm] [--batch N] [--method full]
      [--mode reparam|factored] [--top 12]

The jaxpeft step is `benchmarks.train_step`'s (the harness step of BERT at the chosen size), compiled once
and run twice, then traced for one step with `jax.profiler.trace` (its Perfetto trace holds one event per
executed XLA:CPU thunk, named after the HLO instruction). Each instruction of the optimized HLO's entry
computation is put in one group:

* matrix products (a `dot`, or a YNNPACK fusion around one), by what they compute: the Dense layers'
  forward `x W`, input gradient `dy W^T` and weight gradient `x^T dy` (the product contracting the tokens,
  the left operand's leading axis), and the batched products of attention; with their GFLOP/s and whether
  XLA:CPU ran them on YNNPACK or Eigen;
* every other instruction, by the operation of the model it came from (its `op_name` metadata, with the
  layer index dropped: `encoder/layer_N/mlp/erf`), forward or backward.

The torch step (`benchmarks.train_step`'s, torch full fine-tuning or PEFT) is profiled with
`torch.profiler` and listed by operator. Both use one thread per process (pin the process to one core).
Times are from one traced step, so compare shares and ratios rather than absolute times on a shared
machine. Where the time went in issue 20 (README, "Train-step speed") was found with this.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from benchmarks import train_step

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\), (.*?)(?:, metadata|$)")


def _computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines ('ENTRY' for the entry computation)."""
  out, current = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
      out[current] = []
    elif current is not None and line.startswith(" "):
      out[current].append(line)
  return out


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _dot_kind(line: str, shapes: dict[str, list[int]]) -> tuple[str, int]:
  """('dense forward' | 'dense input gradient' | 'dense weight gradient' | 'attention', FLOPs) of a dot."""
  out, lhs, _, dims = _DOT.search(line).groups()
  contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dims).group(1))
  k = 1
  for d in contracting:
    k *= shapes[lhs][d]
  n = 1
  for d in _dims(out):
    n *= d
  if "batch_dims" in dims:
    return "attention", 2 * n * k
  if contracting == [0]:
    return "dense weight gradient", 2 * n * k
  op_name = re.search(r'op_name="([^"]*)"', line)
  backward = op_name is not None and "transpose(" in op_name.group(1)
  return ("dense input gradient" if backward else "dense forward"), 2 * n * k


def _operation(line: str) -> str:
  """'F encoder/layer_N/mlp/erf' from an instruction's op_name (F: forward, B: backward)."""
  found = re.search(r'op_name="([^"]*)"', line)
  name = found.group(1) if found else "(no op_name)"
  direction = "B" if "transpose(" in name else "F"
  name = re.sub(r"^jit\(\w+\)/(transpose\()?(jvp\(\w+\)\)?/)?", "", name.split("_hidden_states/")[-1])
  return f"{direction} {re.sub(r'layer_[0-9]+', 'layer_N', name)}"


def jax_profile(size: str, batch: int | None, method: str, mode: str = "reparam") -> dict:
  """Traced milliseconds per group of the compiled harness step (module docstring), and its total.

  `mode` is the adapter's: 'reparam' (rebuilt weights) or 'factored' (LoRA's `x W + s (x A) B`).
  """
  import jax  # pylint: disable=g-import-not-at-top

  arch, default_batch, length = train_step.SIZES[size]
  run = train_step._jax_step(method, arch, batch or default_batch, length, mode)  # pylint: disable=protected-access
  run()
  run()
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      run()
    (trace,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  computations = _computations(run.compiled.as_text())
  lines, shapes = {}, {}
  for body in computations.values():
    for line in body:
      if found := _INSTRUCTION.match(line):
        shapes[found.group(1)] = _dims(found.group(3))
  for line in computations["ENTRY"]:
    if found := _INSTRUCTION.match(line):
      lines[found.group(1)] = line
  groups = collections.defaultdict(lambda: {"ms": 0.0, "count": 0, "flops": 0, "eigen_ms": 0.0})
  for event in events:
    if event.get("ph") != "X" or event["name"] not in lines:
      continue
    name, line, ms = event["name"], lines[event["name"]], event["dur"] / 1e3
    dots = [line] if " dot(" in line else []
    if " fusion(" in line and "__ynn_fusion" in line:
      called = re.search(r"calls=%?([\w.\-]+)", line).group(1)
      dots = [l for l in computations.get(called, []) if " dot(" in l]
    if dots:
      kinds = [_dot_kind(d, shapes) for d in dots]
      key = f"matmul: {kinds[0][0]}"
      groups[key]["flops"] += sum(flops for _, flops in kinds)
      groups[key]["eigen_ms"] += ms if " dot(" in line else 0.0
    else:
      key = _operation(line)
    groups[key]["ms"] += ms
    groups[key]["count"] += 1
  return {"groups": dict(groups), "total_ms": sum(g["ms"] for g in groups.values())}


def torch_profile(size: str, batch: int | None, method: str) -> dict:
  """Self CPU milliseconds per operator of one torch (+ PEFT) train step, and their total."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  arch, default_batch, length = train_step.SIZES[size]
  run = train_step._torch_step(method, arch, batch or default_batch, length)  # pylint: disable=protected-access
  run()
  run()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    run()
  ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
  return {"ops": ops, "total_ms": sum(ops.values())}


def report(jax_result: dict, torch_result: dict, top: int) -> str:
  """Markdown: matrix products with GFLOP/s, the `top` other groups of each side, and the totals."""
  total = jax_result["total_ms"]
  groups = jax_result["groups"]
  rows = [
      f"jaxpeft: {total:.0f} ms traced; torch: {torch_result['total_ms']:.0f} ms of operators\n",
      "| jaxpeft matrix products | ms | share | GFLOP/s | on Eigen (ms) |",
      "|---|---:|---:|---:|---:|",
  ]
  for key in sorted(k for k in groups if k.startswith("matmul: ")):
    g = groups[key]
    rows.append(
        f"| {key[8:]} | {g['ms']:.1f} | {g['ms'] / total:.1%} | {g['flops'] / g['ms'] / 1e6:.1f} | {g['eigen_ms']:.1f} |"
    )
  others = sorted((k for k in groups if not k.startswith("matmul: ")), key=lambda k: -groups[k]["ms"])
  rest = sum(groups[k]["ms"] for k in others)
  rows += ["", f"| jaxpeft other work ({rest:.0f} ms, top {top}) | ms | instructions |", "|---|---:|---:|"]
  rows += [f"| {k} | {groups[k]['ms']:.1f} | {groups[k]['count']} |" for k in others[:top]]
  ops = sorted(torch_result["ops"].items(), key=lambda kv: -kv[1])
  rows += ["", f"| torch operator (top {top}) | ms |", "|---|---:|"]
  rows += [f"| {name} | {ms:.1f} |" for name, ms in ops[:top]]
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(train_step.SIZES), default="minilm")
  parser.add_argument("--batch", type=int, default=None, help="batch size (default: the size's)")
  parser.add_argument("--method", choices=sorted(train_step.TORCH_OF), default="full")
  parser.add_argument("--mode", choices=("reparam", "factored"), default="reparam", help="jaxpeft adapter mode")
  parser.add_argument("--top", type=int, default=12)
  args = parser.parse_args()
  before = train_step.load_average()
  jax_result = jax_profile(args.size, args.batch, args.method, args.mode)
  torch_result = torch_profile(args.size, args.batch, args.method)
  arch, batch, length = train_step.SIZES[args.size]
  print(
      f"BERT {arch['num_hidden_layers']}x{arch['hidden_size']}, batch {args.batch or batch} x {length}, {args.method}"
      f" ({args.mode} in jaxpeft);"
      f" {len(os.sched_getaffinity(0))} core(s); load average {before} before, {train_step.load_average()} after\n"
  )
  print(report(jax_result, torch_result, args.top))


if __name__ == "__main__":
  main()
