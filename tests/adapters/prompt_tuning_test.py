"""Prompt tuning and VPT (shallow / deep) through module hooks, against the numpy forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpeft.adapters import houlsby, prompt_tuning, reparam
from jaxpeft.adapters.config import AdapterConfig
from tests.adapters import houlsby_test as ht

assert prompt_tuning.VisualPromptTuning.name == "vpt"  # importing the module registers "vpt"
P = 3
TEXT = AdapterConfig(targets="embed/embedding", method="prompt_tuning", rank=P)
DEEP = AdapterConfig(targets=r"block_\d+/ln1/scale", method="vpt", rank=P, options={"patch_size": 2})
SHALLOW = AdapterConfig(targets=r"block_0/ln1/scale", method="vpt", rank=P, options={"patch_size": 2})


def _prompt(adapter, path):
    leaf = adapter
    for key in path.split("/"):
        leaf = leaf[key]
    return np.asarray(leaf["prompt"], np.float64)


def test_prompt_tuning_equals_numpy_forward():
    model, x, params = ht.model_and_input(text=True)
    adapter = reparam.init(jax.random.key(1), TEXT, params)
    prompt = _prompt(adapter, "embed/embedding")
    expect = ht.np_forward(params, x, embed_out=lambda e: np.concatenate(
        [np.broadcast_to(prompt, e.shape[:-2] + prompt.shape), e], axis=-2))
    assert not np.allclose(expect, ht.np_forward(params, x), atol=1e-2)
    np.testing.assert_allclose(ht.hooked_apply(model, params, adapter, TEXT, x), expect, rtol=1e-5, atol=1e-5)
    assert sum(v.size for v in jax.tree.leaves(adapter)) == P * ht.D


def test_prompt_tuning_inits_match_peft():
    from peft import PromptTuningConfig, PromptTuningInit, TaskType
    from peft.tuners.prompt_tuning import PromptEmbedding

    n, d = 400, 32
    table = {"embed": {"embedding": jax.random.normal(jax.random.key(0), (50, d))}}
    ours = _prompt(reparam.init(jax.random.key(1), AdapterConfig(targets="embed/embedding", method="prompt_tuning",
                                                                 rank=n), table), "embed/embedding")
    torch.manual_seed(0)
    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, token_dim=d,
                                     num_transformer_submodules=1, prompt_tuning_init=PromptTuningInit.RANDOM)
    theirs = PromptEmbedding(peft_config, torch.nn.Embedding(50, d)).embedding.weight.detach().numpy()
    assert ours.shape == theirs.shape
    # both N(0, 1): 12800 draws each, tolerances about 5 standard errors of the difference
    np.testing.assert_allclose(ours.mean(), theirs.mean(), atol=0.06)
    np.testing.assert_allclose(ours.std(), theirs.std(), atol=0.045)
    np.testing.assert_allclose(ours.std(), 1.0, atol=0.03)
    sampled = _prompt(reparam.init(jax.random.key(1), AdapterConfig(
        targets="embed/embedding", method="prompt_tuning", rank=n, init="sample_vocab"), table), "embed/embedding")
    vocab = np.asarray(table["embed"]["embedding"], np.float64)
    rows = [np.flatnonzero(np.all(np.isclose(vocab, row), axis=1)) for row in sampled]
    assert all(r.size == 1 for r in rows) and len({int(r[0]) for r in rows}) > 40  # real rows, many of them


@pytest.mark.parametrize("config", [SHALLOW, DEEP], ids=["shallow", "deep"])
def test_vpt_equals_numpy_forward(config):
    model, x, params = ht.model_and_input()
    adapter = reparam.init(jax.random.key(1), config, params)
    prompts = {i: _prompt(adapter, f"block_{i}/ln1/scale") for i in range(ht.DEPTH) if f"block_{i}" in adapter}

    def block_in(i, x):
        if i not in prompts:
            return x
        p = np.broadcast_to(prompts[i], x.shape[:-2] + prompts[i].shape)
        rest = x[..., 1:, :] if i == 0 else x[..., 1 + P:, :]  # insert before block 0, replace afterwards
        return np.concatenate([x[..., :1, :], p, rest], axis=-2)

    expect = ht.np_forward(params, x, block_in=block_in)
    assert not np.allclose(expect, ht.np_forward(params, x), atol=1e-3)
    np.testing.assert_allclose(ht.hooked_apply(model, params, adapter, config, x), expect, rtol=1e-5, atol=1e-5)
    # two forward passes inside one block: each inserts once
    with houlsby.intercept(params, adapter, config):
        twice = [model.apply({"params": params}, x) for _ in range(2)]
    np.testing.assert_allclose(twice[1], expect, rtol=1e-5, atol=1e-5)
    assert sum(v.size for v in jax.tree.leaves(adapter)) == len(prompts) * P * ht.D


def test_vpt_init_bound():
    params = {"block": {"ln": {"scale": jnp.ones((64,))}}}
    prompt = reparam.init(jax.random.key(0), AdapterConfig(targets="block/ln/scale", method="vpt", rank=500),
                          params)["block"]["ln"]["scale"]["prompt"]
    bound = np.sqrt(6.0 / (3 * 16 * 16 + 64))  # KMnP/vpt, patch 16
    assert 0.99 * bound < np.abs(prompt).max() <= bound


@pytest.mark.parametrize("text", [True, False], ids=["prompt_tuning", "vpt_deep"])
def test_training_and_checkpoint(tmp_path, text):
    model, x, params = ht.model_and_input(text=text)
    config = TEXT if text else DEEP
    ht.check_training_reduces_loss(model, x, params, config, lr=1e-1)
    ht.check_checkpoint_round_trip(tmp_path, model, x, params, reparam.init(jax.random.key(1), config, params),
                                   config)


def test_errors():
    _, _, params = ht.model_and_input(text=True)
    with pytest.raises(ValueError, match="targets the 'embedding' table"):
        reparam.init(jax.random.key(0), AdapterConfig(targets="head/kernel", method="prompt_tuning"), params)
    with pytest.raises(ValueError, match="unknown init 'text'"):
        reparam.init(jax.random.key(0), AdapterConfig(targets="embed/embedding", method="prompt_tuning",
                                                      init="text"), params)
    with pytest.raises(ValueError, match="VPT targets a 1-D leaf"):
        reparam.init(jax.random.key(0), AdapterConfig(targets=r"block_0/q/kernel", method="vpt"), params)
