"""PEFT interop, both ways, against PyTorch PEFT: export -> PeftModel.from_pretrained, PEFT-trained -> import,
and merged export vs PEFT's merge_and_unload, for every method both libraries ship.

The reference is PEFT itself: the torch model and its PEFT adapter produce the expected outputs; the Flax
parameters are copied from the torch modules with the transposition rules of the existing parity tests
(Linear kernel = W.T, Conv kernel = W.permute(2, 3, 1, 0), Embed table = W), independently of peft_format.
"""

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.peft_format import export_merged, export_peft, import_peft
from jaxpeft.adapters.selection import select_targets
from jaxpeft.models.hf_loader import bert_module_name
from tests.adapters import tiny_models

TOL = dict(atol=1e-5, rtol=1e-5)
CONV = r"conv/kernel"


class Mlp(torch.nn.Module):
  """lin (6 -> 5, bias) -> tanh -> lin2 (5 -> 8, no bias): two shapes, a biased and a bias-free layer."""

  def __init__(self):
    super().__init__()
    self.lin = torch.nn.Linear(6, 5)
    self.lin2 = torch.nn.Linear(5, 8, bias=False)

  def forward(self, x):
    return self.lin2(torch.tanh(self.lin(x)))


class ConvNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

  def forward(self, x):
    return self.conv(x)


class EmbNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(11, 6)

  def forward(self, ids):
    return self.emb(ids)


