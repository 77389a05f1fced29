"""CAFA vs a PyTorch transcription of the paper's class statistics and loss (Eqns. 1-5), and bad input."""

import jax
import numpy as np
import optax
import pytest
import torch

from jaxpeft.tta import cafa
from tests.tta import torch_reference as ref


def _torch_class_statistics(model, clean, labels, eps):
  """Eqn. 1 on the source model (running statistics): per-class mean, biased covariance, inverted."""
  model.eval()
  with torch.no_grad():
    feats = torch.cat([model.features(ref.torch_images(x)) for x in clean]).double()
  labels = torch.tensor(np.concatenate(labels))
  mu, precision = [], []
  for c in range(ref.CLASSES):
    f = feats[labels == c]
    centred = f - f.mean(0)
    mu.append(f.mean(0))
    precision.append(torch.linalg.inv(centred.T @ centred / len(f) + eps * torch.eye(f.shape[1], dtype=f.dtype)))
  return torch.stack(mu).float(), torch.stack(precision).float()


def _torch_loss(model, x, mu, precision):
  """Eqns. 2-5: log of intra-class over summed class Mahalanobis distances, batch mean."""
  feats = model.features(x)
  predicted = model.head(feats).argmax(1)
  distances = []
  for f in feats:
    distances.append(torch.stack([(f - mu[c]) @ precision[c] @ (f - mu[c]) for c in range(len(mu))]))
  distances = torch.stack(distances)
  return torch.log(distances[torch.arange(len(x)), predicted] / distances.sum(1)).mean(), model.head(feats)


@pytest.mark.parametrize("steps", [1, 2])
def test_cafa_matches_reference(steps):
  model, params, model_state = ref.flax_model(sow_features=True)
  rng = np.random.default_rng(4)
  clean = ref.batches(3, seed=7)
  labels = [rng.permutation(np.arange(8) % ref.CLASSES) for _ in clean]
  config = cafa.Config(model.apply, num_classes=ref.CLASSES, optimizer=optax.adam(1e-2), steps=steps)
  stats = cafa.prepare(params, model_state, config, list(zip(clean, labels)))
  state = cafa.init(params, model_state, config, **stats)
  torch_model = ref.TorchTinyBN(params)
  mu, precision = _torch_class_statistics(torch_model, clean, labels, 1e-5)
  np.testing.assert_allclose(stats["class_means"], mu.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["class_precisions"], precision.numpy(), rtol=1e-4, atol=1e-4)
  torch_model = ref.configure_like_authors(torch_model)
  optimizer = torch.optim.Adam([torch_model.bn.weight, torch_model.bn.bias], lr=1e-2)
  step = jax.jit(cafa.step)
  for images in ref.batches(3):
    state, logits = step(state, images)
    for _ in range(steps):
      loss, outputs = _torch_loss(torch_model, ref.torch_images(images), mu, precision)
      loss.backward()
      optimizer.step()
      optimizer.zero_grad()
    np.testing.assert_allclose(logits, outputs.detach().numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, torch_model, rtol=1e-4, atol=1e-5)
  assert not np.allclose(state.params["bn"]["scale"], params["bn"]["scale"])  # it did adapt


def test_cafa_bad_input():
  model, params, model_state = ref.flax_model(sow_features=True)
  config = cafa.Config(model.apply, num_classes=ref.CLASSES)
  with pytest.raises(ValueError, match="needs labelled clean .*config.clean_images"):
    cafa.prepare(params, model_state, config, [])
  with pytest.raises(ValueError, match="at least 2 clean images of every class.*\\[8, 0, 0\\]"):
    cafa.prepare(params, model_state, config, [(ref.batches(1)[0], np.zeros(8, int))])
  with pytest.raises(ValueError, match="needs class_means"):
    cafa.init(params, model_state, config)
