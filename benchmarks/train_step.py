r"""One train step, jaxpeft vs PyTorch (+ PEFT), measured robustly on a shared machine.

  python -m benchmarks.train_step [--size small|minilm] [--rounds 7] [--steps 5] [--pin CPU] \
      [--variants full,lora,...]

Variants: jaxpeft full fine-tuning, LoRA (rebuilt weights `W + s A B`, and factored: `x W + s x A B`),
DoRA, SoRA and PELA (the harness's train step,
`jaxpeft.train.step.make_train_step` over `Trainable.from_config` of `configs/minilm_text.py`'s method,
so SoRA's loss term and gate update and PELA's factorisation are the harness's) and torch full, LoRA and
DoRA (`benchmarks.adapters`' PyTorch model: `transformers.BertModel` + mean pooling + head, PEFT
`LoraConfig(target_modules=["query", "value"])`). Rank 8 on the attention query and value, AdamW 1e-4,
dropout off, the same token ids (half the rows padded to half length). Sizes: 'small', the random BERT 4
layers x 256 (5.3M parameters) with batch 16 x 64; 'minilm', all-MiniLM-L6-v2's shape (6 x 384, 12
heads, MLP 1536, random weights) with batch 64 x 128.

How it measures: each variant lives in its own persistent process (compiled and warmed up once) that
runs `--steps` steps on request; the parent asks every variant in turn, in a rotated order, for
`--rounds` rounds. A variant's time is the median (and quartiles) of all its steps; a ratio
jaxpeft / torch is the median (and quartiles) of the per-round ratios of the two variants' round
medians, so slow phases of a shared machine hit both sides of a ratio alike. Each process uses
`len(os.sched_getaffinity(0))` threads (torch's intra-op pool, XLA's Eigen pool follows the
affinity); `--pin CPU` runs every process under `taskset -c CPU` (one core each, in turn). The
1-minute load average (`/proc/loadavg`) is printed before and after the table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import adapters

SIZES = {
    "small": ({**adapters.ARCH}, 16, 64),
    "minilm": (
        {
            **adapters.ARCH,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "max_position_embeddings": 512,
        },
        64,
        128,
    ),
    # For the smoke test only.
    "tiny": ({**adapters.ARCH, "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}, 2, 8),
}
# name -> (library, method: '' for full fine-tuning)
VARIANTS = {
    "full (jaxpeft)": ("jax", "full"),
    "lora (jaxpeft)": ("jax", "lora"),
    "lora factored (jaxpeft)": ("jax", "lora"),
    "dora (jaxpeft)": ("jax", "dora"),
    "sora (jaxpeft)": ("jax", "sora"),
    "pela (jaxpeft)": ("jax", "pela"),
    "full (torch)": ("torch", "full"),
    "lora (PEFT)": ("torch", "lora"),
    "dora (PEFT)": ("torch", "dora"),
}
# jaxpeft variants in an adapter mode other than the config's 'reparam' (rebuilt weights): 'factored'
# computes x A B in activation space, as PEFT does.
JAX_MODES = {"lora factored (jaxpeft)": "factored"}
# --precision -> (jax_default_matmul_precision, torch.set_float32_matmul_precision): float32 matmuls, or
# float32 storage with bfloat16 matmul inputs on both sides.
PRECISIONS = {"float32": ("highest", "highest"), "bf16_matmul": ("bfloat16", "medium")}
TORCH_OF = {"full": "full (torch)", "lora": "lora (PEFT)", "dora": "dora (PEFT)"}


def _jax_step(method: str, arch: dict, batch: int, length: int, mode: str = "reparam"):
  """A zero-argument callable running one donated, jitted harness train step.

  Attributes: `.memory_bytes`, the compiled step's temporary memory; `.compiled`, the executable.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from configs import minilm_text  # pylint: disable=g-import-not-at-top
  from jaxpeft.models.bert import BertConfig, BertEncoder  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from jaxpeft.train.trainable import Trainable  # pylint: disable=g-import-not-at-top

  model = BertEncoder(BertConfig.from_dict(arch), num_classes=adapters.NUM_CLASSES)
  ids, mask, labels = adapters.make_batch(batch, length, arch["vocab_size"])
  data = {
      "input_ids": jnp.asarray(ids),
      "attention_mask": jnp.asarray(mask),
      "token_type_ids": jnp.zeros_like(jnp.asarray(ids)),
      "label": jnp.asarray(labels),
  }
  config = minilm_text.get_config(method)
  config.adapter.rank, config.adapter.alpha = adapters.RANK, adapters.ALPHA
  config.adapter.mode = mode
  trainable = Trainable.from_config(model, config)
  tx = trainable.optimizer(optax.adamw(adapters.LEARNING_RATE))
  base = model.init(jax.random.key(0), data["input_ids"][:1])["params"]
  params, frozen = trainable.split(jax.random.key(1), base)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params), rng=jax.random.key(2)
  )
  step = jax.jit(
      make_train_step(trainable, tx, ("input_ids", "attention_mask", "token_type_ids")), donate_argnums=0
  )
  step = step.lower(state, data).compile()
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], data)
    jax.block_until_ready((holder[0], metrics))

  run.memory_bytes = step.memory_analysis().temp_size_in_bytes  # for benchmarks.attention
  run.compiled = step  # for benchmarks.step_profile
  return run


