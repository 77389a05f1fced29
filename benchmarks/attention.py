r"""Attention implementations on the CPU: BERT train step and attention alone, by sequence length.

  taskset -c 0 python -m benchmarks.attention [--lengths 64,128,512] [--attention_lengths 64,128,512,1024] \
      [--variants einsum,jax_nn,chunked] [--methods full,lora] [--rounds 5] [--steps 2] [--query_chunk 128]

Issue 20 asked for a fused or chunked attention path where sequence length makes attention dominate. The
variants, each given (batch, length, heads, d_head) queries/keys/values and BERT's boolean padding mask
(batch, 1, length, length):

* 'einsum': what `jaxpeft.models.bert` computes, `flax.linen.dot_product_attention`:
  `softmax(q k^T / sqrt(d) masked with finfo.min) v` as two einsums around a softmax.
* 'jax_nn': `jax.nn.dot_product_attention(..., implementation='xla')`. On the CPU this is also what
  `implementation=None` runs (jax 0.10: `None` falls back to 'xla'; 'cudnn' is GPU only): the same two
  einsums and float32 softmax, vmapped over the query groups of grouped-query attention. No fused kernel.
* 'chunked': memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n^2)
  Memory", arXiv 2112.05682) with its query-block half only: `lax.scan` over blocks of `--query_chunk`
  queries, each block's exact softmax over all keys under `jax.checkpoint`, so reverse mode keeps one
  block's scores at a time and recomputes them in the backward pass. Deviation from the paper: keys are
  not split (no online softmax): at these lengths a block's full key row is small, and splitting keys
  adds a rescaling pass per key block on top of the recomputation.

Measurements, all in this one process (pin it with `taskset -c CPU`): for each length in `--lengths`,
the harness train step (`benchmarks.train_step._jax_step`: random BERT 4 layers x 256, 4 heads, batch
16, AdamW, full fine-tuning and/or LoRA r=8 on query/value, half the rows padded to half length) is
compiled once per variant (the variant replaces `flax.linen.dot_product_attention` while the step is
traced), and then for `--attention_lengths` the attention alone, forward + backward of `sum(out^2)`
w.r.t. q, k, v (jitted `value_and_grad`). The variants run in interleaved rounds (rotated order),
`--steps` calls each per round; a variant's time is the median [quartiles] of all its calls, its ratio
to 'einsum' the median [quartiles] of per-round ratios of round medians. Also printed: the compiled
program's temporary memory (`compile().memory_analysis().temp_size_in_bytes`) and the largest
relative deviation of values and gradients from 'einsum' (float32). The 1-minute load average is
printed before and after.

Result (2026-12-07, jax 0.10.2, 2-core AMD EPYC, pinned to core 0 while other jobs loaded the machine):
no variant is faster than 'einsum' at any length, so BERT keeps it and no switch exists. 'jax_nn' is
1.0-1.1x in the train step and 1.2-1.9x on attention alone; 'chunked' (one block at <= 128, the same
computation as 'einsum') is 0.96-1.02x there, 1.02-1.06x in the train step at 512 and 1.07-1.21x on
attention alone at 512-1024, for 37% less temp memory in the train step at 512 and 4x less on attention
alone at 1024. The cause, from the compiled HLO of the attention forward + backward at 16 x 128: XLA:CPU
runs six batched dots, and eight top-level operations (dots and loop fusions) write a full (batch,
heads, T, S) float32 array each (scores, masked scores, the softmax's passes and their backward);
nothing fuses the dots with the softmax, so every pass goes through memory. A fused kernel (torch's
SDPA) keeps a block of scores in cache; the chunked variant only changes which arrays are materialized
(and adds the recomputation).
"""

import argparse
import functools
import statistics
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import adapters
from benchmarks import train_step as train_step_benchmark

_flax_attention = nn.dot_product_attention  # bound before `_train_step` patches the name


def _einsum(q, k, v, mask):
  return _flax_attention(q, k, v, mask=mask)


def _jax_nn(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask.astype(bool), implementation="xla")


