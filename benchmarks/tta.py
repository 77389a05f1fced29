r"""Images per second of test-time adaptation: every jaxpeft.tta method, and PyTorch Tent and EATA, one model.

  python -m benchmarks.tta [--batch_size 64] [--rounds 10] [--methods tent,eata] [--torch_threads 2]

The model is configs/fashion_resnet.py's BatchNorm ResNet (random weights; speed does not depend on
them) on batches of 28x28x1 images; the PyTorch model is the same network (same layers, shapes and
parameter count; `torch_resnet`). Each jaxpeft method runs with its launch config (configs/tta_<method>.py:
optimizer and options; RMT without warm-up, which is not timed), its step jitted; PyTorch Tent and EATA
follow the authors' code (DequanWang/tent, mr-eggplant/EATA: BatchNorm with batch statistics, only its
affine parameters trained, Adam(1e-3) for Tent as jaxpeft's config, SGD(0.00025, momentum 0.9) for EATA,
the Fisher term included). One timed step = one adaptation step on one batch, ended by
`block_until_ready` / the PyTorch step's return. All variants are warmed up (compilation), then timed in
rotation for `--rounds` rounds so that load changes on a shared machine hit them alike; the table gives
the median images/s with quartiles and the jaxpeft / PyTorch ratio of the medians, and `uptime` before
and after. The images are random, so CoTTA's source confidence stays below its threshold and it always
averages its 32 augmentations (its worst case); EATA's filters keep what the random model lets through.
"""

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from experiments.tta import method_setup
from jaxpeft.models.resnet import ResNet
from jaxpeft.train import tta_loop
from jaxpeft.tta import METHODS, runner

NUM_CLASSES = 10


class TorchBasicBlock(torch.nn.Module):
  """jaxpeft.models.resnet.BasicBlock in PyTorch."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(cout)
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(cout)
    self.shortcut = None
    if cin != cout or stride != 1:
      self.shortcut = torch.nn.Sequential(
          torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu((x if self.shortcut is None else self.shortcut(x)) + y)


def torch_resnet(stage_sizes: tuple[int, ...], width: int) -> torch.nn.Module:
  """jaxpeft.models.resnet.ResNet in PyTorch (NCHW)."""
  layers, cin = [
      torch.nn.Conv2d(1, width, 3, 1, 1, bias=False),
      torch.nn.BatchNorm2d(width),
      torch.nn.ReLU(),
  ], width
  for i, blocks in enumerate(stage_sizes):
    for j in range(blocks):
      layers.append(TorchBasicBlock(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
      cin = width * 2**i
  layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, NUM_CLASSES)]
  return torch.nn.Sequential(*layers)


def _entropy(x: torch.Tensor) -> torch.Tensor:
  return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def _configure(model: torch.nn.Module) -> list[torch.nn.Parameter]:
  """Tent's / EATA's configure_model: train mode, batch statistics, only BatchNorm affine trainable."""
  model.train()
  model.requires_grad_(False)
  params = []
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.requires_grad_(True)
      m.track_running_stats, m.running_mean, m.running_var = False, None, None
      params += [m.weight, m.bias]
  return params


def torch_tent(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
  optimizer = torch.optim.Adam(_configure(model), lr=1e-3, betas=(0.9, 0.999))

  def step(x):
    outputs = model(x)
    _entropy(outputs).mean(0).backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs

  return step


def torch_eata(model: torch.nn.Module, clean: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
  """EATA's forward_and_adapt_eata with main.py's Fisher (mr-eggplant/EATA), defaults of main.py."""
  params = _configure(model)
  fishers = [torch.zeros_like(p) for p in params]
  for x in clean:
    outputs = model(x)
    F.cross_entropy(outputs, outputs.max(1)[1]).backward()
    for f, p in zip(fishers, params):
      f += p.grad.detach() ** 2 / len(clean)
    model.zero_grad()
  anchors = [p.detach().clone() for p in params]
  optimizer = torch.optim.SGD(params, lr=0.00025, momentum=0.9)
  e_margin, d_margin, alpha, memory = 0.4 * np.log(NUM_CLASSES), 0.05, 2000.0, {"probs": None}

  def step(x):
    outputs = model(x)
    entropys = _entropy(outputs)
    ids1 = torch.where(entropys < e_margin)
    entropys = entropys[ids1]
    if memory["probs"] is not None:
      cos = F.cosine_similarity(memory["probs"].unsqueeze(0), outputs[ids1].softmax(1), dim=1)
      ids2 = torch.where(torch.abs(cos) < d_margin)
      entropys, kept = entropys[ids2], outputs[ids1][ids2].softmax(1)
    else:
      kept = outputs[ids1].softmax(1)
    if kept.size(0):
      new = kept.mean(0).detach()
      memory["probs"] = new if memory["probs"] is None else 0.9 * memory["probs"] + 0.1 * new
    loss = (entropys * (1 / torch.exp(entropys.detach() - e_margin))).mean(0)
    loss = loss + sum(alpha * (f * (p - a) ** 2).sum() for f, p, a in zip(fishers, params, anchors))
    if kept.size(0):
      loss.backward()
      optimizer.step()
    optimizer.zero_grad()
    return outputs

  return step


def jax_step(method: str, model: ResNet, variables: dict, clean: list) -> Callable[[jax.Array], jax.Array]:
  optimizer, options = method_setup(method)
  if method == "rmt":
    options["warmup_samples"] = 0
  config = runner.make_config(
      method, model.apply, NUM_CLASSES, tta_loop.build_optimizer(optimizer) if optimizer else None, options
  )
  module, model_state = METHODS[method], {"batch_stats": variables["batch_stats"]}
  kwargs = module.prepare(variables["params"], model_state, config, clean) if hasattr(module, "prepare") else {}
  state, step = module.init(variables["params"], model_state, config, **kwargs), jax.jit(module.step)

  def run(images):
    nonlocal state
    state, logits = step(state, images)
    return jax.block_until_ready(logits)

  return run


def interleaved(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each runner: one warm-up call each, then `rounds` rounds of one call each in turn."""
  for run in runners.values():
    run()
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return times


