"""Shared fixtures of the model tests: a tiny random Gemma 3 in transformers and its tensors."""

import pytest

TINY_GEMMA3 = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=12,
    sliding_window=5,
    max_position_embeddings=64,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0},
    },
    attn_logit_softcapping=3.0,
    final_logit_softcapping=5.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


@pytest.fixture(scope="session")
def tiny_gemma3_hf():
  """`(transformers Gemma3ForCausalLM, {name: numpy tensor})`, random, norms made non-zero, eager attention."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.Gemma3TextConfig(**TINY_GEMMA3)
  config._attn_implementation = "eager"
  model = transformers.Gemma3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.2))
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, tensors
