"""Adapters on a quantized frozen base: dequantize inside the traced step, then the adapters' own path.

Weight-space (reparameterization) methods -- every method of ``jaxpeft.adapters`` with ``delta``/``apply`` --
run unchanged on a tree holding ``QuantizedArray`` leaves through ``apply``::

    qbase = quantize_tree(base, r".*/kernel", "nf4", 64, double_quant=True)   # once; only codes kept
    adapter = reparam.init(rng, config, dequantize_tree(qbase))               # or init on the float base

    @jax.jit
    def train_step(adapter, opt_state, qbase, batch):
        def loss_fn(adapter):
            params = jaxpeft.quantize.apply(qbase, adapter, config)           # dequantized here, in the step
            return loss(model.apply({"params": params}, batch["x"]), batch["y"])
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        ...

``apply(qbase, adapter, config) = reparam.apply(dequantize_tree(qbase), adapter, config)``: the float weights
exist only as temporaries of the compiled step (XLA frees or fuses them), while the arrays kept between steps
are the packed codes. The adapter math is the method's own, in float32 on the dequantized weight, exactly as
on a float base (QLoRA computes ``x dequant(W) + s x A B`` the same way). ``config.targets`` selects among
the dequantized paths (``.../kernel``), so one config serves float and quantized bases.

Activation-hook (factored) mode: dequantize, then use ``jaxpeft.adapters.factored`` as on a float base::

    params = dequantize_tree(qbase)                                           # inside the jitted function
    with factored.intercept(params, adapter, config):
        logits = model.apply({"params": params}, x)
"""

from __future__ import annotations

from jaxpeft.adapters import reparam
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.reparam import AdapterParams, Params
from jaxpeft.quantize.tree import dequantize_tree


def apply(quantized_params: Params, adapter_params: AdapterParams, config: AdapterConfig) -> Params:
  """``reparam.apply`` on the dequantized base (call it inside the jitted step; differentiable in the adapter)."""
  return reparam.apply(dequantize_tree(quantized_params), adapter_params, config)