class TinyTransformerTorch(torch.nn.Module):
  """tiny_models.TinyTransformer in torch: the DenseGeneral q (8 -> 2x4) and out (2x4 -> 8) are Linears."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(tiny_models.VOCAB, tiny_models.WIDTH)
    self.dense = torch.nn.Linear(tiny_models.WIDTH, tiny_models.WIDTH)
    self.query = torch.nn.Linear(tiny_models.WIDTH, tiny_models.HEADS * tiny_models.HEAD_DIM)
    self.out = torch.nn.Linear(tiny_models.HEADS * tiny_models.HEAD_DIM, tiny_models.WIDTH)

  def forward(self, ids):
    return self.out(torch.tanh(self.query(self.dense(self.embed(ids)))))


def _n(t) -> np.ndarray:
  return np.asarray(t.detach().float().numpy(), np.float32)


def flax_params(model: torch.nn.Module) -> dict:
  """Flax params of a torch model's Linear / Conv2d / Embedding modules (the parity tests' rules)."""
  params = {}
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
      leaves = {"kernel": _n(module.weight).T}
    elif isinstance(module, torch.nn.Conv2d):
      leaves = {"kernel": _n(module.weight).transpose(2, 3, 1, 0)}
    elif isinstance(module, torch.nn.Embedding):
      leaves = {"embedding": _n(module.weight)}
    else:
      continue
    if getattr(module, "bias", None) is not None:
      leaves["bias"] = _n(module.bias)
    params[name] = jax.tree_util.tree_map(jnp.asarray, leaves)
  return params


def _mlp_forward(params, x):
  h = jnp.tanh(x @ params["lin"]["kernel"] + params["lin"]["bias"])
  return h @ params["lin2"]["kernel"]


def _conv_forward(params, x_nchw):
  y = nn.Conv(4, (3, 3), padding=1).apply({"params": params["conv"]}, x_nchw.transpose(0, 2, 3, 1))
  return y.transpose(0, 3, 1, 2)


def _emb_forward(params, ids):
  return params["emb"]["embedding"][ids]


MODELS = {  # kind -> (torch model class, Flax forward, input)
    "linear": (Mlp, _mlp_forward, np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)),
    "conv": (ConvNet, _conv_forward, np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)),
    "embedding": (EmbNet, _emb_forward, np.array([[0, 3, 10, 7], [1, 1, 5, 2]])),
}
LIN = r"lin2?/kernel"
PROJ = {"projection_shape": (6, 8)}  # the largest (d_in, d_out): one shared projection pair, as PEFT

# id -> (model kind, jaxpeft config, PEFT config). The jaxpeft configs use non-identity inits so every
# adapter leaf matters; the PEFT ones are trained a few steps from PEFT's default init.
CASES = {
    "lora": (
        "linear",
        AdapterConfig(
            LIN,
            "lora",
            rank=2,
            alpha=3.0,
            init="random",
            rank_pattern={"lin2/kernel": 3},
            alpha_pattern={"lin2/kernel": 5.0},
        ),
        peft.LoraConfig(
            r=2, lora_alpha=3, target_modules=["lin", "lin2"], rank_pattern={"lin2": 3}, alpha_pattern={"lin2": 5}
        ),
    ),
    "rslora": (
        "linear",
        AdapterConfig(LIN, "lora", rank=2, alpha=3.0, use_rslora=True, init="random"),
        peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["lin", "lin2"]),
    ),
    "dora": (
        "linear",
        AdapterConfig(LIN, "dora", rank=2, alpha=3.0, init="random"),
        peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["lin", "lin2"]),
    ),
    "loha": (
        "linear",
        AdapterConfig(LIN, "loha", rank=2, alpha=3.0, init="random", use_rslora=True),
        peft.LoHaConfig(r=2, alpha=3, target_modules=["lin", "lin2"]),
    ),
    "lokr": (
        "linear",
        AdapterConfig(LIN, "lokr", rank=1, alpha=2.0, init="random"),  # w2 = w2_a @ w2_b
        peft.LoKrConfig(r=1, alpha=2, target_modules=["lin", "lin2"]),
    ),
    "lokr_full": (
        "linear",
        AdapterConfig(LIN, "lokr", rank=8, alpha=2.0, init="random", options={"decompose_both": True}),
        peft.LoKrConfig(r=8, alpha=2, decompose_both=True, target_modules=["lin", "lin2"]),
    ),
    "ia3": (
        "linear",
        AdapterConfig(LIN, "ia3", init="random", options={"feedforward": "lin2/kernel"}),
        peft.IA3Config(target_modules=["lin", "lin2"], feedforward_modules=["lin2"]),
    ),
    "vera": (
        "linear",
        AdapterConfig(LIN, "vera", rank=3, init="random", options=PROJ),
        peft.VeraConfig(r=3, target_modules=["lin", "lin2"]),
    ),
    "randlora": (
        "linear",
        AdapterConfig(LIN, "randlora", rank=2, alpha=7.0, init="random", options=PROJ),
        peft.RandLoraConfig(r=2, randlora_alpha=7, target_modules=["lin", "lin2"]),
    ),
    "lora_conv": (
        "conv",
        AdapterConfig(CONV, "lora", rank=2, alpha=3.0, init="random", fan_in_axes={CONV: 3}),
        peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv"]),
    ),
    "dora_conv": (
        "conv",
        AdapterConfig(CONV, "dora", rank=2, alpha=3.0, init="random", fan_in_axes={CONV: 3}),
        peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["conv"]),
    ),
    "loha_conv": (
        "conv",
        AdapterConfig(CONV, "loha", rank=2, alpha=3.0, init="random", fan_in_axes={CONV: 3}),
        peft.LoHaConfig(r=2, alpha=3, target_modules=["conv"]),
    ),
    "lokr_conv": (
        "conv",
        AdapterConfig(
            CONV, "lokr", rank=1, alpha=2.0, init="random", fan_in_axes={CONV: 3}, options={"spatial_axes": 2}
        ),
        peft.LoKrConfig(r=1, alpha=2, target_modules=["conv"]),
    ),
    "ia3_conv": (
        "conv",
        AdapterConfig(CONV, "ia3", init="random", fan_in_axes={CONV: 3}, options={"spatial_axes": 2}),
        peft.IA3Config(target_modules=["conv"], feedforward_modules=[]),
    ),
    "lora_embedding": (
        "embedding",
        AdapterConfig("emb/embedding", "lora", rank=2, alpha=3.0, init="random"),
        peft.LoraConfig(r=2, lora_alpha=3, target_modules=["emb"]),
    ),
    "dora_embedding": (
        "embedding",
        AdapterConfig("emb/embedding", "dora", rank=2, alpha=3.0, init="random"),
        peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["emb"]),
    ),
}


def _torch_model(kind: str) -> torch.nn.Module:
  torch.manual_seed(0)
  return MODELS[kind][0]().eval()


def _run_torch(model, x) -> np.ndarray:
  with torch.no_grad():
    return _n(model(torch.from_numpy(x)))


def _conv_arg(kind):
  return CONV if kind == "conv" else None


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_peft_and_merged_export_matches_merge_and_unload(case, tmp_path):
  kind, config, _ = CASES[case]
  _, forward, x = MODELS[kind]
  base = flax_params(_torch_model(kind))
  adapter = reparam.init(jax.random.key(1), config, base)
  export_peft(tmp_path / "adapter", adapter, config, base, conv=_conv_arg(kind))

  peft_model = peft.PeftModel.from_pretrained(_torch_model(kind), tmp_path / "adapter").eval()
  expect = _run_torch(peft_model, x)
  ours = forward(reparam.apply(base, adapter, config), x)
  np.testing.assert_allclose(ours, expect, **TOL)
  assert not np.allclose(expect, forward(base, x), atol=1e-3)  # the adapter matters

  export_merged(tmp_path / "merged.safetensors", base, adapter, config, conv=_conv_arg(kind))
  merged_torch = _torch_model(kind)
  merged_torch.load_state_dict(safetensors.torch.load_file(tmp_path / "merged.safetensors"))  # strict
  np.testing.assert_allclose(_run_torch(merged_torch, x), _run_torch(peft_model.merge_and_unload(), x), **TOL)


def _train_in_peft(model, x, steps=3):
  """A few SGD steps on a fixed regression target so every adapter tensor moves away from its init."""
  model.train()
  inputs = torch.from_numpy(x)
  with torch.no_grad():
    target = torch.sin(3 * model(inputs).float()) + 0.5
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
  for _ in range(steps):
    opt.zero_grad()
    ((model(inputs).float() - target) ** 2).mean().backward()
    opt.step()
  return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_adapter_imports(case, tmp_path):
  kind, config, peft_config = CASES[case]
  _, forward, x = MODELS[kind]
  torch.manual_seed(2)
  peft_model = _train_in_peft(peft.get_peft_model(_torch_model(kind), peft_config), x)
  peft_model.save_pretrained(tmp_path)
  base = flax_params(_torch_model(kind))

  adapter, imported = import_peft(tmp_path, base, conv=_conv_arg(kind))
  assert imported.method == config.method
  assert imported.use_rslora == getattr(peft_config, "use_rslora", False)
  expect = _run_torch(peft_model, x)
  np.testing.assert_allclose(forward(reparam.apply(base, adapter, imported), x), expect, **TOL)
  assert not np.allclose(expect, forward(base, x), atol=1e-3)  # training moved the adapter


def test_rank_and_alpha_patterns_round_trip(tmp_path):
  kind, config, _ = CASES["lora"]
  base = flax_params(_torch_model(kind))
  adapter = reparam.init(jax.random.key(1), config, base)
  export_peft(tmp_path, adapter, config, base)
  loaded = peft.PeftModel.from_pretrained(_torch_model(kind), tmp_path).base_model.model
  assert (loaded.lin.r["default"], loaded.lin2.r["default"]) == (2, 3)  # PEFT read the per-module ranks
  assert loaded.lin2.scaling["default"] == pytest.approx(5.0 / 3)
  back, back_config = import_peft(tmp_path, base)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, adapter)
  targets = {t.path: (t.rank, t.alpha) for t in select_targets(back_config, base)}
  assert targets == {"lin/kernel": (2, 3.0), "lin2/kernel": (3, 5.0)}


def test_dense_general_kernels_fold_to_linear(tmp_path):
  torch.manual_seed(3)
  torch_model = TinyTransformerTorch().eval()
  params = flax_params(torch_model)
  params["query"] = {
      "kernel": params["query"]["kernel"].reshape(8, 2, 4),
      "bias": params["query"]["bias"].reshape(2, 4),
  }
  params["out"]["kernel"] = params["out"]["kernel"].reshape(2, 4, 8)
  flax_model = tiny_models.TinyTransformer()
  ids = np.array(tiny_models.tokens())
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      tiny_models.init_params(flax_model, ids)
  )
  np.testing.assert_allclose(flax_model.apply({"params": params}, ids), _run_torch(torch_model, ids), **TOL)

  config = AdapterConfig(
      r"(query|out)/kernel", rank=2, alpha=3.0, init="random", fan_in_axes=tiny_models.ATTENTION_FAN_IN
  )
  adapter = reparam.init(jax.random.key(4), config, params)
  export_peft(tmp_path / "out", adapter, config, params)
  same_base = TinyTransformerTorch()
  same_base.load_state_dict(torch_model.state_dict())
  peft_model = peft.PeftModel.from_pretrained(same_base, tmp_path / "out")
  np.testing.assert_allclose(
      flax_model.apply({"params": reparam.apply(params, adapter, config)}, ids),
      _run_torch(peft_model.eval(), ids),
      **TOL,
  )

  torch.manual_seed(5)  # PEFT -> jaxpeft: random (non-zero) LoRA weights
  theirs = peft.get_peft_model(
      torch_model, peft.LoraConfig(r=3, target_modules=["query", "out"], init_lora_weights=False)
  ).eval()
  theirs.save_pretrained(tmp_path / "in")
  back, back_config = import_peft(tmp_path / "in", params, fan_in_axes=tiny_models.ATTENTION_FAN_IN)
  np.testing.assert_allclose(
      flax_model.apply({"params": reparam.apply(params, back, back_config)}, ids), _run_torch(theirs, ids), **TOL
  )


@pytest.fixture(scope="module")
def tiny_bert():
  """A random 2-layer transformers.BertModel (hidden 32) and jaxpeft's BertEncoder with its weights."""
  import transformers  # pylint: disable=g-import-not-at-top

  from jaxpeft.models.bert import BertConfig, BertEncoder
  from jaxpeft.models.hf_loader import params_from_hf

  fields = dict(
      vocab_size=99,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=37,
      max_position_embeddings=16,
  )
  torch.manual_seed(6)
  make = lambda: transformers.BertModel(transformers.BertConfig(**fields)).eval()
  torch_model = make()
  model = BertEncoder(BertConfig(**fields))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  params = params_from_hf({k: _n(v) for k, v in torch_model.state_dict().items()}, shapes)
  return torch_model, make, model, params


