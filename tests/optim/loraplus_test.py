"""LoRA+ against PEFT's create_loraplus_optimizer (with torch's Adam/AdamW/SGD as the base)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from jaxpeft.optim.loraplus import loraplus
from jaxpeft.optim.sam import sam
from tests.optim import peft_lora_reference as ref

LR = 2.0**-7
NUM_STEPS = 10

BASES = {
    # (torch class and kwargs, the same optimizer in optax)
    "adam": ((torch.optim.Adam, {}), optax.adam),
    "adamw": ((torch.optim.AdamW, {"weight_decay": 0.1}), functools.partial(optax.adamw, weight_decay=0.1)),
    "sgd_momentum": ((torch.optim.SGD, {"momentum": 0.9}), functools.partial(optax.sgd, momentum=0.9)),
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("bias", ["none", "all"])
def test_matches_peft(base, bias):
  (torch_cls, torch_kw), optax_base = BASES[base]
  model, by_path = ref.peft_model(bias=bias)
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, NUM_STEPS)
  kw = {"loraplus_lr_ratio": 8.0, "loraplus_lr_embedding": 1e-3}
  # PEFT replaces the base optimizer's decay by loraplus_weight_decay (and 0 for 1-D parameters).
  peft_opt = create_loraplus_optimizer(
      model, torch_cls, lr=LR, **kw, **torch_kw, **({"loraplus_weight_decay": 0.1} if base == "adamw" else {})
  )
  if base == "adamw" and bias == "all":
    # PEFT exempts the biases from decay; ours decays what the base optimizer decays: mask it.
    optax_base = functools.partial(optax.adamw, weight_decay=0.1, mask=_not_bias)
  ours = ref.run_ours(loraplus(LR, **kw, base_optimizer=optax_base), params, grads)
  ref.assert_same_trajectories(ours, ref.run_peft(peft_opt, by_path, grads))


def _not_bias(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", tree)


def test_b_factors_move_faster():
  """The rule is active: with ratio 1 and embedding lr = lr, LoRA+ is the base optimizer; with the
  defaults the B factors and biases move further, the embedding factors (lr 1e-6) less, A the same."""
  model, by_path = ref.peft_model(bias="all")
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, 3)
  plain = ref.run_ours(optax.adam(LR), params, grads)[-1]
  same = ref.run_ours(loraplus(LR, 1.0, LR, base_optimizer=optax.adam), params, grads)[-1]
  plus = ref.run_ours(loraplus(LR, base_optimizer=optax.adam), params, grads)[-1]
  for k in params:
    np.testing.assert_allclose(same[k], plain[k], rtol=1e-12)
    ratio = np.abs(plus[k] - params[k]).sum() / np.abs(plain[k] - params[k]).sum()
    if k.startswith("emb/"):
      np.testing.assert_allclose(ratio, 1e-6 / LR, rtol=1e-6, err_msg=k)
    elif k.endswith("/b") or k.endswith("bias"):
      np.testing.assert_allclose(ratio, 16.0, rtol=1e-6, err_msg=k)
    else:
      np.testing.assert_allclose(ratio, 1.0, rtol=1e-12, err_msg=k)


def test_composes_with_sam():
  """LoRA+ over SAM(Adam): the extra grad_fn reaches SAM through the chain."""
  model, by_path = ref.peft_model()
  params = jax.tree.map(jnp.asarray, ref.nest(ref.initial_params(by_path)))
  loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  tx = loraplus(LR, base_optimizer=lambda lr: sam(rho=0.05, base_optimizer=optax.adam(lr)))
  sam_only = sam(rho=0.05, base_optimizer=optax.adam(LR))
  g = jax.grad(loss)(params)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=jax.grad(loss))
  expected, _ = sam_only.update(g, sam_only.init(params), params, grad_fn=jax.grad(loss))
  np.testing.assert_allclose(updates["fc1"]["kernel"]["b"], 16.0 * expected["fc1"]["kernel"]["b"], rtol=1e-6)
  np.testing.assert_allclose(updates["fc1"]["kernel"]["a"], expected["fc1"]["kernel"]["a"], rtol=1e-6)


def test_weight_decay_goes_to_the_base():
  """The harness sets config.optimizer.weight_decay; the rule hands it to the base optimizer."""
  model, by_path = ref.peft_model()
  params = ref.initial_params(by_path)
  grads = ref.random_grads(params, 2)
  ours = ref.run_ours(loraplus(LR, weight_decay=0.1), params, grads)
  base = functools.partial(optax.adamw, weight_decay=0.1)
  ref.assert_same_trajectories(ours, ref.run_ours(loraplus(LR, base_optimizer=base), params, grads))
  with pytest.raises(ValueError, match="takes no weight_decay"):
    loraplus(LR, weight_decay=0.1, base_optimizer=optax.sgd)


def test_bad_arguments():
  with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
    loraplus(LR, loraplus_lr_ratio=0.0)
