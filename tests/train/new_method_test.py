"""A new adapter method is its own file: a toy method registered here runs through the harness and PEFT export.

The toy method declares a loss term, a custom update rule and a PEFT mapping through the optional hooks of
``AdapterMethod``; no library file knows it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import traverse_util

from jaxpeft.adapters import export_peft
from jaxpeft.adapters.core import AdapterMethod, register_method
from jaxpeft.adapters.methods.lora import lora_config_fields
from jaxpeft.adapters.peft_mapping import PeftMapping, Rule, transpose
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.trainable import adapter_config

A_INIT = 0.1


@register_method("toy_lora")
class ToyLoRA(AdapterMethod):
  """``W' = W + s a b`` with ``a`` fixed at init to ``A_INIT`` (deterministic), ``b = 0``."""

  needs_matrix = True
  peft = PeftMapping(
      "LORA",
      ("linear",),
      lambda layout, target: {"a": Rule("lora_A.weight", transpose), "b": Rule("lora_B.weight", transpose)},
      lora_config_fields,
      alpha_field="lora_alpha",
      dropout_field="lora_dropout",
  )

  def init(self, rng, kernel, target):
    return {"a": jnp.full((kernel.shape[0], target.rank), A_INIT), "b": jnp.zeros((target.rank, kernel.shape[1]))}

  def delta(self, leaves, target):
    return target.scaling * leaves["a"] @ leaves["b"]

  def loss_term(self, config, *, weight):
    def term(base_params, adapter_params, rng):
      flat = traverse_util.flatten_dict(adapter_params)
      return weight * sum(jnp.sum(v**2) for k, v in flat.items() if k[-1] == "b")

    return term

  def update_rule(self, config, *, a_factor):
    mask = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "a", tree)
    return optax.masked(optax.scale(a_factor), mask)


def test_a_method_registered_outside_the_library_trains_and_exports(smoke_config, tmp_path):
  config = smoke_config(
      trainable__base="head/.*", adapter__method="toy_lora", adapter__targets="dense/kernel", adapter__rank=2
  )
  config.adapter.penalty = {"weight": 0.5}
  config.adapter.update = {"a_factor": 0.0}  # the custom rule freezes `a`: it must stay at its init
  result = train_and_evaluate(config, str(tmp_path / "run"))
  adapter = jax.device_get(result["state"].params["adapter"])
  np.testing.assert_array_equal(adapter["dense"]["kernel"]["a"], np.float32(A_INIT))
  assert np.abs(adapter["dense"]["kernel"]["b"]).max() > 0
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  penalties = [m["penalty"] for m in logged if "penalty" in m]
  assert penalties and penalties[0] == 0 and penalties[-1] > 0  # b starts at 0, then the term is in the loss

  state = result["state"]
  base = traverse_util.unflatten_dict(
      {
          **traverse_util.flatten_dict(jax.device_get(state.frozen)),
          **traverse_util.flatten_dict(jax.device_get(state.params["base"])),
      }
  )
  export_peft(tmp_path / "peft", adapter, adapter_config(config), base)
  tensors = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors["base_model.model.dense.lora_A.weight"], adapter["dense"]["kernel"]["a"].T)
  np.testing.assert_array_equal(tensors["base_model.model.dense.lora_B.weight"], adapter["dense"]["kernel"]["b"].T)
  peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 2 and peft_config["target_modules"] == "dense"