def _bert_embeddings(torch_model, ids):
  with torch.no_grad():
    hidden = torch_model(input_ids=torch.from_numpy(ids)).last_hidden_state
  return _n(hidden.mean(1))


def test_bert_lora_exports_to_peft_bert_model(tiny_bert, tmp_path):
  torch_model, make, model, params = tiny_bert
  ids = np.random.default_rng(7).integers(0, 99, size=(2, 9))
  config = AdapterConfig(r".*attention/(query|value)/kernel", rank=4, alpha=8.0, init="random")
  adapter = reparam.init(jax.random.key(8), config, params)
  export_peft(tmp_path / "lora", adapter, config, params, module_name=bert_module_name)

  base = make()
  base.load_state_dict(torch_model.state_dict())
  peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
  assert len(peft_model.base_model.model.encoder.layer[1].attention.self.value.lora_A) == 1
  expect = _bert_embeddings(peft_model, ids)
  embed = jax.jit(lambda p: model.apply({"params": p}, ids))
  np.testing.assert_allclose(embed(reparam.apply(params, adapter, config)), expect, **TOL)
  assert not np.allclose(expect, embed(params), atol=1e-3)

  export_merged(tmp_path / "merged.safetensors", params, adapter, config, module_name=bert_module_name)
  merged = make()
  result = merged.load_state_dict(safetensors.torch.load_file(tmp_path / "merged.safetensors"), strict=False)
  assert not result.unexpected_keys
  assert all(k.startswith("pooler.") for k in result.missing_keys)  # BertEncoder has no pooler
  np.testing.assert_allclose(
      _bert_embeddings(merged, ids), _bert_embeddings(peft_model.merge_and_unload(), ids), **TOL
  )


