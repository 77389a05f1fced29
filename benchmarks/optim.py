"""Speed and memory of one optimizer update: jaxpeft vs optax vs the PyTorch reference on CPU.

    python benchmarks/optim.py [--sizes 1e6,1e7,1e8] [--repeats 10] [--methods came,adopt]

For each parameter count the parameters are four float32 matrices of equal shape (a "few
matrices" model). One update step is timed for every jaxpeft optimizer, for optax.adam, for optax's
own version of the same method where it exists (optax.adabelief, optax.contrib.{adopt, momo,
momo_adam, sam}) and for the PyTorch version (pytorch-optimizer; the authors' momo-opt for MoMo).

JAX steps are jitted with parameters and state donated. For each method, optax.adam, ours, optax's
and torch's steps are prepared together, warmed up (compile + one step), then timed in rotation
(`--repeats` rounds, each step ended by `block_until_ready`) so that load changes on a shared
machine hit all of them alike; medians are reported. Torch runs with `--torch-threads` (default 1). Gradients
are fixed inputs; methods that need more than the gradient get the loss value (`value=`), the loss
function (`obj_fn=`, AdaHessian's Hessian-vector product) or its gradient function (`grad_fn=`,
SAM/TRAM's second gradient) of the separable quadratic 0.5 * sum(p**2), and the PyTorch versions do
the same extra work (a closure with a second backward for SAM; `backward(create_graph=True)` for
AdaHessian, which PyTorch needs before its Hessian-vector product, so that row includes one
gradient evaluation more than the JAX one).

Output: a markdown table per size with milliseconds per step, the ratio to optax.adam timed in the
same process, jaxpeft/optax and jaxpeft/torch ratios, and optimizer-state bytes per parameter
(sum of the state pytree's nbytes, or of the torch optimizer's state tensors, / parameter count).
"""

import argparse
import dataclasses
import functools
import gc
import math
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.optim.adabelief import adabelief
from jaxpeft.optim.adabound import adabound
from jaxpeft.optim.adahessian import adahessian
from jaxpeft.optim.adamod import adamod
from jaxpeft.optim.adopt import adopt
from jaxpeft.optim.came import came
from jaxpeft.optim.exadam import exadam
from jaxpeft.optim.grams import grams
from jaxpeft.optim.mars import mars
from jaxpeft.optim.momo import momo, momo_adam
from jaxpeft.optim.sam import sam
from jaxpeft.optim.swats import swats
from jaxpeft.optim.tram import tram

LR = 1e-3
RHO = 0.05
NUM_MATRICES = 4


def quadratic_loss(params) -> jax.Array:
  return 0.5 * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))


def squared_distance(params, reference) -> jax.Array:
  return optax.tree.norm(optax.tree.sub(params, reference), squared=True)


# Extra update arguments, given the loss value of the current step.
EXTRA_ARGS: dict[str, Callable[[jax.Array], dict]] = {
    "none": lambda value: {},
    "value": lambda value: {"value": value},
    "obj_fn": lambda value: {"obj_fn": quadratic_loss},
    "grad_fn": lambda value: {"grad_fn": jax.grad(quadratic_loss)},
    "optax_sam": lambda value: {"grad_fn": lambda p, i: jax.grad(quadratic_loss)(p)},
    "tram": lambda value: {"grad_fn": jax.grad(quadratic_loss), "trust_region_fn": squared_distance},
}


@dataclasses.dataclass(frozen=True)
class JaxOptimizer:
  make: Callable[[], optax.GradientTransformation]
  extra: str = "none"


@dataclasses.dataclass(frozen=True)
class TorchOptimizer:
  make: Callable  # list of torch parameters -> torch optimizer
  source: str
  closure: str = "none"  # "sam": step(closure) with a second backward; "hessian": create_graph


@dataclasses.dataclass(frozen=True)
class Method:
  ours: JaxOptimizer
  optax: JaxOptimizer | None = None
  torch: Callable[[], TorchOptimizer] | None = None


