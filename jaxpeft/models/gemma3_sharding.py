"""Tensor-parallel + FSDP layout of Gemma 3 parameters (and their adapters) on a `data` x `model` mesh.

`RULES` (applied by jaxpeft/models/tensor_parallel.py; `Gemma3.tensor_parallel_rules`): Megatron-style
tensor parallelism (Shoeybi et al., "Megatron-LM", 2019, arXiv:1909.08053) over `model`, as transformers'
Gemma 3 `base_model_tp_plan` lays it out ("colwise" q/k/v/gate/up, "rowwise" o/down):

  q/k/v_proj, gate/up_proj kernels (d, n):  P(data, model)   column-parallel (heads / MLP units)
  o_proj, down_proj kernels        (n, d):  P(model, data)   row-parallel
  embed_tokens/embedding           (V, d):  P(model, data)   vocabulary-parallel (also the tied output)
  RMSNorm scales:                           replicated

With `fsdp=False` the `data` entries are dropped. An axis that the mesh size does not divide stays unsplit
on that mesh axis (e.g. the 270M model's single key/value head of 256 units splits over up to 256 devices,
the vocabulary over any power of two). Scanned layers (`layers/...`) have a leading layer axis, never split.
Adapter leaves follow their kernel, rank axis replicated (`tensor_parallel.adapter_specs`).
"""

from jaxpeft.models.tensor_parallel import DATA_AXIS, MODEL_AXIS, Rules

RULES: Rules = (
    (r".*self_attn/(q|k|v)_proj/kernel|.*mlp/(gate|up)_proj/kernel", (DATA_AXIS, MODEL_AXIS)),
    (r".*self_attn/o_proj/kernel|.*mlp/down_proj/kernel", (MODEL_AXIS, DATA_AXIS)),
    (r"embed_tokens/embedding", (MODEL_AXIS, DATA_AXIS)),
)