def test_methods_peft_lacks_are_refused(tmp_path):
  base = flax_params(_torch_model("linear"))
  config = AdapterConfig(LIN, "hydra", rank=2)
  with pytest.raises(ValueError, match=r"no Hugging Face PEFT counterpart.*'dora'.*'ia3'.*'lokr'.*'randlora'"):
    export_peft(tmp_path, reparam.init(jax.random.key(0), config, base), config, base)


def test_vera_projections_must_be_shared_slices(tmp_path):
  base = flax_params(_torch_model("linear"))
  config = AdapterConfig(LIN, "vera", rank=3)  # no projection_shape: each shape draws its own projections
  with pytest.raises(ValueError, match="not a slice of the same shared matrix.*projection_shape"):
    export_peft(tmp_path, reparam.init(jax.random.key(0), config, base), config, base)


def test_import_mismatch_is_one_readable_diff(tmp_path):
  kind, config, _ = CASES["lora"]
  base = flax_params(_torch_model(kind))
  export_peft(tmp_path, reparam.init(jax.random.key(1), config, base), config, base)
  with pytest.raises(ValueError, match=r"modules not in the Flax model: lin, lin2 .*module_name"):
    import_peft(tmp_path, base, module_name=lambda path: "model." + path.rsplit("/", 1)[0])

  path = os.fspath(tmp_path / "adapter_model.safetensors")
  tensors = safetensors.torch.load_file(path)
  tensors["base_model.model.lin.lora_A.weight"] = tensors["base_model.model.lin.lora_A.weight"][:, :4].contiguous()
  tensors["base_model.model.lin.lora_C.weight"] = torch.zeros(2)
  del tensors["base_model.model.lin2.lora_B.weight"]
  safetensors.torch.save_file(tensors, path)
  with pytest.raises(ValueError) as error:
    import_peft(tmp_path, base)
  message = str(error.value)
  assert "missing tensors: [base_model.model.lin2.lora_B.weight]" in message
  assert "unexpected tensors: [base_model.model.lin.lora_C.weight]" in message
  assert "base_model.model.lin.lora_A.weight: (2, 4) in the file, (2, 6) expected for lin/kernel" in message


