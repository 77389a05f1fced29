"""Speed, memory traffic and state size of one optimizer update: jaxpeft vs optax vs PyTorch on CPU.

    python -m benchmarks.optim [--sizes 1e6,1e7] [--repeats 15] [--methods came,adopt]
    python -m benchmarks.optim --state-bytes    # state bytes/param of every jaxpeft optimizer, no timing

For each parameter count the parameters are four float32 matrices of equal shape (a "few
matrices" model). One update step is timed for every jaxpeft optimizer, for optax.adam, for optax's
own version of the same method where it exists (optax.adabelief, optax.contrib.{adopt, momo,
momo_adam, sam}), for the PyTorch version (pytorch-optimizer; the authors' adabound and momo-opt)
and for a jitted triad ``a = b + s * c`` over as many float32 elements as there are parameters,
which measures the machine's memory bandwidth at that size.

JAX steps are jitted with parameters and state donated. For each method the runners are prepared
together, warmed up (compile + one step), then timed in interleaved rounds (`--repeats` rounds,
each step ended by `block_until_ready`) so that load changes on a shared machine hit all of them
alike. Reported: the median and quartiles of each runner's times, and paired ratios (the median
over rounds of the ratio of two runners' times in the same round). Torch runs with
`--torch-threads` (default 1). Gradients are fixed inputs; methods that need more than the
gradient get the loss value (`value=`), the loss function (`obj_fn=`, AdaHessian's Hessian-vector
product) or its gradient function (`grad_fn=`, SAM/TRAM's second gradient) of the separable
quadratic 0.5 * sum(p**2), and the PyTorch versions do the same extra work (a closure with a
second backward for SAM; `backward(create_graph=True)` for AdaHessian, which PyTorch needs before
its Hessian-vector product, so that row includes one gradient evaluation more than the JAX one).

Roofline: an update must at least read the parameters, the gradients and the state and write the
parameters and the state, ``2 P + G + 2 S`` bytes (:func:`update_bytes`; more for methods that
evaluate a second gradient). At the triad's bandwidth ``B`` (12 bytes per element, measured in the
same rounds) that takes ``(2 P + G + 2 S) / B``; the roofline fraction is that time over the
update's time. Both the triad's and the update's time are their fastest round: load only ever adds
time, and on a shared machine a median triad measures the other jobs, not the memory. Methods whose
update is not element-wise (matrix products, decompositions,
Hessian-vector products) are far from this bound by design.

State bytes per parameter (:func:`state_bytes_per_param`) are the bytes of the optimizer state
pytree's leaves (shapes from ``jax.eval_shape(tx.init, params)``, nothing allocated) over the
parameter count; for torch, the bytes of the optimizer's per-parameter state tensors.
"""

import argparse
import dataclasses
import functools
import gc
import inspect
import math
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft.optim
from jaxpeft.optim.adabelief import adabelief
from jaxpeft.optim.adabound import adabound
from jaxpeft.optim.adahessian import adahessian
from jaxpeft.optim.adam_cm import adam_cm
from jaxpeft.optim.adamod import adamod
from jaxpeft.optim.adopt import adopt
from jaxpeft.optim.came import came
from jaxpeft.optim.cosmos import cosmos
from jaxpeft.optim.exadam import exadam
from jaxpeft.optim.grams import grams
from jaxpeft.optim.mars import mars
from jaxpeft.optim.momo import momo, momo_adam
from jaxpeft.optim.muon import muon
from jaxpeft.optim.optimistic_amsgrad import optimistic_amsgrad
from jaxpeft.optim.sam import sam
from jaxpeft.optim.sania import sania
from jaxpeft.optim.soap import soap
from jaxpeft.optim.swats import swats
from jaxpeft.optim.tram import tram
from jaxpeft.optim.upgd import upgd

LR = 1e-3
LORA_RULES = ("loraplus", "lora_fa", "riemannian_lora")
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
      # All benchmark parameters are matrices: one Muon group.
      "muon": TorchOptimizer(lambda p: po.Muon([dict(params=p, use_muon=True)], lr=2e-2), "pytorch_optimizer"),
      "soap": TorchOptimizer(lambda p: po.SOAP(p, lr=3e-3), "pytorch_optimizer"),
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
    "adam_cm": Method(JaxOptimizer(lambda: adam_cm(LR))),
    "optimistic_amsgrad": Method(JaxOptimizer(lambda: optimistic_amsgrad(LR))),
    "sania": Method(JaxOptimizer(lambda: sania(1.0), "value")),
    "upgd": Method(JaxOptimizer(lambda: upgd(LR))),
    # Matrix methods (Newton-Schulz iterations, eigenbases): not element-wise, slow at 10M on one core.
    "muon": Method(JaxOptimizer(lambda: muon(2e-2))),
    "soap": Method(JaxOptimizer(lambda: soap(3e-3))),
    "cosmos": Method(JaxOptimizer(lambda: cosmos(LR))),
}
# Updates that are not one streaming pass over the state: the roofline fraction is not their bound.
NOT_ELEMENTWISE = ("adahessian", "sam", "tram", "muon", "soap", "cosmos")
ADAM = JaxOptimizer(lambda: optax.adam(LR))