def _torch_optimizers() -> dict[str, TorchOptimizer]:
  """PyTorch references, imported only when torch rows are requested."""
  import adabound as adabound_authors
  import momo as momo_opt
  import pytorch_optimizer as po
  import torch

  return {
      "adabelief": TorchOptimizer(lambda p: po.AdaBelief(p, lr=LR), "pytorch_optimizer"),
      "adahessian": TorchOptimizer(lambda p: po.AdaHessian(p, lr=LR), "pytorch_optimizer", "hessian"),
      "adabound": TorchOptimizer(lambda p: adabound_authors.AdaBound(p, lr=LR), "adabound"),
      "adamod": TorchOptimizer(lambda p: po.AdaMod(p, lr=LR), "pytorch_optimizer"),
      "adopt": TorchOptimizer(lambda p: po.ADOPT(p, lr=LR), "pytorch_optimizer"),
      "came": TorchOptimizer(lambda p: po.CAME(p, lr=LR), "pytorch_optimizer"),
      "exadam": TorchOptimizer(lambda p: po.EXAdam(p, lr=LR), "pytorch_optimizer"),
      "grams": TorchOptimizer(lambda p: po.Grams(p, lr=LR), "pytorch_optimizer"),
      "mars": TorchOptimizer(lambda p: po.MARS(p, lr=LR), "pytorch_optimizer"),
      "momo": TorchOptimizer(lambda p: momo_opt.Momo(p, lr=1.0), "momo-opt", "value"),
      "momo_adam": TorchOptimizer(lambda p: momo_opt.MomoAdam(p, lr=LR), "momo-opt", "value"),
      "sam": TorchOptimizer(
          lambda p: po.SAM(p, base_optimizer=torch.optim.SGD, rho=RHO, lr=LR), "pytorch_optimizer", "sam"
      ),
      "swats": TorchOptimizer(lambda p: po.SWATS(p, lr=LR), "pytorch_optimizer"),
  }


METHODS: dict[str, Method] = {
    "adabelief": Method(JaxOptimizer(lambda: adabelief(LR)), JaxOptimizer(lambda: optax.adabelief(LR))),
    "adabound": Method(JaxOptimizer(lambda: adabound(LR))),
    "adahessian": Method(JaxOptimizer(lambda: adahessian(LR), "obj_fn")),
    "adamod": Method(JaxOptimizer(lambda: adamod(LR))),
    "adopt": Method(JaxOptimizer(lambda: adopt(LR)), JaxOptimizer(lambda: optax.contrib.adopt(LR))),
    "came": Method(JaxOptimizer(lambda: came(LR))),
    "exadam": Method(JaxOptimizer(lambda: exadam(LR))),
    "grams": Method(JaxOptimizer(lambda: grams(LR))),
    "mars": Method(JaxOptimizer(lambda: mars(LR))),
    "momo": Method(
        JaxOptimizer(lambda: momo(1.0), "value"), JaxOptimizer(lambda: optax.contrib.momo(1.0), "value")
    ),
    "momo_adam": Method(
        JaxOptimizer(lambda: momo_adam(LR), "value"), JaxOptimizer(lambda: optax.contrib.momo_adam(LR), "value")
    ),
    "sam": Method(
        JaxOptimizer(lambda: sam(LR, RHO), "grad_fn"),
        JaxOptimizer(
            lambda: optax.contrib.sam(
                optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
            ),
            "optax_sam",
        ),
    ),
    "swats": Method(JaxOptimizer(lambda: swats(LR))),
    "tram": Method(JaxOptimizer(lambda: tram(LR), "tram")),
}
ADAM = JaxOptimizer(lambda: optax.adam(LR))


def matrix_shapes(size: int) -> list[tuple[int, int]]:
  """NUM_MATRICES equal matrices with about `size` elements in all (rows <= cols)."""
  rows = int(math.sqrt(size / NUM_MATRICES / 2))
  return [(rows, round(size / NUM_MATRICES / rows))] * NUM_MATRICES


class Runner:
  """One prepared optimizer: `step()` runs (and waits for) one update; `state_bytes_per_param()`."""

  def __init__(self, step: Callable[[], None], state_bytes_per_param: Callable[[], float]):
    self.step = step
    self.state_bytes_per_param = state_bytes_per_param


def interleaved_medians(runners: list[Runner], repeats: int) -> list[float]:
  """Median seconds per step of each runner, timed in rotation so load changes hit all alike.

  Each runner is warmed up twice first (compilation, then one step)."""
  for runner in runners:
    runner.step()
    runner.step()
  times = [[] for _ in runners]
  for _ in range(repeats):
    for runner, samples in zip(runners, times):
      start = time.perf_counter()
      runner.step()
      samples.append(time.perf_counter() - start)
  return [statistics.median(samples) for samples in times]


def prepare_jax(opt: JaxOptimizer, shapes) -> Runner:
  """A jitted update step with parameters and state donated."""
  tx = opt.make()
  extra = EXTRA_ARGS[opt.extra]
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  params = {f"w{i}": jax.random.normal(keys[i], s, jnp.float32) for i, s in enumerate(shapes)}
  grads = {f"w{i}": jax.random.normal(keys[len(shapes) + i], s, jnp.float32) for i, s in enumerate(shapes)}
  value = jnp.asarray(1.0, jnp.float32)
  # Distinct buffers: an init may reuse one array in two state fields, which donation rejects.
  state = jax.tree.map(jnp.array, tx.init(params))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, state, grads, value):
    updates, state = tx.update(grads, state, params, **extra(value))
    return optax.apply_updates(params, updates), state

  carry = [params, state]

  def step():
    carry[:] = update(carry[0], carry[1], grads, value)
    jax.block_until_ready(carry)

  return Runner(step, lambda: state_bytes / num_params)


