"""configs/minilm_text.py through the harness: a tiny random BERT folder, and the real MiniLM's weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
from flax import traverse_util

from configs import minilm_text
from jaxpeft.data import input_pipeline
from jaxpeft.models import hf_loader
from jaxpeft.models.bert import BertConfig, BertEncoder
from jaxpeft.models.registry import bert_from_checkpoint
from jaxpeft.train.pretrained import load_params
from jaxpeft.train.trainable import Trainable

SENTENCES = [
    "Return the lowest index in the string where substring sub is found.",
    "Open a socket.",
    "Create a new thread and start it with the given arguments now.",
]


def test_every_method_config_builds_and_smoke_is_small():
  for method in minilm_text.METHODS:
    config = minilm_text.get_config(f"{method}:smoke")
    assert config.num_train_steps <= 3 and config.method == method
  lora = minilm_text.get_config("lora")
  assert (lora.adapter.method, lora.adapter.rank, lora.trainable.base) == ("lora", 8, "classifier/.*")
  with pytest.raises(ValueError, match="linear_probe"):
    minilm_text.get_config("adalora")


# The tiny BERT below: hidden d = 16, 2 layers, MLP width 32, 6 classes; every method also trains the
# head (16 x 6 + 6). Query/value targets are 4 matrices of 16 x 16; r = 8 unless the config says otherwise.
TINY = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
}
HEAD = 16 * 6 + 6
LAYER_NORMS = 32 * (1 + 2 * 2)  # scale + bias of the embeddings' LayerNorm and of 2 per layer
# method -> trainable scalars on TINY, from each method's parameter-count formula (its module docstring).
EXPECTED_TRAINABLE = {
    "linear_probe": HEAD,
    "lora": 4 * 8 * (16 + 16) + HEAD,  # r (d_in + d_out)
    "lora_qkvo": 8 * 8 * (16 + 16) + HEAD,
    "dora": 4 * (8 * (16 + 16) + 16) + HEAD,  # + the magnitude, d_out
    "hydra": 4 * (8 * (16 + 16) + 2 * 8 * 16 + 2 * 8 + 2 * 16) + HEAD,  # r (d_in + d_out) + 2 r d_out + biases
    "salt": 4 * (2 * 1 + 2 * 8 * 15) + HEAD,  # 2k + 2r(n - k), k = 1 (ratio 0.1 of n = 16)
    "svd_ft": 4 * 16 + HEAD,  # min(d_in, d_out)
    "pela": 4 * 2 * (16 + 16) + HEAD,  # r (d_in + d_out), r = floor(16 * 16 / (3 * 32)) = 2
    "sora": 4 * (8 * (16 + 16) + 8) + HEAD,  # r (d_in + d_out) + r gates
    "corda": 4 * 8 * (16 + 16) + HEAD,
    "prompt_tuning": 20 * 16 + HEAD,  # p d, p = 20 soft tokens
    "allora": 4 * 8 * (16 + 16) + HEAD,
    "houlsby": 4 * (2 * 8 * 16 + 8 + 16) + LAYER_NORMS + HEAD,  # 2 m d + m + d at 2 sites per layer
    "adaptformer": 2 * (2 * 8 * 16 + 8 + 16) + HEAD,  # 2 m d + m + d per layer
    "nola": 4 * (128 + 128) + HEAD,  # k_a + k_b
    "randlora": 4 * (2 * 8 + 2 * 16) + HEAD,  # N r + N n, N = ceil(16 / 8)
    "vera": 4 * (16 + 256) + HEAD,  # d_out + r, r = 256
    "loha": 4 * 2 * 8 * (16 + 16) + HEAD,  # 2 r (d_in + d_out)
    "lokr": 4 * (4 * 4 + 4 * 4) + HEAD,  # 16 = 4 x 4 on both sides; r = 8 >= 4 / 2: both Kronecker factors full
    "ia3": 2 * (16 + 16 + 32) + HEAD,  # d_out for key and value, the MLP width 32 for the FFN output's input
}


@pytest.fixture(scope="module")
def tiny_model_and_params():
  model = BertEncoder(BertConfig.from_dict(TINY), num_classes=6)
  params = model.init(jax.random.key(0), jnp.ones((2, 8), jnp.int32))["params"]
  return model, params


def _expected_trainable(method, params):
  flat = traverse_util.flatten_dict(params, sep="/")
  if method == "full":
    return sum(int(np.size(v)) for v in flat.values())
  if method == "sara":  # the query/value entries below the threshold, + the head
    return HEAD + sum(
        int(np.sum(np.abs(np.asarray(v)) < 2e-3))
        for k, v in flat.items()
        if k.endswith(("query/kernel", "value/kernel"))
    )
  return EXPECTED_TRAINABLE[method]


def test_every_method_is_counted_and_its_trainable_count_is_the_formula(tiny_model_and_params):
  model, params = tiny_model_and_params
  assert set(minilm_text.METHODS) == set(EXPECTED_TRAINABLE) | {"full", "sara"}
  for method in minilm_text.METHODS:
    trainable = Trainable.from_config(model, minilm_text.get_config(f"{method}:smoke"))
    trained, _ = trainable.split(jax.random.key(1), params)
    assert trainable.num_trained(trained) == _expected_trainable(method, params), method


def _one_sgd_step(method, model, params, grads_fn):
  """The update of `Trainable.optimizer(sgd(1))` (the config's update rule chained after it)."""
  trainable = Trainable.from_config(model, minilm_text.get_config(f"{method}:smoke"))
  trained, _ = trainable.split(jax.random.key(1), params)
  tx = trainable.optimizer(optax.sgd(1.0))
  grads = grads_fn(trained)
  updates, _ = tx.update(grads, tx.init(trained), trained)
  return trained, grads, updates


def test_sora_gates_take_the_proximal_step_and_other_leaves_plain_sgd(tiny_model_and_params):
  model, params = tiny_model_and_params
  xi = minilm_text.METHODS["sora"].update["sparse_lambda"]
  grads_fn = lambda p: jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
  trained, grads, updates = _one_sgd_step("sora", model, params, grads_fn)
  for path, u in traverse_util.flatten_dict(updates, sep="/").items():
    g = np.asarray(traverse_util.flatten_dict(grads, sep="/")[path])
    p = np.asarray(traverse_util.flatten_dict(trained, sep="/")[path])
    if path.endswith("/gate"):  # soft-threshold of the SGD step: sign(z) max(|z| - xi, 0), z = p - g
      z = p - g
      np.testing.assert_allclose(u, np.sign(z) * np.maximum(np.abs(z) - xi, 0) - p, rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_allclose(u, -g, rtol=1e-6)


@pytest.mark.parametrize("mode", ["reparam", "factored"])
def test_module_adding_adapters_run_through_their_hooks_in_either_mode(tiny_model_and_params, mode):
  model, params = tiny_model_and_params
  config = minilm_text.get_config("adaptformer:smoke")
  config.adapter.mode = mode
  trainable = Trainable.from_config(model, config)
  trained, frozen = trainable.split(jax.random.key(1), params)
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % TINY["vocab_size"]
  inputs = [ids, jnp.ones_like(ids), jnp.zeros_like(ids)]
  base = model.apply({"params": params}, *inputs)
  np.testing.assert_allclose(trainable.apply(trained, frozen, inputs, train=False), base, atol=1e-6)  # up = 0
  # A random move: a constant one (every `up` entry equal) adds the same value to each feature of the
  # MLP branch, which the layer's LayerNorm then removes.
  leaves, treedef = jax.tree.flatten(trained)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  moved = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  assert (
      np.abs(
          trainable.apply(moved, frozen, inputs, train=False)
          - model.apply({"params": trainable.merged(moved, frozen)}, *inputs)
      ).max()
      > 1e-3
  )  # the hook adds the bottleneck


def test_update_options_for_a_method_without_an_update_rule_are_an_error(tiny_model_and_params):
  config = minilm_text.get_config("lora:smoke")
  config.adapter.update = {"eta": 1.0}
  with pytest.raises(ValueError, match="no update rule"):
    Trainable.from_config(tiny_model_and_params[0], config)
  config = minilm_text.get_config("sora:smoke")
  config.adapter.update = {"eta": 1.0}
  with pytest.raises(ValueError, match="sparse_lambda"):
    Trainable.from_config(tiny_model_and_params[0], config)


def test_checkpoint_override_moves_tokenizer_and_weights_too(tiny_bert_dir):
  config = minilm_text.get_config("lora")
  config.model.checkpoint = str(tiny_bert_dir[0])
  assert config.dataset.tokenizer == config.init_from.params == str(tiny_bert_dir[0])


def test_text_preprocess_matches_the_tokenizers_package(tiny_bert_dir):
  folder, _ = tiny_bert_dir
  config = minilm_text.get_config("lora:smoke").dataset
  config.tokenizer = str(folder)
  batch = input_pipeline.get_preprocess("jaxpeft_pydoc", config)(
      {"text": np.array([s.encode() for s in SENTENCES], dtype=object), "label": np.array([0, 3, 4])}
  )
  reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  reference.no_padding()  # the file pads and truncates to 128 (sentence-transformers' setting)
  reference.no_truncation()
  for row, sentence in enumerate(SENTENCES):
    ids = reference.encode(sentence).ids  # [CLS] ... [SEP], untruncated
    n = min(len(ids), config.max_len)
    expected = ids[: n - 1] + [ids[-1]] if len(ids) > config.max_len else ids
    np.testing.assert_array_equal(batch["input_ids"][row, :n], expected)
    np.testing.assert_array_equal(batch["input_ids"][row, n:], 0)
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(config.max_len) < n)
  np.testing.assert_array_equal(batch["token_type_ids"], 0)
  np.testing.assert_array_equal(batch["label"], [0, 3, 4])
  with pytest.raises(ValueError, match="config.dataset.tokenizer"):
    input_pipeline.get_preprocess("jaxpeft_pydoc", None)


def test_lora_smoke_run_on_a_tiny_bert_folder(tiny_bert_dir, tiny_minilm_run):
  _, tensors = tiny_bert_dir
  _, result = tiny_minilm_run("lora")
  assert result["step"] == 3 and 0.0 <= result["eval"]["accuracy"] <= 1.0
  state = jax.device_get(result["state"])
  flat = traverse_util.flatten_dict(state.params, sep="/")
  # Rank-8 factors on 2 layers x (query, value) of 16 x 16, and the new 6-class head.
  assert result["trainable_params"] == 2 * 2 * 8 * (16 + 16) + 16 * 6 + 6
  assert sorted(k for k in flat if k.startswith("base/")) == [
      "base/classifier/dense/bias",
      "base/classifier/dense/kernel",
  ]
  assert any(np.any(v != 0) for k, v in flat.items() if k.endswith("/b"))  # LoRA's zero-initialised B moved
  # The frozen encoder is the folder's checkpoint, untouched.
  for path, value in traverse_util.flatten_dict(state.frozen, sep="/").items():
    hf = tensors[hf_loader.hf_name(path)]
    np.testing.assert_array_equal(value, hf.T if path.endswith("/kernel") else hf)
  assert result["adapter_bytes"] < 0.2 * result["params_bytes"]


def test_init_from_minilm_gives_the_hf_loader_embeddings():
  model = bert_from_checkpoint("all-MiniLM-L6-v2", num_classes=6)
  ids = jnp.zeros((1, 4), jnp.int32)
  fresh = model.init(jax.random.key(0), ids, ids, ids)["params"]
  params = load_params("all-MiniLM-L6-v2", fresh, keep_fresh="classifier/.*")
  ref_model, ref_params, tokenizer, _ = hf_loader.load_bert(None, normalize=False)
  inputs = tokenizer.encode(SENTENCES, max_len=24)
  ours = model.apply({"params": params}, **inputs, method=BertEncoder.embed)
  reference = ref_model.apply({"params": ref_params}, **inputs)
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  fresh_head = traverse_util.flatten_dict(fresh["classifier"])
  for path, value in traverse_util.flatten_dict(params["classifier"]).items():
    np.testing.assert_array_equal(value, fresh_head[path])  # the head keeps its fresh init
  with pytest.raises(ValueError, match="keep_fresh"):
    load_params("all-MiniLM-L6-v2", fresh)


def test_flagship_row_counts_only_trained_leaves_and_writes_table_and_plot(tiny_bert_dir, data_dir, tmp_path):
  from experiments import flagship

  row = flagship.run_method("salt", str(tmp_path), data_dir, ":smoke", str(tiny_bert_dir[0]))
  # SALT on 4 matrices of 16 x 16 (ratio 0.1 -> k = 1 top singular value, rank 8 on the other 15):
  # scale and shift (k each) and x, y (15 x 8 each); its U, s, V^T are fixed. Plus the 6-class head.
  assert row["trainable_params"] == 4 * (2 * 1 + 2 * 15 * 8) + 16 * 6 + 6
  assert row["steps_per_second"] > 0 and 0.0 <= row["accuracy"] <= 1.0
  table = flagship.markdown_table([row])
  assert f"| salt | {row['trainable_params']:,} " in table
  flagship.plot([row], str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