def _torch_step(method: str, arch: dict, batch: int, length: int):
  """A zero-argument callable running one PyTorch (+ PEFT) train step."""
  import torch  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model, optimizer = adapters.torch_model_and_optimizer(None if method == "full" else method, arch)
  model.to(device)
  ids, mask, labels = (
      torch.from_numpy(x).long().to(device) for x in adapters.make_batch(batch, length, arch["vocab_size"])
  )

  def run():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(ids, mask), labels).backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def _worker(name: str, size: str, precision: str, torch_attention: str, torch_heap: str) -> None:
  """Builds `name`'s step, then answers each stdin line 'N' with the JSON list of N step times."""
  threads = len(os.sched_getaffinity(0))
  library, method = VARIANTS[name]
  arch, batch, length = SIZES[size]
  if library == "torch":
    if torch_heap == "kept":  # the glibc settings `import jaxpeft` makes, before torch allocates anything
      from jaxpeft import cpu_heap  # pylint: disable=g-import-not-at-top

      cpu_heap.keep_heap()
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(PRECISIONS[precision][1])
    arch = {**arch, "attn_implementation": torch_attention} if torch_attention else arch
    run = _torch_step(method, arch, batch, length)
  else:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_default_matmul_precision", PRECISIONS[precision][0])
    run = _jax_step(method, arch, batch, length, JAX_MODES.get(name, "reparam"))
  for _ in range(3):  # warm-up (and compilation)
    run()
  print("READY", flush=True)
  for line in sys.stdin:
    times = []
    for _ in range(int(line)):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)


def load_average() -> str:
  with open("/proc/loadavg", encoding="utf-8") as f:
    return " ".join(f.read().split()[:3])


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
  q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
  return q1, statistics.median(xs), q3


def measure(
    names: list[str],
    size: str,
    rounds: int,
    steps: int,
    pin: str = "",
    precision: str = "float32",
    torch_attention: str = "",
    torch_heap: str = "default",
) -> dict[str, list[list[float]]]:
  """Per variant, per round, the step times (seconds) of persistent worker processes asked in rotation."""
  prefix = ["taskset", "-c", pin] if pin else []
  options = [
      *("--size", size, "--precision", precision),
      *("--torch_attention", torch_attention, "--torch_heap", torch_heap),
  ]
  workers = {}
  for name in names:  # Started one after another: compilation does not overlap the others' work.
    workers[name] = subprocess.Popen(
        [*prefix, sys.executable, "-m", "benchmarks.train_step", "--worker", name, *options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if workers[name].stdout.readline().strip() != "READY":
      raise RuntimeError(f"worker {name!r} failed to start (see its stderr above).")
  times = {name: [] for name in names}
  try:
    for r in range(rounds):
      for name in names[r % len(names) :] + names[: r % len(names)]:
        workers[name].stdin.write(f"{steps}\n")
        workers[name].stdin.flush()
        times[name].append(json.loads(workers[name].stdout.readline()))
  finally:
    for w in workers.values():
      w.stdin.close()
      w.wait()
  return times


def table(times: dict[str, list[list[float]]]) -> str:
  """Markdown: each variant's median step time with quartiles, and paired per-round ratios to torch."""
  rows = [
      "| variant | ms/step median [q1, q3] | / torch same method, paired median [q1, q3] |",
      "|---|---:|---:|",
  ]
  for name, per_round in times.items():
    q1, med, q3 = (1e3 * x for x in _quartiles([t for r in per_round for t in r]))
    library, method = VARIANTS[name]
    reference = TORCH_OF.get(method, "full (torch)")
    ratio = "—"
    if library == "jax" and reference in times:
      paired = [statistics.median(a) / statistics.median(b) for a, b in zip(per_round, times[reference])]
      r1, rm, r3 = _quartiles(paired)
      ratio = f"{rm:.2f} [{r1:.2f}, {r3:.2f}]" + ("" if method in TORCH_OF else " (vs torch full)")
    rows.append(f"| {name} | {med:.1f} [{q1:.1f}, {q3:.1f}] | {ratio} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="small")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
  parser.add_argument("--pin", default="", help="run every process under taskset -c PIN (e.g. 1)")
  parser.add_argument("--variants", default="", help="comma-separated methods (default: all)")
  parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32")
  parser.add_argument("--torch_attention", default="", help="transformers attn_implementation (default: its own)")
  parser.add_argument(
      "--torch_heap",
      choices=("default", "kept"),
      default="default",
      help="'kept': the torch processes get the glibc heap settings `import jaxpeft` makes (jaxpeft/cpu_heap.py)",
  )
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker, args.size, args.precision, args.torch_attention, args.torch_heap)
    return
  methods = args.variants.split(",") if args.variants else None
  names = [n for n, (_, m) in VARIANTS.items() if methods is None or m in methods]
  arch, batch, length = SIZES[args.size]
  before = load_average()
  times = measure(
      names, args.size, args.rounds, args.steps, args.pin, args.precision, args.torch_attention, args.torch_heap
  )
  print(
      f"BERT {arch['num_hidden_layers']}x{arch['hidden_size']}, batch {batch} x {length}, {args.rounds} rounds"
      f" x {args.steps} steps, {'pinned to CPU ' + args.pin if args.pin else 'unpinned'}, torch heap"
      f" {args.torch_heap}; load average"
      f" {before} before, {load_average()} after\n"
  )
  print(table(times))


if __name__ == "__main__":
  main()
