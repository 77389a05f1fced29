"""CoTTA vs a PyTorch transcription of qinenergy/cotta (teacher, student, EMA, stochastic restore)."""

import copy

import jax
import numpy as np
import optax
import pytest
import torch

from jaxpeft.tta import cotta
from tests.tta import torch_reference as ref

augment = jax.jit(cotta.augment)


def _torch_configure_all(model):
  """cotta.configure_model: train mode, every parameter trainable, BatchNorm with batch statistics."""
  ref.configure_like_authors(model)
  model.requires_grad_(True)
  return model


@pytest.mark.parametrize("rst", [0.5])
def test_cotta_matches_reference(rst):
  model, params, model_state = ref.flax_model()
  # ap > 1: the source is never confident enough, so the teacher always averages augmentations (and differs
  # from the student, whose gradient at the start would otherwise be rounding noise that Adam amplifies).
  config = cotta.Config(model.apply, optimizer=optax.adam(1e-2), mt=0.9, rst=rst, ap=1.01, num_augmentations=2)
  state, step = cotta.init(params, model_state, config), jax.jit(cotta.step)
  student = _torch_configure_all(ref.TorchTinyBN(params))
  source = {k: v.clone() for k, v in student.state_dict().items()}
  teacher, anchor = copy.deepcopy(student), copy.deepcopy(student)
  optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
  names = {
      "conv.weight": ("conv", "kernel"),
      "bn.weight": ("bn", "scale"),
      "bn.bias": ("bn", "bias"),
      "head.weight": ("head", "kernel"),
      "head.bias": ("head", "bias"),
  }
  for images in ref.batches(3):
    # The same augmented images and restore masks as the JAX step draws (the randomness, not the arithmetic,
    # is shared).
    _, aug_key, restore_key = jax.random.split(state.extra["key"], 3)
    augmented = [ref.torch_images(augment(k, images)) for k in jax.random.split(aug_key, 2)]
    masks = cotta.restore_masks(restore_key, state.params, rst)
    state, logits = step(state, images)
    x = ref.torch_images(images)
    outputs = student(x)
    assert anchor(x).softmax(1).max(1)[0].mean(0) < 1.01
    teacher(x)
    outputs_ema = torch.stack([teacher(a).detach() for a in augmented]).mean(0)
    (-(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0).backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
      for t, s in zip(teacher.parameters(), student.parameters()):
        t.data[:] = 0.9 * t[:].data[:] + 0.1 * s[:].data[:]
      for name, p in student.named_parameters():
        module, leaf = names[name]
        m = np.asarray(masks[module][leaf])
        m = torch.tensor(m.transpose(3, 2, 0, 1) if m.ndim == 4 else (m.T if m.ndim == 2 else m)).float()
        p.data = source[name] * m + p * (1.0 - m)
    np.testing.assert_allclose(logits, outputs_ema.numpy(), rtol=2e-5, atol=2e-5)
    ref.assert_bn_equal(state.params, student)
    np.testing.assert_allclose(
        state.params["head"]["kernel"], student.head.weight.detach().numpy().T, rtol=2e-5, atol=2e-6
    )
    np.testing.assert_allclose(
        state.extra["teacher"]["bn"]["scale"], teacher.bn.weight.detach().numpy(), rtol=2e-5, atol=2e-6
    )


def test_low_confidence_uses_augmentation_averaged_teacher():
  model, params, model_state = ref.flax_model(head_scale=0.01)  # near-uniform: confidence < ap
  config = cotta.Config(model.apply, num_augmentations=4)
  state = cotta.init(params, model_state, config)
  (images,) = ref.batches(1)
  _, logits = jax.jit(cotta.step)(state, images)
  _, aug_key, _ = jax.random.split(state.extra["key"], 3)
  expected = np.mean(
      [
          model.apply({"params": params, **model_state}, augment(k, images), train=True, mutable=["batch_stats"])[
              0
          ]
          for k in jax.random.split(aug_key, 4)
      ],
      0,
  )
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  augmented = augment(aug_key, images)
  assert augmented.shape == images.shape and not np.allclose(augmented, images)
