"""SAR vs a PyTorch transcription of mr-eggplant/SAR (sar.py with its SAM, sam.py)."""

import jax
import numpy as np
import optax
import pytest
import torch

from jaxpeft.tta import sar
from tests.tta import torch_reference as ref


class _SAM(torch.optim.Optimizer):
  """The SAM wrapper SAR uses (non-adaptive): perturb by rho g/(||g||+1e-12), restore, base step."""

  def __init__(self, params, base, rho, **kwargs):
    super().__init__(params, dict(rho=rho, **kwargs))
    self.base_optimizer = base(self.param_groups, **kwargs)
    self.param_groups = self.base_optimizer.param_groups

  @torch.no_grad()
  def first_step(self):
    norm = torch.norm(
        torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2
    )
    for group in self.param_groups:
      scale = group["rho"] / (norm + 1e-12)
      for p in group["params"]:
        if p.grad is not None:
          self.state[p]["old_p"] = p.data.clone()
          p.add_(p.grad * scale)
    self.zero_grad()

  @torch.no_grad()
  def second_step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is not None:
          p.data = self.state[p]["old_p"]
    self.base_optimizer.step()
    self.zero_grad()


def _torch_step(model, optimizer, images, margin, ema, reset_constant):
  """forward_and_adapt_sar, transcribed; returns (outputs, ema, reset_flag)."""
  optimizer.zero_grad()
  x = ref.torch_images(images)
  outputs = model(x)
  entropys = ref.softmax_entropy(outputs)
  ids1 = torch.where(entropys < margin)
  entropys[ids1].mean(0).backward()
  optimizer.first_step()
  entropys2 = ref.softmax_entropy(model(x))[ids1]
  ids2 = torch.where(entropys2 < margin)
  loss_second = entropys2[ids2].mean(0)
  if not np.isnan(loss_second.item()):
    ema = loss_second.item() if ema is None else 0.9 * ema + 0.1 * loss_second.item()
  loss_second.backward()
  optimizer.second_step()
  return outputs, ema, ema is not None and ema < reset_constant


@pytest.mark.parametrize("reset_constant", [0.01, 10.0])  # ema never / always below it: recovery off, on
def test_sar_matches_reference(reset_constant):
  model, params, model_state = ref.flax_model()
  stream = ref.batches(3)
  torch_model = ref.configure_like_authors(ref.TorchTinyBN(params))
  margin = float(np.median(ref.softmax_entropy(torch_model(ref.torch_images(stream[0]))).detach().numpy()))
  config = sar.Config(
      model.apply,
      num_classes=ref.CLASSES,
      optimizer=optax.sgd(0.5, momentum=0.9),
      rho=0.05,
      e_margin=margin,
      reset_constant=reset_constant,
  )
  state, step = sar.init(params, model_state, config), jax.jit(sar.step)
  optimizer = _SAM([torch_model.bn.weight, torch_model.bn.bias], torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9)
  saved = ({k: v.clone() for k, v in torch_model.state_dict().items()}, optimizer.state_dict())
  ema, resets = None, 0
  for images in stream:
    state, logits = step(state, images)
    outputs, ema, reset = _torch_step(torch_model, optimizer, images, margin, ema, reset_constant)
    if reset:  # SAR.forward: reset() restores model and optimizer, then self.ema = ema
      torch_model.load_state_dict(saved[0])
      optimizer.load_state_dict(saved[1])
      resets += 1
    np.testing.assert_allclose(logits, outputs.detach().numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, torch_model)
    assert bool(state.extra["has_ema"]) == (ema is not None)
    if ema is not None:
      np.testing.assert_allclose(state.extra["ema"], ema, rtol=1e-5)
  assert ema is not None and int(state.extra["num_resets"]) == resets and (resets > 0) == (reset_constant > 1)
