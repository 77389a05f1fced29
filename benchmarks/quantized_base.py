r"""LoRA on a quantized frozen MiniLM: memory of the frozen base, XLA buffers and time of a train step, and how
far the quantized model's embeddings move, per format (float32, bfloat16, NF4 + double quantization, int4, int8).

  python -m benchmarks.quantized_base [--steps 10] [--batch 16] [--length 64]

The model is the embedded all-MiniLM-L6-v2 (`jaxpeft.models.hf_loader.load_bert`, 22.7M parameters, with a
6-class head). Quantized: every encoder kernel (`encoder/.*kernel`, 36 matrices, 10.6M of the 22.7M
parameters; the word embeddings (11.7M), LayerNorms, biases and the head stay float32), block 64. The step
is one AdamW step of rank-8 LoRA (alpha 16) on the attention query/value kernels plus the head, on a batch of
tokenized docstrings with arbitrary labels, jitted with the quantized base as an argument and dequantized
inside the step (`jaxpeft.quantize.apply`). Columns:

* `base MiB`, `base B/param`: memory of the whole frozen base tree and per parameter
  (`quantize.bytes_per_param`); `kernels B/param`: the same over the quantized encoder kernels only.
* `step XLA MiB`: the compiled step's `memory_analysis()` arguments + temporaries (deterministic).
* `step ms`, `ratio`: median wall time over `--steps` steps after a warm-up, and its ratio to float32 in the
  same run (on a shared CPU only the ratio means anything).
* `embedding cos`: mean cosine similarity of the sentence embeddings of the quantized vs the float32 model on
  the module docstrings of a few standard-library modules (the model's own task: sentence embeddings).
"""

from __future__ import annotations

import argparse
import inspect
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxpeft import quantize
from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.selection import path_string
from jaxpeft.models.hf_loader import load_bert

FORMATS = {
    "float32": None,
    "bfloat16": None,
    "nf4 + double quant": ("nf4", True),
    "int4": ("int4", False),
    "int8": ("int8", False),
}
PATTERN = r"encoder/.*kernel"
LORA = AdapterConfig(targets=r".*attention/(query|value)/kernel", rank=8, alpha=16.0)


def _base(params, fmt):
  if fmt == "float32":
    return params
  if fmt == "bfloat16":
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  name, double_quant = FORMATS[fmt]
  return quantize.quantize_tree(params, PATTERN, name, 64, double_quant)


def _texts():
  import json, os, re, string, textwrap  # noqa: E401  (their docstrings are the sample text)

  return [inspect.getdoc(m)[:400] for m in (json, os, re, string, textwrap, argparse, statistics, time)]


def main() -> None:
  flags = argparse.ArgumentParser()
  flags.add_argument("--steps", type=int, default=10)
  flags.add_argument("--batch", type=int, default=16)
  flags.add_argument("--length", type=int, default=64)
  args = flags.parse_args()
  model, params, tokenizer, _ = load_bert(num_classes=6)
  embedder, embed_params, _, _ = load_bert()
  batch = tokenizer.encode(_texts() * (args.batch // 8 + 1), args.length)
  batch = {k: jnp.asarray(v[: args.batch]) for k, v in batch.items()}
  labels = jnp.arange(args.batch) % 6
  adapter = reparam.init(jax.random.key(0), LORA, params)
  trained = {"adapter": adapter, "head": params["classifier"]}
  tx = optax.adamw(1e-4)
  sentences = {k: jnp.asarray(v) for k, v in tokenizer.encode(_texts(), 128).items()}

  def step(trained, opt_state, base):

    def loss_fn(trained):
      full = {**quantize.apply(base, trained["adapter"], LORA), "classifier": trained["head"]}
      logits = model.apply({"params": full}, **batch)
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  reference = embedder.apply({"params": embed_params}, **sentences)
  rows, float_ms = [], None
  for fmt in FORMATS:
    base = _base(params, fmt)
    opt_state = tx.init(trained)
    compiled = jax.jit(step).lower(trained, opt_state, base).compile()
    memory = compiled.memory_analysis()
    xla_mib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
    state = (trained, opt_state)
    for _ in range(2):
      state = compiled(*state, base)[:2]
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      out = compiled(*state, base)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
      state = out[:2]
    ms = 1e3 * statistics.median(times)
    float_ms = float_ms or ms
    embed_base = quantize.dequantize_tree(_base(embed_params, fmt))
    emb = embedder.apply({"params": embed_base}, **sentences).astype(jnp.float32)
    cos = jnp.mean(
        jnp.sum(emb * reference, -1) / (jnp.linalg.norm(emb, axis=-1) * jnp.linalg.norm(reference, axis=-1))
    )
    n_params = sum(x.size for x in jax.tree.leaves(base, is_leaf=quantize.is_quantized))
    kernels = [
        x
        for kp, x in jax.tree_util.tree_flatten_with_path(base, is_leaf=quantize.is_quantized)[0]
        if re.fullmatch(PATTERN, path_string(kp))
    ]
    per_param = quantize.bytes_per_param(base)
    rows.append(
        f"| {fmt} | {per_param * n_params / 2 ** 20:.1f} | {per_param:.3f} | "
        f"{quantize.bytes_per_param(kernels):.3f} | {xla_mib:.0f} | {ms:.0f} | "
        f"{ms / float_ms:.2f} | {float(cos):.4f} |"
    )
  print(
      "| base | base MiB | base B/param | kernels B/param | step XLA MiB | step ms | ratio | embedding cos |\n"
      "|---|---|---|---|---|---|---|---|"
  )
  print("\n".join(rows))


if __name__ == "__main__":
  main()
