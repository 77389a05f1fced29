"""`config.quantize`: a LoRA run on an NF4 frozen base (tiny BERT), its checkpoint, resume and errors."""

import json
import math
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import minilm_text
from jaxpeft.quantize import QuantizedArray
from jaxpeft.train.loop import train_and_evaluate

# Kernels and embeddings: with the 30522 x 16 word embeddings quantized the frozen base shrinks ~7x.
TARGETS = r".*(kernel|embedding)"
BLOCK = 32


@pytest.fixture(scope="module")
def nf4_config(tiny_bert_dir, data_dir):
  def make(**quantize):
    config = minilm_text.get_config("lora:smoke")
    config.model.checkpoint = str(tiny_bert_dir[0])
    config.dataset.data_dir = data_dir
    config.sharding.num_devices = 1
    config.num_train_steps = 8
    config.checkpoint.every_steps = 4
    config.checkpoint.max_to_keep = 2
    config.optimizer.learning_rate = 2e-2
    config.quantize.update(
        {"format": "nf4", "targets": TARGETS, "block_size": BLOCK, "double_quant": True, **quantize}
    )
    return config

  return make


@pytest.fixture(scope="module")
def nf4_run(nf4_config, tmp_path_factory):
  """(workdir, result) of one 8-step LoRA run on the NF4 base, checkpoints at steps 4 and 8."""
  workdir = tmp_path_factory.mktemp("nf4_run")
  return workdir, train_and_evaluate(nf4_config(), str(workdir))


def _train_losses(workdir):
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _quantized(tree):
  is_q = lambda x: isinstance(x, QuantizedArray)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat if is_q(leaf)}


def _saved_leaves(directory):
  """{'/'-joined path: (shape, dtype)} of an Orbax checkpoint, read from its metadata alone."""
  meta = ocp.StandardCheckpointer().metadata(str(directory))
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  flat = traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: hasattr(x, "shape"))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def test_nf4_run_trains_and_checkpoints_packed_codes(nf4_run, tiny_bert_dir):
  tmp_path, result = nf4_run
  losses = _train_losses(tmp_path)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses

  # Every frozen kernel and embedding is quantized; the trained head is not.
  float_tensors = tiny_bert_dir[1]
  quantized = _quantized(result["state"].frozen)
  assert len(quantized) == sum(1 for name in float_tensors if name.endswith("weight") and "LayerNorm" not in name)
  assert not any(p.startswith("classifier") for p in quantized)
  # checkpoints/frozen/ holds the packed codes (uint8, two per byte) and the double-quantized scales, no floats
  # of the weights: bytes per weight = 1/2 + 1/block (uint8 scale codes) + 4 / (256 block) + 4 / size.
  saved = _saved_leaves(tmp_path / "checkpoints" / "frozen")
  expected_bytes = 0
  for path, q in quantized.items():
    n = math.prod(q.shape)
    assert saved[f"{path}/codes"] == ((n // 2,), np.dtype(np.uint8))
    assert saved[f"{path}/scales"] == ((n // BLOCK,), np.dtype(np.uint8))
    expected_bytes += n // 2 + n // BLOCK + 4 * math.ceil(n / BLOCK / 256) + 4
  scale_parts = ("scale_scales", "scale_offset")
  floats = [k for k, (_, dtype) in saved.items() if dtype == np.float32 and not k.endswith(scale_parts)]
  unquantized = sum(math.prod(saved[k][0]) for k in floats)  # LayerNorms and biases
  n_frozen = result["frozen_params"]
  assert result["frozen_memory_bytes"] == expected_bytes + 4 * unquantized
  assert result["frozen_memory_bytes_per_param"] < 0.6
  assert result["frozen_disk_bytes"] < n_frozen  # under 1 byte per weight on disk (float32: 4), metadata included
  # The merged export re-quantizes (export_keep='quantized'): codes again, the float head as trained.
  exported = _saved_leaves(tmp_path / "export" / "params")
  assert exported["encoder/layer_0/attention/query/kernel/codes"][1] == np.uint8
  assert exported["classifier/dense/kernel"][1] == np.float32


def test_nf4_run_resumes_bit_identically(nf4_config, nf4_run, tmp_path):
  full_dir, full = nf4_run
  for item in ("4", "frozen"):
    shutil.copytree(full_dir / "checkpoints" / item, tmp_path / "resumed" / "checkpoints" / item)
  # export_keep changes only the export, so the resumed run must still end where the full run did.
  resumed = train_and_evaluate(nf4_config(export_keep="float32"), str(tmp_path / "resumed"))
  trees = [(r["state"].params, r["state"].frozen) for r in (full, resumed)]  # codes restored, not re-quantized
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  for a, b in zip(*map(jax.tree.leaves, trees)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # export_keep='float32': the export is the plain float tree (what config.init_from.params reads).
  exported = _saved_leaves(tmp_path / "resumed" / "export" / "params")
  assert exported["encoder/layer_0/attention/query/kernel"] == ((16, 16), np.dtype(np.float32))


@pytest.mark.parametrize(
    "quantize, message",
    [
        ({"format": "fp4"}, r"config.quantize.format='fp4': use one of \('nf4', 'int4', 'int8'\)"),
        ({"block_size": 48}, r"config.quantize .*not a multiple of block_size=48"),
        ({"targets": "classifier/.*"}, r"matches no frozen parameter \(it matches trained ones"),
    ],
)
def test_bad_quantize_config_is_a_clear_error(nf4_config, tmp_path, quantize, message):
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(nf4_config(**quantize), str(tmp_path))


def test_generation_weights_keep_the_adapter_update_on_a_quantized_base(nf4_config, nf4_run):
  """The weights generation runs on: dequantized base + the float LoRA update, never re-quantized (which would
  round a few steps' update away); the export's re-quantized merge is what it must not be."""
  from jaxpeft.models.registry import build_model  # pylint: disable=import-outside-toplevel
  from jaxpeft.train.trainable import Trainable  # pylint: disable=import-outside-toplevel

  _, result = nf4_run
  config = nf4_config()
  trainable = Trainable.from_config(build_model(config.model), config)
  state = result["state"]
  for_generation = trainable.merged(state.params, state.frozen, quantized_keep="float32")
  requantized = trainable.merged(state.params, state.frozen)
  path = ("encoder", "layer_0", "attention", "query", "kernel")
  frozen = state.frozen
  for key in path:
    frozen = frozen[key]
  lora = state.params["adapter"]
  for key in path:
    lora = lora[key]
  # Closed form: W = dequantize(codes) + s * a @ b (LoRA's reparam, s = alpha / rank).
  scale = config.adapter.alpha / config.adapter.rank
  expected = np.asarray(frozen.dequantize(), np.float64) + scale * np.asarray(lora["a"], np.float64) @ np.asarray(
      lora["b"], np.float64
  )
  got = for_generation
  for key in path:
    got = got[key]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  again = requantized
  for key in path:
    again = again[key]
  assert isinstance(again, QuantizedArray)