def _block(q, k, v, mask):
  """Exact attention of one query block over all keys (flax's masking: finfo.min where mask is False)."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
  scores = jnp.where(mask.astype(bool), scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def chunked_attention(q, k, v, mask, *, query_chunk: int = 128):
  """Query-block memory-efficient attention (module docstring); equals `_einsum` up to summation order.

  q: (batch, length, heads, d_head); k, v: (batch, keys, heads, d_head); mask: bool, broadcastable to
  (batch, heads, length, keys). A length that is not a multiple of `query_chunk` runs as one block.
  """
  batch, length, heads, d_head = q.shape
  if length % query_chunk or length == query_chunk:
    return _block(q, k, v, mask)
  n = length // query_chunk
  mask = jnp.broadcast_to(mask, (batch, mask.shape[1], length, k.shape[1]))
  q_blocks = q.reshape(batch, n, query_chunk, heads, d_head).swapaxes(0, 1)
  mask_blocks = mask.reshape(batch, mask.shape[1], n, query_chunk, -1).transpose(2, 0, 1, 3, 4)
  block = jax.checkpoint(_block)
  _, out = lax.scan(lambda carry, xs: (carry, block(xs[0], k, v, xs[1])), None, (q_blocks, mask_blocks))
  return out.swapaxes(0, 1).reshape(batch, length, heads, d_head)


def variants(query_chunk: int):
  return {
      "einsum": _einsum,
      "jax_nn": _jax_nn,
      "chunked": functools.partial(chunked_attention, query_chunk=query_chunk),
  }


def _attention_problem(length: int, batch: int = 16, heads: int = 4, d_head: int = 64):
  q, k, v = (
      jax.random.normal(key, (batch, length, heads, d_head)) for key in jax.random.split(jax.random.key(0), 3)
  )
  _, pad, _ = adapters.make_batch(batch, length)
  mask = nn.make_attention_mask(jnp.ones_like(pad), jnp.asarray(pad), dtype=bool)
  return q, k, v, mask


def _attention_step(fn, length: int):
  """(run, temp bytes, outputs) of the jitted forward + backward of `sum(fn(q, k, v, mask)^2)`."""
  args = _attention_problem(length)
  grad = jax.value_and_grad(lambda q, k, v, mask: jnp.sum(fn(q, k, v, mask) ** 2), argnums=(0, 1, 2))
  compiled = jax.jit(grad).lower(*args).compile()
  return (
      (lambda: jax.block_until_ready(compiled(*args))),
      compiled.memory_analysis().temp_size_in_bytes,
      compiled(*args),
  )


def _train_step(fn, method: str, length: int):
  """(run, temp bytes, None): the harness train step of `benchmarks.train_step` with `fn` as attention."""
  arch = {**adapters.ARCH, "max_position_embeddings": max(length, adapters.ARCH["max_position_embeddings"])}
  with mock.patch.object(nn, "dot_product_attention", lambda q, k, v, mask=None, **kwargs: fn(q, k, v, mask)):
    run = train_step_benchmark._jax_step(method, arch, 16, length)  # pylint: disable=protected-access
  return run, run.memory_bytes, None


def _max_deviation(reference, outputs) -> float:
  return max(
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(outputs))
  )


def _quartiles(xs):
  q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
  return q1, statistics.median(xs), q3


def measure(runs: dict, rounds: int, steps: int) -> dict[str, list[list[float]]]:
  """Per variant, per round, `steps` call times, the variants asked in rotated order each round."""
  names = list(runs)
  for run in runs.values():  # warm-up
    run()
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      round_times = []
      for _ in range(steps):
        start = time.perf_counter()
        runs[name]()
        round_times.append(time.perf_counter() - start)
      times[name].append(round_times)
  return times


def rows(label: str, times, memory, deviation) -> list[str]:
  out = []
  for name, per_round in times.items():
    q1, med, q3 = (1e3 * x for x in _quartiles([t for r in per_round for t in r]))
    paired = [statistics.median(a) / statistics.median(b) for a, b in zip(per_round, times["einsum"])]
    r1, rm, r3 = _quartiles(paired)
    dev = "—" if deviation.get(name) is None else f"{deviation[name]:.1e}"
    out.append(
        f"| {label} | {name} | {med:.1f} [{q1:.1f}, {q3:.1f}] | {rm:.2f} [{r1:.2f}, {r3:.2f}] |"
        f" {memory[name] / 2**20:.0f} | {dev} |"
    )
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="64,128,512", help="train-step sequence lengths ('' for none)")
  parser.add_argument("--attention_lengths", default="64,128,512,1024", help="attention-only lengths")
  parser.add_argument("--variants", default="einsum,jax_nn,chunked")
  parser.add_argument("--methods", default="full,lora", help="train-step methods (configs/minilm_text.py)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="calls per variant per round")
  parser.add_argument("--query_chunk", type=int, default=128)
  args = parser.parse_args()
  chosen = {n: f for n, f in variants(args.query_chunk).items() if n in ["einsum", *args.variants.split(",")]}
  split = lambda s: [int(x) for x in s.split(",") if x]
  before = train_step_benchmark.load_average()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; load average {before} before\n")
  print(
      "| problem | variant | ms/call median [q1, q3] | / einsum, paired median [q1, q3] | temp MiB | max rel. dev. |"
  )
  print("|---|---|---:|---:|---:|---:|")
  problems = [
      (f"train step {m}, 16 x {n}", functools.partial(_train_step, method=m, length=n))
      for n in split(args.lengths)
      for m in args.methods.split(",")
      if m
  ]
  problems += [
      (f"attention fwd+bwd, 16 x {n}", functools.partial(_attention_step, length=n))
      for n in split(args.attention_lengths)
  ]
  for label, build in problems:
    built = {name: build(fn) for name, fn in chosen.items()}
    runs = {name: b[0] for name, b in built.items()}
    memory = {name: b[1] for name, b in built.items()}
    reference = built["einsum"][2]
    deviation = {name: None if b[2] is None else _max_deviation(reference, b[2]) for name, b in built.items()}
    print("\n".join(rows(label, measure(runs, args.rounds, args.steps), memory, deviation)), flush=True)
    del built, runs
  print(f"\nload average {before} before, {train_step_benchmark.load_average()} after")


if __name__ == "__main__":
  main()