def test_unsupported_peft_options_and_stacked_layers_are_refused(tmp_path):
  kind, config, _ = CASES["lora"]
  base = flax_params(_torch_model(kind))
  export_peft(tmp_path, reparam.init(jax.random.key(1), config, base), config, base)
  peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**peft_config, "lora_bias": True}))
  with pytest.raises(ValueError, match=r"does not implement: \{'lora_bias': True\}"):
    import_peft(tmp_path, base)

  scanned = tiny_models.init_params(tiny_models.ScannedMLP(), jnp.zeros((1, tiny_models.WIDTH)))
  stacked = AdapterConfig(r".*dense/kernel", rank=2, stacked_axes={r".*dense/kernel": 1})
  with pytest.raises(ValueError, match="stacked .* unstack"):
    export_peft(tmp_path / "scanned", reparam.init(jax.random.key(0), stacked, scanned), stacked, scanned)


def _readme_example() -> str:
  """The code block under the README's "Train in jaxpeft, serve with Hugging Face PEFT" heading."""
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("### Train in jaxpeft, serve with Hugging Face PEFT", 1)[1]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert (tmp_path / "minilm-lora" / "adapter_config.json").exists()
  np.testing.assert_allclose(namespace["ours"], namespace["theirs"], **TOL)
  trained_b = [
      leaves["b"]
      for leaves in jax.tree_util.tree_leaves(
          namespace["adapter"], is_leaf=lambda node: isinstance(node, dict) and "b" in node
      )
  ]
  assert len(trained_b) == 12 and all(np.abs(b).max() > 0 for b in trained_b)  # LoRA's b starts at 0: it trained


@pytest.mark.parametrize("target_modules", [["dense"], "all-linear"])
def test_peft_adapter_of_a_bert_with_its_pooler_imports(target_modules, tmp_path):
  """PEFT's "dense" and all-linear targets adapt BertModel's pooler.dense too; load_bert carries the pooler."""
  import transformers  # pylint: disable=g-import-not-at-top

  from jaxpeft.models.bert import BertEncoder
  from jaxpeft.models.hf_loader import load_bert, resolve_model_dir

  torch.manual_seed(3)
  config = transformers.BertConfig(
      vocab_size=30522,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=24,
      max_position_embeddings=16,
  )
  base = transformers.BertModel(config).eval()
  base.save_pretrained(tmp_path / "base", safe_serialization=True)
  (tmp_path / "base" / "tokenizer.json").write_bytes((resolve_model_dir() / "tokenizer.json").read_bytes())
  theirs = peft.get_peft_model(
      base, peft.LoraConfig(r=2, target_modules=target_modules, init_lora_weights=False)
  ).eval()
  assert "pooler.dense" in {
      n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
  }
  theirs.save_pretrained(tmp_path / "adapter")
  model, params, _, _ = load_bert(tmp_path / "base")
  adapter, adapter_config = import_peft(tmp_path / "adapter", params, module_name=bert_module_name)
  ids = np.random.default_rng(1).integers(0, 99, size=(2, 6))
  adapted = reparam.apply(params, adapter, adapter_config)
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids))
  np.testing.assert_allclose(model.apply({"params": adapted}, ids), _n(out.last_hidden_state.mean(1)), **TOL)
  np.testing.assert_allclose(
      model.apply({"params": adapted}, ids, method=BertEncoder.pooler_output), _n(out.pooler_output), **TOL
  )
