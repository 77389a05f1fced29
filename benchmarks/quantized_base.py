r"""LoRA on a quantized frozen MiniLM: memory of the frozen base, XLA buffers and time of a train step, and how
far the quantized model's embeddings move, per format (float32, bfloat16, NF4 + double quantization, int4, int8).

  python -m benchmarks.quantized_base [--steps 10] [--batch 16] [--length 64]
  python -m benchmarks.quantized_base --part=quality [--workdir DIR]

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
  same run; the formats' steps are interleaved (one step of each in turn), so a change in the machine's load
  hits all of them alike (on a shared CPU only the ratio means anything).
* `embedding cos`: mean cosine similarity of the sentence embeddings of the quantized vs the float32 model on
  the module docstrings of a few standard-library modules (the model's own task: sentence embeddings).

`--part=quality` trains the flagship LoRA run (`configs/minilm_text.py:lora`: rank 8 on query/value + head,
100 AdamW steps of 32, the same seed and batches) with the harness on a float32 base and with
`config.quantize` NF4 + double quantization, int8 and int4 (the default targets `.*/kernel`: every frozen
kernel, i.e. the 36 encoder kernels), and prints the held-out (test split) accuracy and loss, the harness's
steps/s and its ratio to float32 (runs one after another, so on a loaded machine only a rough guide), and
the frozen base's bytes per parameter in memory and in `checkpoints/frozen/`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import tempfile
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


QUALITY = {
    "float32": ("", False),
    "nf4 + double quant": ("nf4", True),
    "int8": ("int8", False),
    "int4": ("int4", False),
}


def quality(workdir: str) -> None:
  """The harness's flagship LoRA run per base format: held-out accuracy, speed and frozen bytes/param."""
  from configs import minilm_text
  from jaxpeft.train.loop import train_and_evaluate

  rows, float_rate = [], None
  for fmt, (name, double_quant) in QUALITY.items():
    config = minilm_text.get_config("lora")
    config.quantize.format, config.quantize.double_quant = name, double_quant
    config.progress_bar, config.export = False, False
    result = train_and_evaluate(config, os.path.join(workdir, name or "float32"))
    rate = result["steps_per_sec"]
    float_rate = float_rate or rate
    rows.append(
        f"| {fmt} | {100 * result['eval']['accuracy']:.1f} | {result['eval']['loss']:.4f} | "
        f"{1e3 / rate:.0f} | {float_rate / rate:.2f} | {result['frozen_memory_bytes_per_param']:.3f} | "
        f"{result['frozen_disk_bytes_per_param']:.3f} |"
    )
    print(rows[-1], flush=True)
  print(
      "| base | test accuracy % | test loss | step ms | ratio | frozen B/param (memory) "
      "| frozen B/param (disk) |\n"
      "|---|---|---|---|---|---|---|"
  )
  print("\n".join(rows))


def main() -> None:
  flags = argparse.ArgumentParser()
  flags.add_argument("--part", choices=("step", "quality"), default="step")
  flags.add_argument("--workdir", default="", help="--part=quality: where the runs go (default: a temp dir)")
  flags.add_argument("--steps", type=int, default=10)
  flags.add_argument("--batch", type=int, default=16)
  flags.add_argument("--length", type=int, default=64)
  args = flags.parse_args()
  if args.part == "quality":
    quality(args.workdir or tempfile.mkdtemp(prefix="quantized_base_"))
    return
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
  runs = {}
  for fmt in FORMATS:
    base = _base(params, fmt)
    opt_state = tx.init(trained)
    compiled = jax.jit(step).lower(trained, opt_state, base).compile()
    state = (trained, opt_state)
    for _ in range(2):
      state = compiled(*state, base)[:2]
    runs[fmt] = {"base": base, "compiled": compiled, "state": state, "times": []}
  for _ in range(args.steps):  # interleaved: one step of each format in turn
    for run in runs.values():
      start = time.perf_counter()
      out = run["compiled"](*run["state"], run["base"])
      jax.block_until_ready(out)
      run["times"].append(time.perf_counter() - start)
      run["state"] = out[:2]
  rows, float_ms = [], None
  for fmt, run in runs.items():
    base = run["base"]
    memory = run["compiled"].memory_analysis()
    xla_mib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
    ms = 1e3 * statistics.median(run["times"])
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