def prepare_torch(opt: TorchOptimizer, shapes) -> Runner:
  """`optimizer.step()` on torch parameters with preset gradients (plus the extra work it needs)."""
  import torch

  gen = torch.Generator().manual_seed(0)
  params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
  grads = [torch.randn(s, generator=gen) for s in shapes]
  optimizer = opt.make(params)

  def loss():
    return 0.5 * sum((p * p).sum() for p in params)

  def closure():
    optimizer.zero_grad()
    value = loss()
    value.backward()
    return value

  def step():
    if opt.closure == "hessian":
      optimizer.zero_grad()
      loss().backward(create_graph=True)
      optimizer.step()
      return
    for p, g in zip(params, grads):
      p.grad = g
    if opt.closure == "sam":
      optimizer.step(closure)
    elif opt.closure == "value":
      optimizer.step(loss=torch.tensor(1.0))
    else:
      optimizer.step()

  def state_bytes_per_param() -> float:
    # Per-parameter state dicts (momo-opt also keeps non-dict entries there, e.g. a list of losses).
    state_bytes = sum(
        t.nbytes
        for s in optimizer.state.values()
        if isinstance(s, dict)
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return state_bytes / sum(p.numel() for p in params)

  return Runner(step, state_bytes_per_param)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024


def _ms(seconds: float | None) -> str:
  return "–" if seconds is None else f"{1e3 * seconds:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
  return "–" if a is None or b is None else f"{a / b:.2f}"


def _bytes(x: float | None) -> str:
  return "–" if x is None else f"{x:.2f}"


def benchmark_size(size: int, methods: list[str], repeats: int, with_torch: bool, notes: list[str]) -> str:
  shapes = matrix_shapes(size)
  num_params = sum(r * c for r, c in shapes)
  torch_refs = _torch_optimizers() if with_torch else {}
  lines = [
      f"### {num_params:,} parameters ({NUM_MATRICES} x {shapes[0][0]}x{shapes[0][1]} float32)",
      "",
      "| method | jaxpeft ms | jaxpeft / adam | optax ms | optax / adam | jaxpeft / optax | torch ms "
      "| torch / adam | jaxpeft / torch | torch source | optax.adam ms | state B/param jaxpeft / optax / torch |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in methods:
    method = METHODS[name]
    runners = {"adam": prepare_jax(ADAM, shapes), "ours": prepare_jax(method.ours, shapes)}
    if method.optax is not None:
      runners["optax"] = prepare_jax(method.optax, shapes)
    source = "none"
    if name in torch_refs:
      source = torch_refs[name].source
      runners["torch"] = prepare_torch(torch_refs[name], shapes)
    elif with_torch:
      notes.append(f"{name}: no PyTorch package implements it.")
    seconds = dict(zip(runners, interleaved_medians(list(runners.values()), repeats)))
    state = {k: r.state_bytes_per_param() for k, r in runners.items()}
    del runners
    gc.collect()
    adam, ours, theirs, torch_s = (seconds.get(k) for k in ("adam", "ours", "optax", "torch"))
    lines.append(
        f"| {name} | {_ms(ours)} | {_ratio(ours, adam)} | {_ms(theirs)} | {_ratio(theirs, adam)} "
        f"| {_ratio(ours, theirs)} | {_ms(torch_s)} | {_ratio(torch_s, adam)} | {_ratio(ours, torch_s)} "
        f"| {source} | {_ms(adam)} "
        f"| {_bytes(state['ours'])} / {_bytes(state.get('optax'))} / {_bytes(state.get('torch'))} |"
    )
    print(lines[-1], flush=True)
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated parameter counts")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer (median)")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
  parser.add_argument(
      "--torch-threads",
      type=int,
      default=1,
      help="torch intra-op threads (on a shared, loaded 2-core machine 2 threads ran 50x slower)",
  )
  parser.add_argument("--torch-max-size", type=float, default=1e8, help="skip PyTorch above this many parameters")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
  sizes = [int(float(s)) for s in args.sizes.split(",")]

  import torch

  torch.set_num_threads(args.torch_threads)
  print(
      f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), optax {optax.__version__}, "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
      f"load average {os.getloadavg()}",
      flush=True,
  )
  tables = []
  for size in sizes:
    notes: list[str] = []
    # Parameters, gradients and up to four state copies for each of JAX and torch, float32.
    needed = 6 * 4 * size
    with_torch = not args.no_torch
    if with_torch and size > args.torch_max_size:
      with_torch = False
      notes.append(f"PyTorch skipped: {size:,} parameters > --torch-max-size.")
    elif with_torch and needed > available_bytes():
      with_torch = False
      notes.append(
          f"PyTorch skipped: needs about {needed / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available."
      )
    table = benchmark_size(size, methods, args.repeats, with_torch, notes)
    tables.append(table + ("\n\n" + "\n".join(f"* {n}" for n in notes) if notes else ""))
    print(tables[-1] + "\n", flush=True)
  print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
