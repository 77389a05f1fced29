r"""Adapters on all-MiniLM-L6-v2 (configs/minilm_text.py): accuracy against trainable parameters.

Papers and the claim each makes, measured here at small scale:

* LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
  arXiv:2106.09685): on par with full fine-tuning while training a tiny fraction of the parameters.
* DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353):
  consistently better than LoRA at (almost) the same number of trained parameters.
* Hydra (Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
  Fine-tuning", 2023, arXiv:2309.06922): parallel + sequential branches beat LoRA of the same rank.
* SALT (Elsayed et al., "SALT: Singular Value Adaptation with Low-Rank Transformation", 2025,
  arXiv:2503.16055): adapting the top singular values plus a low-rank update of the rest beats LoRA.
* NOLA (Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis",
  ICLR 2024, arXiv:2310.02556): LoRA's accuracy with far fewer trained parameters.
* RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
  models", ICLR 2025, arXiv:2502.00987): full-rank updates at a LoRA-like parameter count beat LoRA.

Every run is the harness (`jaxpeft.train.loop.train_and_evaluate`) on configs/minilm_text.py with
overrides only: the methods of its METHODS dict, plus NOLA and RandLoRA on LoRA's targets and
learning rate (`config.adapter.method=...`). RandLoRA uses rank 32 (ceil(384/32) = 12 bases: a
LoRA-like parameter count; its parameter count *falls* as the rank grows) and PEFT's default
alpha 640; NOLA its reference's 128 + 128 basis coefficients per matrix at LoRA's rank. The learning
rates are configs/minilm_text.py's (chosen there on its held-out split; nothing is chosen here).
The held-out split is the test split of jaxpeft_pydoc (399 examples: one seed's accuracy has a
standard error of about 2 points, so the "beats LoRA" checks count ties as wins).

Verdict checks (accuracy a, trained parameters p):
  LoRA: a >= a_full - 3 points with p < 1% of p_full;  DoRA: a >= a_LoRA;  Hydra: a >= a_LoRA;
  SALT: a >= a_LoRA;  NOLA: a >= a_LoRA - 2 points with p <= p_LoRA / 4;
  RandLoRA: a >= a_LoRA with p <= 1.5 p_LoRA.
"""

import os

import ml_collections

from configs import minilm_text
from experiments.claims.results import ClaimRow, save_figure
from experiments.harness_runs import run_harness
from experiments.report import accuracy_vs_params_figure

NAME = "adapters"

# method -> (base config of configs/minilm_text.py, adapter overrides)
METHODS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "hydra": ("hydra", {}),
    "salt": ("salt", {}),
    "nola": ("lora", {"method": "nola"}),
    "randlora": ("lora", {"method": "randlora", "rank": 32, "alpha": 640.0}),
}


def get_config(small: bool) -> ml_collections.ConfigDict:
  """Training length and input size; `small` keeps the seven runs near 10 minutes on a loaded 2-core CPU.

  The full setting is configs/minilm_text.py's own (100 steps of 32 examples of 32 tokens).
  `smoke=True` runs its ':smoke' variants (3 steps) instead, to check the wiring.
  """
  if small:
    return ml_collections.ConfigDict({"num_train_steps": 30, "batch_size": 16, "max_len": 24, "smoke": False})
  return ml_collections.ConfigDict({"num_train_steps": 100, "batch_size": 32, "max_len": 32, "smoke": False})


def method_config(method: str, c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """configs/minilm_text.py for `method`, with this claim's overrides."""
  base, adapter = METHODS[method]
  config = minilm_text.get_config(base + (":smoke" if c.smoke else ""))
  config.adapter.update(adapter)
  config.method = method
  if not c.smoke:
    config.num_train_steps = c.num_train_steps
    config.batch_size = c.batch_size
    config.dataset.max_len = c.max_len
  config.progress_bar = False
  return config


def run(small: bool, workdir: str) -> list[ClaimRow]:
  c = get_config(small)
  rows = {m: run_harness(method_config(m, c), os.path.join(workdir, NAME, m), m) for m in METHODS}

  save_figure(accuracy_vs_params_figure(list(rows.values()), "all-MiniLM-L6-v2 on jaxpeft_pydoc"), workdir, NAME)

  acc = {m: r["accuracy"] for m, r in rows.items()}
  params = {m: r["trainable_params"] for m, r in rows.items()}

  def measured(*methods: str) -> str:
    setting = "smoke" if c.smoke else f"{c.num_train_steps} steps of {c.batch_size}x{c.max_len} tokens"
    return (
        f"{setting}: "
        + ", ".join(f"{m} {100 * acc[m]:.1f}% with {params[m]:,} params" for m in methods)
        + f". Plot: {NAME}.png"
    )

  return [
      ClaimRow(
          "LoRA vs full fine-tuning vs DoRA (MiniLM)",
          "LoRA matches full fine-tuning with a tiny fraction of the parameters; DoRA beats LoRA at about"
          " the same count.",
          measured("full", "lora", "dora"),
          {
              "LoRA within 3 points of full": acc["lora"] >= acc["full"] - 0.03,
              "LoRA trains < 1% of full's params": params["lora"] < 0.01 * params["full"],
              "DoRA >= LoRA": acc["dora"] >= acc["lora"],
          },
      ),
      ClaimRow(
          "Hydra (MiniLM)",
          "Parallel + sequential low-rank branches beat LoRA of the same rank.",
          measured("hydra", "lora"),
          {"Hydra >= LoRA": acc["hydra"] >= acc["lora"]},
      ),
      ClaimRow(
          "SALT (MiniLM)",
          "Top singular values scaled/shifted + low-rank on the rest beat LoRA.",
          measured("salt", "lora"),
          {"SALT >= LoRA": acc["salt"] >= acc["lora"]},
      ),
      ClaimRow(
          "NOLA (MiniLM)",
          "LoRA's accuracy with many times fewer trained parameters.",
          measured("nola", "lora"),
          {
              "NOLA within 2 points of LoRA": acc["nola"] >= acc["lora"] - 0.02,
              "NOLA trains <= 1/4 of LoRA's params": params["nola"] <= params["lora"] / 4,
          },
      ),
      ClaimRow(
          "RandLoRA (MiniLM)",
          "Full-rank updates at a LoRA-like parameter count beat LoRA.",
          measured("randlora", "lora"),
          {
              "RandLoRA >= LoRA": acc["randlora"] >= acc["lora"],
              "RandLoRA trains <= 1.5x LoRA's params": params["randlora"] <= 1.5 * params["lora"],
          },
      ),
  ]