def _uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def benchmark(
    methods: list[str],
    batch_size: int,
    rounds: int,
    stage_sizes=(1, 1, 1),
    width: int = 16,
    torch_threads: int = 2,
) -> str:
  """The markdown report: images/s per variant (median, quartiles), jaxpeft/PyTorch ratios, uptime."""
  torch.set_num_threads(torch_threads)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(batch_size, 28, 28, 1)).astype(np.float32)
  clean = [
      (rng.uniform(size=images.shape).astype(np.float32), np.arange(batch_size) % NUM_CLASSES) for _ in range(2)
  ]
  model = ResNet(NUM_CLASSES, stage_sizes=stage_sizes, width=width)
  variables = model.init(jax.random.key(0), jnp.asarray(images))
  x = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
  torch.manual_seed(0)
  runners = {
      f"jaxpeft {m}": lambda s=jax_step(m, model, variables, clean), i=jnp.asarray(images): s(i) for m in methods
  }
  torch_clean = [torch.tensor(c).permute(0, 3, 1, 2).contiguous() for c, _ in clean]
  runners["PyTorch tent"] = lambda s=torch_tent(torch_resnet(stage_sizes, width)): s(x)
  runners["PyTorch eata"] = lambda s=torch_eata(torch_resnet(stage_sizes, width), torch_clean): s(x)
  before = _uptime()
  times = interleaved(runners, rounds)
  after = _uptime()
  rate = {name: [batch_size / t for t in ts] for name, ts in times.items()}
  median = {name: statistics.median(r) for name, r in rate.items()}
  lines = [
      f"ResNet {stage_sizes} width {width}, batch {batch_size} x 28x28x1, {rounds} interleaved rounds, "
      f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
      f"torch {torch.__version__} ({torch_threads} threads)",
      f"uptime before: {before}",
      f"uptime after:  {after}",
      "",
      "| variant | images/s (median) | quartiles | jaxpeft / PyTorch |",
      "|---|---:|---:|---:|",
  ]
  for name, r in rate.items():
    q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], None, r[0])
    method = name.split()[-1]
    ratio = ""
    if name.startswith("jaxpeft") and f"PyTorch {method}" in median:
      ratio = f"{median[name] / median[f'PyTorch {method}']:.2f}"
    lines.append(f"| {name} | {median[name]:.0f} | {q1:.0f}-{q3:.0f} | {ratio} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--methods", default=",".join(METHODS), help="jaxpeft.tta methods (default: all registered)")
  parser.add_argument("--torch_threads", type=int, default=2)
  args = parser.parse_args()
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    runner.method_module(m)
  print(benchmark(methods, args.batch_size, args.rounds, torch_threads=args.torch_threads))


if __name__ == "__main__":
  main()
