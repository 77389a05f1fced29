r"""The train-step benchmark on one GPU: absolute step time, tokens/s and model-FLOPs utilisation.

  python -m benchmarks.gpu_train_step [--peak_tflops 989] [--rounds 5] [--steps 10]

Runs `benchmarks.train_step` (persistent processes in rotation, paired ratios) at both sizes, in float32
and with bfloat16 matmul inputs on both sides (matched precision: JAX `jax_default_matmul_precision`,
torch `set_float32_matmul_precision`), with torch's eager and SDPA attention (jaxpeft's is XLA's
fused `dot_product_attention` lowering). Tokens/s = batch x length / median step time. MFU = 6 N
tokens / step time / peak (N: the encoder's non-embedding parameters; 6 N per token is the
forward + full backward of full fine-tuning, so adapter rows, which skip the frozen weight gradients,
report their time against the same model FLOPs), with `--peak_tflops` the card's dense peak for the
precision (H100 SXM: 989 bf16, 67 fp32 without TF32). Not yet run: the session that wrote it had no GPU.
"""

import argparse
import os
import statistics

from benchmarks import train_step


def _model_flops_per_token(arch: dict) -> float:
  d, f, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
  return 6.0 * layers * (4 * d * d + 2 * d * f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--peak_tflops", type=float, default=989.0, help="bf16 dense peak; fp32 rows use --peak_fp32"
  )
  parser.add_argument("--peak_fp32", type=float, default=67.0)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several worker processes share the GPU
  names = list(train_step.VARIANTS)
  for size in ("small", "minilm"):
    arch, batch, length = train_step.SIZES[size]
    for precision, peak in (("float32", args.peak_fp32), ("bf16_matmul", args.peak_tflops)):
      for attention in ("eager", "sdpa"):
        times = train_step.measure(names, size, args.rounds, args.steps, "", precision, attention)
        print(f"\n{size}, batch {batch} x {length}, {precision}, torch attention {attention}\n")
        print(train_step.table(times))
        print("\n| variant | tokens/s | MFU |\n|---|---:|---:|")
        for name, per_round in times.items():
          seconds = statistics.median(t for r in per_round for t in r)
          tokens = batch * length / seconds
          mfu = tokens * _model_flops_per_token(arch) / (peak * 1e12)
          print(f"| {name} | {tokens:,.0f} | {100 * mfu:.1f}% |")


if __name__ == "__main__":
  main()
