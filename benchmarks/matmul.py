r"""The dense products of a BERT train step, XLA:CPU (jitted `lax.dot_general`) vs PyTorch (`torch.matmul`).

  taskset -c 1 python -m benchmarks.matmul [--tokens 8192] [--hidden 384] [--ffn 1536] [--rank 8] [--batch 64]
      [--rounds 7] [--steps 3]

Issue 20 asks for the remaining gap between jaxpeft's and PyTorch's train steps, with its measured cause.
Nearly all of a BERT step's FLOPs are the Dense products of each layer, with `T` tokens (batch x length),
hidden size `d` and MLP size `f` (defaults: all-MiniLM-L6-v2's shapes, batch 64 x 128 as in
`benchmarks.train_step --size minilm`). For each weight `W: (m, n)` in {(d, d), (d, f), (f, d)}, and a LoRA
factor `a: (d, r)`, the step runs three products, timed here one by one:

* forward `y = x W`, `x: (T, m)`;
* input gradient `dx = dy W^T`, `dy: (T, n)` (contracts the weight's trailing axis);
* weight gradient `dW = x^T dy` (contracts the tokens, the leading axes of both), as reverse mode writes
  it for a Dense layer applied to 2-D activations `(T, m)` -- what `jaxpeft.canonical_dot` folds every
  layer's input to -- and to 3-D activations `(batch, T / batch, m)`, the plain `nn.Dense` on a
  (batch, length, features) array. For the 3-D form XLA:CPU first copies one operand transposed (timed with
  it); PyTorch's Linear flattens the tokens in its backward, so its row is `tensordot` of the 3-D arrays.
  For a weight that narrows the features (n < m), also `(dy^T x)^T`: the product with few rows, its small
  result transposed behind a barrier, as `jaxpeft.canonical_dot` computes that weight gradient.

Both frameworks get float32 operands of the same shapes; torch runs `len(os.sched_getaffinity(0))`
threads (pin the process to compare one core with one core). Each product alternates between the two
frameworks for `--rounds` rounds of `--steps` calls; printed per product: the median time and GFLOP/s
(2 T m n FLOPs) of each, and the median of per-round ratios jax / torch, then the totals of a layer's
products with each form of the weight gradient.
The 1-minute load average is printed before and after.
"""

import argparse
import collections
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.train_step import load_average


def _products(tokens: int, hidden: int, ffn: int, batch: int, rank: int = 8):
  """(name, FLOPs, jax callable, its operands, torch callable, its operands) per product."""
  if tokens % batch:
    raise ValueError(
        f"--tokens={tokens} is not a multiple of --batch={batch}: the 3-D activations are (batch, tokens / batch, d)."
    )
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  rows = []
  for m, n in ((hidden, hidden), (hidden, ffn), (ffn, hidden), (hidden, rank)):
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((tokens, m), (m, n), (tokens, n)))
    flops = 2 * tokens * m * n
    cases = {
        "x W": (lambda a, b: a @ b, (x, w), lambda a, b: a @ b, (x, w)),
        "dy W^T": (lambda a, b: a @ b.T, (dy, w), lambda a, b: a @ b.T, (dy, w)),
        "x^T dy (2-D)": (
            lambda a, b: lax.dot_general(a, b, (((0,), (0,)), ((), ()))),
            (x, dy),
            lambda a, b: a.T @ b,
            (x, dy),
        ),
        "x^T dy (3-D)": (
            lambda a, b: lax.dot_general(a, b, (((0, 1), (0, 1)), ((), ()))),
            (x.reshape(batch, -1, m), dy.reshape(batch, -1, n)),
            lambda a, b: torch.tensordot(a, b, dims=([0, 1], [0, 1])),
            (x.reshape(batch, -1, m), dy.reshape(batch, -1, n)),
        ),
    }
    if n < m:
      cases["(dy^T x)^T"] = (
          lambda a, b: lax.optimization_barrier(lax.dot_general(b, a, (((0,), (0,)), ((), ())))).T,
          (x, dy),
          lambda a, b: (b.T @ a).T,
          (x, dy),
      )
    for name, (jax_fn, jax_args, torch_fn, torch_args) in cases.items():
      rows.append(
          (
              f"{name} ({m}x{n})",
              flops,
              jax.jit(jax_fn),
              [jnp.asarray(a) for a in jax_args],
              torch_fn,
              [torch.from_numpy(a) for a in torch_args],
          )
      )
  return rows


def _time(fn, args, steps: int, block) -> float:
  """Median seconds of `steps` calls of `fn(*args)`."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(tokens: int, hidden: int, ffn: int, batch: int, rounds: int, steps: int, rank: int = 8) -> list[dict]:
  """Per product: name, FLOPs, the jax and torch seconds of each round (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  results = []
  for name, flops, jax_fn, jax_args, torch_fn, torch_args in _products(tokens, hidden, ffn, batch, rank):
    jax_fn(*jax_args).block_until_ready()  # compile
    torch_fn(*torch_args)
    jax_times, torch_times = [], []
    for _ in range(rounds):
      jax_times.append(_time(jax_fn, jax_args, steps, lambda y: y.block_until_ready()))
      torch_times.append(_time(torch_fn, torch_args, steps, lambda y: y))
    results.append({"name": name, "flops": flops, "jax": jax_times, "torch": torch_times})
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=64 * 128)
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--ffn", type=int, default=1536)
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank: the factor a is (hidden, rank)")
  parser.add_argument("--batch", type=int, default=64, help="batch of the 3-D weight-gradient layout")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  before = load_average()
  results = measure(args.tokens, args.hidden, args.ffn, args.batch, args.rounds, args.steps, args.rank)
  print(
      f"T={args.tokens} tokens, d={args.hidden}, f={args.ffn}, r={args.rank}; {len(os.sched_getaffinity(0))} core(s); "
      f"jax {jax.__version__}; load average {before} before, {load_average()} after\n"
  )
  print("| product | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s | jax / torch (paired median) |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in results:
    ours, theirs = statistics.median(r["jax"]), statistics.median(r["torch"])
    ratio = statistics.median(a / b for a, b in zip(r["jax"], r["torch"]))
    print(
        f"| {r['name']} | {1e3 * ours:.1f} | {r['flops'] / ours / 1e9:.1f} | {1e3 * theirs:.1f} | "
        f"{r['flops'] / theirs / 1e9:.1f} | {ratio:.2f} |"
    )
  # The layer's weights (not the LoRA factor), each with one weight-gradient form: torch's side always runs the
  # same operands, so the totals compare the products a layer's step runs in that form.
  layer = collections.defaultdict(dict)
  for r in results:
    product, shape = r["name"].rsplit(" ", 1)
    if shape != f"({args.hidden}x{args.rank})":
      layer[shape][product] = r
  forms = {
      "from 2-D activations": ("x^T dy (2-D)",),
      "from 3-D activations": ("x^T dy (3-D)",),
      "as jaxpeft.canonical_dot computes it": ("(dy^T x)^T", "x^T dy (2-D)"),
  }
  for label, preference in forms.items():
    chosen = [
        row
        for rows in layer.values()
        for row in (rows["x W"], rows["dy W^T"], next(rows[p] for p in preference if p in rows))
    ]
    ours = sum(statistics.median(r["jax"]) for r in chosen)
    theirs = sum(statistics.median(r["torch"]) for r in chosen)
    print(
        f"\nall products, weight gradient {label}: jax {1e3 * ours:.1f} ms, torch {1e3 * theirs:.1f} ms, "
        f"ratio {ours / theirs:.2f}"
    )


if __name__ == "__main__":
  main()
