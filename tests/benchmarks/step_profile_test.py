"""`benchmarks/step_profile.py` on the tiny BERT: every matrix product found and counted by its closed-form FLOPs."""

from benchmarks import adapters, step_profile, train_step


def test_groups_count_each_products_flops_and_the_report_lists_them():
  arch, batch, length = train_step.SIZES["tiny"]
  d, f, heads = arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"]
  tokens = batch * length
  # Every Dense kernel of the encoder sees all tokens; the head sees one pooled row per example.
  dense = 2 * tokens * (4 * d * d + 2 * d * f) * arch["num_hidden_layers"] + 2 * batch * d * adapters.NUM_CLASSES
  # Scores Q K^T and the weighted sum P V forward, and two products for each backward.
  attention = 6 * 2 * batch * heads * length * length * (d // heads) * arch["num_hidden_layers"]
  result = step_profile.jax_profile("tiny", None, "full")
  groups = result["groups"]
  for kind in ("dense forward", "dense input gradient", "dense weight gradient"):
    assert groups[f"matmul: {kind}"]["flops"] == dense, kind
  assert groups["matmul: attention"]["flops"] == attention
  assert abs(sum(g["ms"] for g in groups.values()) - result["total_ms"]) < 1e-9 and result["total_ms"] > 0
  torch_result = step_profile.torch_profile("tiny", None, "full")
  assert any(name in torch_result["ops"] for name in ("aten::mm", "aten::addmm"))
  text = step_profile.report(result, torch_result, top=3)
  assert "| dense weight gradient |" in text and text.count("\n| F ") + text.count("\n| B ") == 3