def matrix_shapes(size: int) -> list[tuple[int, int]]:
  """NUM_MATRICES equal matrices with about `size` elements in all (rows <= cols)."""
  rows = int(math.sqrt(size / NUM_MATRICES / 2))
  return [(rows, round(size / NUM_MATRICES / rows))] * NUM_MATRICES


def representative_params(size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The benchmark's parameter tree (NUM_MATRICES float32 matrices), as shapes only."""
  return {f"w{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(matrix_shapes(size))}


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes_per_param(tx: optax.GradientTransformation, params) -> float:
  """Bytes of the optimizer state's leaves per parameter (shapes from `jax.eval_shape`, nothing allocated)."""
  state = jax.eval_shape(tx.init, params)
  return _nbytes(state) / sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def update_bytes(tx: optax.GradientTransformation, params) -> int:
  """Least bytes an update moves: read params, gradients and state; write params and state."""
  return 3 * _nbytes(params) + 2 * _nbytes(jax.eval_shape(tx.init, params))


class Runner:
  """One prepared step: `step()` runs (and waits for) it once; `state_bytes_per_param()`."""

  def __init__(self, step: Callable[[], None], state_bytes_per_param: Callable[[], float]):
    self.step = step
    self.state_bytes_per_param = state_bytes_per_param


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per step of one runner over interleaved rounds."""

  samples: tuple[float, ...]

  def quartiles(self) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
    return q1, median, q3

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def best(self) -> float:
    """The fastest round: on a loaded machine, the closest estimate of the unloaded time."""
    return min(self.samples)

  def paired_ratio(self, other: "Timing") -> float:
    """Median over rounds of this runner's time over `other`'s in the same round."""
    return statistics.median(a / b for a, b in zip(self.samples, other.samples))


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_timings(runners: list[Runner], repeats: int, clock: str = "cpu") -> list[Timing]:
  """Each runner's step times, timed in rotation so load changes hit all alike.

  ``clock="cpu"``: CPU seconds of this process (all its threads) per step, which does not count the
  time other jobs hold the cores (on a loaded machine, wall time mostly measures them);
  ``"wall"``: elapsed seconds. Each runner is warmed up twice first (compilation, then one step)."""
  now = CLOCKS[clock]
  for runner in runners:
    runner.step()
    runner.step()
  times = [[] for _ in runners]
  for _ in range(repeats):
    for runner, samples in zip(runners, times):
      start = now()
      runner.step()
      samples.append(now() - start)
  return [Timing(tuple(samples)) for samples in times]


def prepare_triad(shapes) -> Runner:
  """A jitted, donated triad a = b + s * c over as many float32 elements as the parameters."""
  n = sum(r * c for r, c in shapes)
  b, c = jnp.ones(n, jnp.float32), jnp.full(n, 2.0, jnp.float32)
  # keep_unused: `a` is not read, and a pruned argument cannot be donated; the triad would then write
  # a fresh 4-bytes-per-element buffer each call, and its page faults would double its time.
  triad = jax.jit(lambda a, b, c: b + 3.0 * c, donate_argnums=0, keep_unused=True)
  carry = [jnp.zeros(n, jnp.float32)]

  def step():
    carry[0] = triad(carry[0], b, c)
    jax.block_until_ready(carry)

  return Runner(step, lambda: 0.0)


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
  state_bytes = state_bytes_per_param(tx, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, state, grads, value):
    updates, state = tx.update(grads, state, params, **extra(value))
    return optax.apply_updates(params, updates), state

  carry = [params, state]

  def step():
    carry[:] = update(carry[0], carry[1], grads, value)
    jax.block_until_ready(carry)

  return Runner(step, lambda: state_bytes)


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


def _ms(timing: Timing | None) -> str:
  if timing is None:
    return "–"
  q1, median, q3 = (1e3 * x for x in timing.quartiles())
  return f"{median:.2f} [{q1:.2f}, {q3:.2f}]"


def _ratio(a: Timing | None, b: Timing | None) -> str:
  return "–" if a is None or b is None else f"{a.paired_ratio(b):.2f}"


def _bytes(x: float | None) -> str:
  return "–" if x is None else f"{x:.2f}"


TABLE_HEADER = (
    "| method | jaxpeft ms [q1, q3] | jaxpeft / adam | optax ms | jaxpeft / optax | torch ms | jaxpeft / torch "
    "| torch source | optax.adam ms | triad ms (best) | MB moved | roofline fraction (best) "
    "| state B/param jaxpeft / optax / torch |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def benchmark_size(
    size: int, methods: list[str], repeats: int, with_torch: bool, notes: list[str], clock: str = "cpu"
) -> str:
  shapes = matrix_shapes(size)
  num_params = sum(r * c for r, c in shapes)
  torch_refs = _torch_optimizers() if with_torch else {}
  lines = [
      f"### {num_params:,} parameters ({NUM_MATRICES} x {shapes[0][0]}x{shapes[0][1]} float32)",
      "",
      TABLE_HEADER,
  ]
  print("\n".join(lines), flush=True)
  for name in methods:
    method = METHODS[name]
    runners = {
        "adam": prepare_jax(ADAM, shapes),
        "ours": prepare_jax(method.ours, shapes),
        "triad": prepare_triad(shapes),
    }
    if method.optax is not None:
      runners["optax"] = prepare_jax(method.optax, shapes)
    source = "none"
    if name in torch_refs:
      source = torch_refs[name].source
      runners["torch"] = prepare_torch(torch_refs[name], shapes)
    elif with_torch:
      notes.append(f"{name}: no PyTorch package implements it.")
    timings = dict(zip(runners, interleaved_timings(list(runners.values()), repeats, clock)))
    state = {k: r.state_bytes_per_param() for k, r in runners.items()}
    del runners
    gc.collect()
    adam, ours, theirs, torch_t, triad = (timings.get(k) for k in ("adam", "ours", "optax", "torch", "triad"))
    moved = update_bytes(method.ours.make(), representative_params(size))
    # Best rounds of both: load only ever adds time, and the median of a loaded triad is not a bandwidth.
    bandwidth = 12 * num_params / triad.best  # bytes/s: read b and c, write a
    fraction = moved / bandwidth / ours.best
    roofline = f"{fraction:.2f}" + (" (not element-wise)" if name in NOT_ELEMENTWISE else "")
    lines.append(
        f"| {name} | {_ms(ours)} | {_ratio(ours, adam)} | {_ms(theirs)} | {_ratio(ours, theirs)} "
        f"| {_ms(torch_t)} | {_ratio(ours, torch_t)} | {source} | {_ms(adam)} | {1e3 * triad.best:.2f} "
        f"| {moved / 1e6:.0f} | {roofline} "
        f"| {_bytes(state['ours'])} / {_bytes(state.get('optax'))} / {_bytes(state.get('torch'))} |"
    )
    print(lines[-1], flush=True)
  return "\n".join(lines)


def state_bytes_table(size: int) -> str:
  """State bytes/param of every jaxpeft.optim factory with a learning rate, on the benchmark's tree."""
  params = representative_params(size)
  rows = ["| factory | state B/param |", "|---|---|"]
  for name in jaxpeft.optim.__all__:
    factory = getattr(jaxpeft.optim, name)
    # The LoRA rules read an adapter tree's factors; their state is their base optimizer's.
    if (
        name in LORA_RULES
        or name.startswith("scale_by")
        or "learning_rate" not in inspect.signature(factory).parameters
    ):
      continue
    rows.append(f"| `{name}` | {state_bytes_per_param(factory(learning_rate=1e-3), params):.2f} |")
  rows.append(f"| `optax.adam` | {state_bytes_per_param(optax.adam(1e-3), params):.2f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated parameter counts")
  parser.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds per method")
  parser.add_argument(
      "--clock", choices=list(CLOCKS), default="cpu", help="process CPU time or wall time per step"
  )
  parser.add_argument("--state-bytes", action="store_true", help="only print every optimizer's state B/param")
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
  if args.state_bytes:
    for size in sizes:
      print(f"### State bytes per parameter, {size:g} parameters\n\n{state_bytes_table(size)}\n")
    return

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
    load = os.getloadavg()
    table = benchmark_size(size, methods, args.repeats, with_torch, notes, args.clock)
    notes.append(f"times are {args.clock} seconds per step")
    notes.append(f"load average (1, 5, 15 min) before: {load}, after: {os.getloadavg()}")
    tables.append(table + "\n\n" + "\n".join(f"* {n}" for n in notes))
    print(tables[-1] + "\n", flush=True)
  print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
