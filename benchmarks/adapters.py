r"""Adapter benchmarks, in two parts.

  python -m benchmarks.adapters [--steps 20] [--batch 16] [--length 64]       # --part=speed (default)
  python -m benchmarks.adapters --part=methods [--steps 50] [--methods=lora,sora] [--workdir DIR]

Part `methods`: every method of `configs/minilm_text.py` (all-MiniLM-L6-v2 on the docstring-topic
task, `jaxpeft_pydoc`) trained by the harness (`jaxpeft.train.loop.train_and_evaluate`, through
`experiments.harness_runs.run_harness`) for `--steps` steps of 32 (default 50, one epoch of the 1591
training examples; warm-up 10 steps, cosine decay over the run), then evaluated on the held-out
test split. The table gives each method's trainable parameters (share of the model's), train-step
time (the harness's median over its log intervals after the first, so compilation, evaluation and
export are excluded) and its ratio to LoRA's measured in the same run, and held-out accuracy; it is
printed and written to `<workdir>/methods.md`. Hyperparameters are the config's (see the comment
above its METHODS). On a shared CPU, step times move with the machine's load: compare ratios from
one run. The convolution-kernel methods (LoRA-C / convLoRA / CP-LoRA and their DoRA variants,
TLoRA) do not apply to BERT; the ViT/UNet pretrain-then-adapt recipe `experiments/vision_adapt.py`
compares them. CorDA and prompt tuning are not in the config (its METHODS comment says why).

Part `speed`: train-step time and peak memory, full fine-tuning vs LoRA (reparam, factored) vs
DoRA, JAX vs PEFT. The model is a small random BERT (`jaxpeft.models.bert.BertEncoder`: 4
layers, hidden 256, 4 heads, MLP 1024, vocabulary 8000, mean pooling, 4-class head; 5.3M parameters) and, in PyTorch,
`transformers.BertModel` of identical shapes with the same mean pooling and head. Dropout is off
in both. Every variant trains the head; adapters are rank 8 (alpha 16) on the attention query
and value projections, as Hugging Face PEFT's `LoraConfig(target_modules=["query", "value"])`.
Both sides use AdamW (lr 1e-4) and the same batch of token ids.

* jaxpeft: the harness's own train step (`jaxpeft.train.step.make_train_step` over
  `jaxpeft.train.trainable.Trainable`), jitted with the state donated. LoRA in 'reparam' mode
  rebuilds `W + s A B` each step; 'factored' mode computes `x W + s (x A) B` with activation hooks.
* PEFT: `get_peft_model(BertModel, LoraConfig(...))` (`use_dora=True` for DoRA), `loss.backward()`
  and `torch.optim.AdamW.step()`.

Each variant runs in its own subprocess. Time: median wall time of `--steps` steps after 3
warm-up steps (compilation excluded). Memory, two measures:

* `RSS growth`: the process's peak resident set size (`resource.getrusage(...).ru_maxrss`) at the
  end minus its value after building the model and batch, before the first step: what training
  added (gradients, optimizer state, activations, and for JAX also the XLA compiler's working
  memory during the first step's compilation). The same measure for both libraries.
* `XLA buffers` (JAX only): the compiled step's `memory_analysis()`: arguments + outputs +
  temporaries - aliased (donated) bytes, an exact count of the step's device buffers.

The table prints ratios to jaxpeft's full fine-tuning and jaxpeft / PEFT for the same method.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ARCH = {
    "vocab_size": 8000,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
NUM_CLASSES = 4
RANK, ALPHA = 8, 16.0
LEARNING_RATE = 1e-4
WARMUP = 3
# name -> (library, adapter method or None, jaxpeft adapter mode)
VARIANTS = {
    "full (jaxpeft)": ("jax", None, "reparam"),
    "lora reparam (jaxpeft)": ("jax", "lora", "reparam"),
    "lora factored (jaxpeft)": ("jax", "lora", "factored"),
    "dora (jaxpeft)": ("jax", "dora", "reparam"),
    "full (torch)": ("torch", None, ""),
    "lora (PEFT)": ("torch", "lora", ""),
    "dora (PEFT)": ("torch", "dora", ""),
}


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB.


def make_batch(batch: int, length: int, vocab_size: int = ARCH["vocab_size"]):
  """Token ids, attention mask (half the rows padded to half length) and labels, as numpy arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab_size, size=(batch, length), dtype=np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[: batch // 2, length // 2 :] = 0  # half the rows padded to half length
  return ids, mask, rng.integers(0, NUM_CLASSES, size=batch, dtype=np.int32)


def _run_jax(method, mode, steps, batch, length):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxpeft.adapters.config import AdapterConfig  # pylint: disable=g-import-not-at-top
  from jaxpeft.models.bert import BertConfig, BertEncoder  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.trainable import Trainable  # pylint: disable=g-import-not-at-top

  model = BertEncoder(BertConfig.from_dict(ARCH), num_classes=NUM_CLASSES)
  ids, mask, labels = make_batch(batch, length)
  data = {
      "input_ids": jnp.asarray(ids),
      "attention_mask": jnp.asarray(mask),
      "token_type_ids": jnp.zeros_like(jnp.asarray(ids)),
      "label": jnp.asarray(labels),
  }
  base = model.init(jax.random.key(0), data["input_ids"][:1])["params"]
  adapter = None
  if method:
    adapter = AdapterConfig(targets=r".*attention/(query|value)/kernel", method=method, rank=RANK, alpha=ALPHA)
  trainable = Trainable(model, ".*" if method is None else "classifier/.*", adapter, mode)
  tx = trainable.optimizer(optax.adamw(LEARNING_RATE))
  params, frozen = trainable.split(jax.random.key(1), base)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params), rng=jax.random.key(2)
  )
  step = jax.jit(
      make_train_step(trainable, tx, ("input_ids", "attention_mask", "token_type_ids")), donate_argnums=0
  )
  jax.block_until_ready(state)
  rss_before = _max_rss_bytes()
  compiled = step.lower(state, data).compile()
  analysis = compiled.memory_analysis()
  xla_bytes = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
  )
  times = []
  for i in range(WARMUP + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    if i >= WARMUP:
      times.append(time.perf_counter() - start)
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  return {
      "seconds": statistics.median(times),
      "rss_growth": _max_rss_bytes() - rss_before,
      "xla_bytes": xla_bytes,
      "trainable": int(trained),
      "loss": float(metrics["loss"]),
  }


def torch_model_and_optimizer(method, arch=None):
  """transformers' BERT of `arch` (default ARCH) + mean pooling + head, PEFT-wrapped for 'lora'/'dora'; AdamW."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  arch = arch or ARCH
  torch.manual_seed(0)

  class Classifier(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.bert = transformers.BertModel(transformers.BertConfig(**arch), add_pooling_layer=False)
      self.classifier = torch.nn.Linear(arch["hidden_size"], NUM_CLASSES)

    def forward(self, input_ids, attention_mask):
      hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      m = attention_mask.unsqueeze(-1).to(hidden.dtype)
      return self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9))

  model = Classifier()
  if method:
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        use_dora=method == "dora",
    )
    model = peft.get_peft_model(model, config)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  return model, torch.optim.AdamW(params, lr=LEARNING_RATE)


def _run_torch(method, steps, batch, length):
  import torch  # pylint: disable=g-import-not-at-top

  model, optimizer = torch_model_and_optimizer(method)
  params = [p for p in model.parameters() if p.requires_grad]
  ids, mask, labels = (torch.from_numpy(x).long() for x in make_batch(batch, length))
  rss_before = _max_rss_bytes()
  times = []
  for i in range(WARMUP + steps):
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
    loss.backward()
    optimizer.step()
    if i >= WARMUP:
      times.append(time.perf_counter() - start)
  trained = sum(p.numel() for p in params)
  return {
      "seconds": statistics.median(times),
      "rss_growth": _max_rss_bytes() - rss_before,
      "xla_bytes": None,
      "trainable": int(trained),
      "loss": float(loss),
  }


def _child(name: str, steps: int, batch: int, length: int) -> None:
  library, method, mode = VARIANTS[name]
  if library == "jax":
    result = _run_jax(method, mode, steps, batch, length)
  else:
    result = _run_torch(method, steps, batch, length)
  print("RESULT " + json.dumps(result), flush=True)


def _measure(name: str, args) -> dict:
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.adapters",
          "--child",
          name,
          "--steps",
          str(args.steps),
          "--batch",
          str(args.batch),
          "--length",
          str(args.length),
      ],
      check=True,
      capture_output=True,
      text=True,
  )
  (line,) = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  return json.loads(line.removeprefix("RESULT "))


def _mb(x) -> str:
  return "—" if x is None else f"{x / 2**20:.0f} MiB"


def methods_table(rows: list[dict]) -> str:
  """Markdown table of `experiments.harness_runs.run_harness` rows; needs a 'lora' row for the time ratio."""
  from experiments import report  # pylint: disable=g-import-not-at-top

  lora = [r for r in rows if r["method"] == "lora"]
  if not lora:
    raise ValueError("methods_table needs the 'lora' row: step times are given as ratios to LoRA's.")
  cells = {**report.CELLS, "time / LoRA": lambda r: f"{lora[0]['steps_per_second'] / r['steps_per_second']:.2f}"}
  return report.markdown_table(
      rows, ("method", "trainable params", "ms/step", "time / LoRA", "held-out accuracy"), cells
  )


def run_methods(
    methods: list[str], steps: int, workdir: str, data_dir: str = "", suffix: str = "", checkpoint: str = ""
) -> str:
  """Trains `methods` (LoRA first, for the ratios); prints the table, writes it to methods.md and returns it."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from configs import minilm_text  # pylint: disable=g-import-not-at-top
  from experiments import report  # pylint: disable=g-import-not-at-top
  from experiments.harness_runs import run_harness  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(methods) - set(minilm_text.METHODS))
  if unknown:
    raise ValueError(f"--methods: unknown {unknown}; choose from {list(minilm_text.METHODS)}.")
  logging.set_verbosity(logging.WARNING)

  def run_method(method: str) -> dict:
    config = minilm_text.get_config(method + suffix)
    config.dataset.data_dir = data_dir
    if checkpoint:
      config.model.checkpoint = checkpoint  # also the tokenizer and init_from (one FieldReference)
    config.num_train_steps = steps  # warm-up and cosine decay follow it
    return run_harness(config, os.path.join(workdir, method), method)

  jobs = {m: functools.partial(run_method, m) for m in ["lora"] + [m for m in methods if m != "lora"]}
  rows, seconds = report.run_each(jobs, report.describe_row)
  table = (
      f"all-MiniLM-L6-v2 on jaxpeft_pydoc, {steps} steps of 32, held-out test split\n\n"
      + methods_table(rows)
      + f"\n\nTotal wall time: {sum(seconds.values()):.0f} s.\n"
  )
  report.write_report(os.path.join(workdir, "methods.md"), table)
  return table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("speed", "methods"), default="speed")
  parser.add_argument(
      "--steps",
      type=int,
      default=None,
      help="speed: timed steps (default 20); methods: training steps (default 50)",
  )
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--methods", default="", help="methods: comma-separated config methods (default: all)")
  parser.add_argument("--workdir", default="workdir/adapter_methods", help="methods: where the runs go")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.part == "methods":
    from configs import minilm_text  # pylint: disable=g-import-not-at-top

    methods = args.methods.split(",") if args.methods else list(minilm_text.METHODS)
    run_methods(methods, args.steps or 50, args.workdir)
    return
  args.steps = args.steps or 20
  if args.child:
    _child(args.child, args.steps, args.batch, args.length)
    return
  results = {}
  for name in VARIANTS:
    results[name] = _measure(name, args)
    print(f"{name}: {1e3 * results[name]['seconds']:.1f} ms/step", file=sys.stderr, flush=True)
  full = results["full (jaxpeft)"]["seconds"]
  peft_name = {None: "full (torch)", "lora": "lora (PEFT)", "dora": "dora (PEFT)"}
  print(
      f"BERT 4x256 (5.3M params), batch {args.batch} x {args.length} tokens, AdamW, median of"
      f" {args.steps} steps\n"
  )
  print(
      "| variant | trainable params | ms/step | time / jaxpeft full | time / PEFT-torch same method"
      " | RSS growth | XLA buffers |\n|---|---:|---:|---:|---:|---:|---:|"
  )
  for name, r in results.items():
    library, method, _ = VARIANTS[name]
    versus = f"{r['seconds'] / results[peft_name[method]]['seconds']:.2f}" if library == "jax" else "—"
    print(
        f"| {name} | {r['trainable']:,} | {1e3 * r['seconds']:.1f} | {r['seconds'] / full:.2f} |"
        f" {versus} | {_mb(r['rss_growth'])} | {_mb(r['xla_bytes'])} |"
    )


if __name__ == "__main__":
  main()
