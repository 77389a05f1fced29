"""EATA / ETA vs a PyTorch transcription of mr-eggplant/EATA (eata.py, main.py's Fisher)."""

import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jaxpeft.tta import eata
from tests.tta import torch_reference as ref


def _torch_fisher(model, batches):
  """main.py: CE against the model's argmax, squared grads per batch, averaged; anchors = source params."""
  fishers = {}
  for i, images in enumerate(batches, start=1):
    outputs = model(ref.torch_images(images))
    F.cross_entropy(outputs, outputs.max(1)[1]).backward()
    for name, p in model.named_parameters():
      if p.grad is not None:
        f = p.grad.detach().clone() ** 2 + (fishers[name][0] if i > 1 else 0)
        if i == len(batches):
          f = f / i
        fishers[name] = [f, p.detach().clone()]
    model.zero_grad()
  return fishers


def _torch_step(model, optimizer, images, fishers, e_margin, d_margin, probs, alpha):
  """forward_and_adapt_eata, transcribed."""
  outputs = model(ref.torch_images(images))
  entropys = ref.softmax_entropy(outputs)
  ids1 = torch.where(entropys < e_margin)
  ids2 = torch.where(ids1[0] > -0.1)
  entropys = entropys[ids1]
  if probs is not None:
    cos = F.cosine_similarity(probs.unsqueeze(0), outputs[ids1].softmax(1), dim=1)
    ids2 = torch.where(torch.abs(cos) < d_margin)
    entropys = entropys[ids2]
    new = outputs[ids1][ids2].softmax(1)
    probs = probs if new.size(0) == 0 else (0.9 * probs + 0.1 * new.mean(0)).detach()
  else:
    new = outputs[ids1].softmax(1)
    probs = None if new.size(0) == 0 else new.mean(0).detach()
  loss = (entropys * (1 / torch.exp(entropys.detach() - e_margin))).mean(0)
  if fishers is not None:
    loss = loss + sum(
        alpha * (fishers[n][0] * (p - fishers[n][1]) ** 2).sum()
        for n, p in model.named_parameters()
        if n in fishers
    )
  if images[ids1[0].numpy()][ids2[0].numpy()].shape[0] != 0:
    loss.backward()
    optimizer.step()
  optimizer.zero_grad()
  return outputs, probs, entropys.size(0)


@pytest.mark.parametrize("with_fisher", [False, True])
def test_eata_matches_reference(with_fisher):
  model, params, model_state = ref.flax_model()
  clean, stream = ref.batches(2, seed=5), ref.batches(4)
  torch_model = ref.configure_like_authors(ref.TorchTinyBN(params))
  first = ref.softmax_entropy(torch_model(ref.torch_images(stream[0]))).detach().numpy()
  e_margin, d_margin, alpha = float(np.median(first)), 0.999, 50.0  # thresholds that keep some, drop some
  config = eata.Config(
      model.apply,
      num_classes=ref.CLASSES,
      optimizer=optax.sgd(0.5, momentum=0.9),
      e_margin=e_margin,
      d_margin=d_margin,
      fisher_alpha=alpha,
  )
  fishers = eata.fisher(params, model_state, config, clean) if with_fisher else None
  state = eata.init(params, model_state, config, fishers)
  torch_fishers = _torch_fisher(torch_model, clean) if with_fisher else None
  if with_fisher:
    np.testing.assert_allclose(fishers["bn"]["scale"], torch_fishers["bn.weight"][0].numpy(), rtol=1e-4, atol=1e-9)
  optimizer = torch.optim.SGD([torch_model.bn.weight, torch_model.bn.bias], lr=0.5, momentum=0.9)
  probs, backward, step = None, 0, jax.jit(eata.step)
  for images in stream:
    state, logits = step(state, images)
    outputs, probs, count = _torch_step(
        torch_model, optimizer, images, torch_fishers, e_margin, d_margin, probs, alpha
    )
    backward += count
    np.testing.assert_allclose(logits, outputs.detach().numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, torch_model)
    np.testing.assert_allclose(state.extra["probs"], probs.numpy(), rtol=1e-5, atol=1e-7)
  assert int(state.extra["num_backward"]) == backward
  assert 0 < backward < 4 * 8  # the filters dropped some images and kept some
