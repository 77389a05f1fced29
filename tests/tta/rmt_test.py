"""RMT vs a PyTorch transcription of mariodoebler/test-time-adaptation (prototypes, warm-up, loss, replay)."""

import jax
import numpy as np
import optax
import pytest

from jaxpeft.tta import cotta, rmt
from tests.tta import torch_reference as ref


def _source(num_batches=3, size=8):
  images = ref.batches(num_batches, seed=7, size=size)
  rng = np.random.default_rng(3)
  labels = [rng.permutation(np.arange(size) % ref.CLASSES).astype(np.int32) for _ in images]
  return list(zip(images, labels))


def _assert_model_equal(params, model, rtol=1e-4, atol=1e-5):
  ref.assert_bn_equal(params, model, rtol=rtol, atol=atol)
  for got, want in (
      (params["conv"]["kernel"], model.conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
      (params["head"]["kernel"], model.head.weight.detach().numpy().T),
      (params["head"]["bias"], model.head.bias.detach().numpy()),
  ):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_rmt_matches_reference(warmup_samples=32, lambda_ce_src=1.0):
  """Four warm-up steps, then three test batches (one and several steps), each compared."""
  model, params, model_state = ref.flax_model(sow_features=True)
  source = _source()
  config = rmt.Config(
      model.apply,
      num_classes=ref.CLASSES,
      optimizer=optax.adam(1e-2),
      mt=0.9,
      projection_dim=6,
      lambda_ce_src=lambda_ce_src,
      warmup_samples=warmup_samples,
  )
  prepared = rmt.prepare(params, model_state, config, source)
  state, step = rmt.init(params, model_state, config, **prepared), jax.jit(rmt.step)
  torch_rmt = ref.TorchRMT(
      ref.TorchTinyBN(params),
      state.extra["projector"],
      source,
      lr=1e-2,
      mt=0.9,
      temperature=0.1,
      warmup_steps=warmup_samples // 8,
      lambdas=(lambda_ce_src, 1.0, 1.0),
  )
  np.testing.assert_allclose(state.extra["prototypes"], torch_rmt.prototypes[:, 0].numpy(), rtol=1e-5, atol=1e-6)
  _assert_model_equal(state.params, torch_rmt.model)
  _assert_model_equal(state.extra["teacher"], torch_rmt.model_ema)
  for images in ref.batches(3):
    _, aug_key = jax.random.split(state.extra["key"])  # the augmentation the JAX step draws
    augmented = cotta.augment(aug_key, images)
    state, logits = step(state, images)
    outputs = torch_rmt.forward_and_adapt(images, augmented)
    np.testing.assert_allclose(logits, outputs.numpy(), rtol=1e-4, atol=1e-5)
    _assert_model_equal(state.params, torch_rmt.model)
    _assert_model_equal(state.extra["teacher"], torch_rmt.model_ema)
    np.testing.assert_allclose(
        state.extra["projector"]["dense1"]["kernel"],
        torch_rmt.projector[0].weight.detach().numpy().T,
        rtol=1e-4,
        atol=1e-5,
    )


def test_rmt_needs_labelled_source_covering_every_class():
  model, params, model_state = ref.flax_model(sow_features=True)
  config = rmt.Config(model.apply, num_classes=ref.CLASSES, warmup_samples=0)
  with pytest.raises(ValueError, match="rmt needs clean labelled source images"):
    rmt.prepare(params, model_state, config, [])
  images, _ = _source(1)[0]
  with pytest.raises(ValueError, match=r"no example of class\(es\) \[2\]"):
    rmt.prepare(params, model_state, config, [(images, np.arange(8) % 2)])
