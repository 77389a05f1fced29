"""CorDA through the harness: calibration from training batches, residual base, export, resume."""

import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jaxpeft.models import hf_loader
from jaxpeft.models.registry import build_model
from jaxpeft.train.loop import train_and_evaluate
from jaxpeft.train.trainable import Trainable
from tests.train.saved_params import flat, save_initial_params, train_loader

RANK, ALPHA, CALIBRATION_BATCHES = 2, 4.0, 2


@pytest.fixture(scope="module")
def start(tmp_path_factory, data_dir):
  """The starting weights (saved for init_from) and a config factory that trains CorDA on them."""
  from configs import quickstart

  config = quickstart.get_config("smoke")
  config.dataset.data_dir = data_dir
  path = str(tmp_path_factory.mktemp("start") / "params")
  original = save_initial_params(config, path)

  def make(smoke_config, **overrides):
    settings = dict(
        init_from__params=path,
        trainable__base="",
        adapter__method="corda",
        adapter__targets="head/kernel",
        adapter__rank=RANK,
        adapter__alpha=ALPHA,
        adapter__calibration_batches=CALIBRATION_BATCHES,
    )
    return smoke_config(**{**settings, **overrides})

  return original, make


def _head_inputs(config, params, batch):
  """The CNN head's inputs: relu of the dense layer's captured output (numpy)."""
  _, state = build_model(config.model).apply(
      {"params": params}, jnp.asarray(batch["image"]), capture_intermediates=True, mutable=["intermediates"]
  )
  return np.maximum(np.asarray(state["intermediates"]["dense"]["__call__"][0], np.float64), 0.0)


def _damped_covariance(inputs):
  """PEFT's calibration covariance (mean over calls of X̂ᵀX̂, X̂ = X / |max X|), damped till C_λ C_λ⁻¹ ≈ I."""
  cov = np.mean([(x / abs(x.max())).T @ (x / abs(x.max())) for x in inputs], axis=0)
  eye = np.eye(len(cov))
  damp, unit = 0.01, np.mean(np.diag(cov)) * eye
  while np.linalg.norm((cov + damp * unit) @ np.linalg.inv(cov + damp * unit) - eye) >= 0.05:
    damp *= 2
  return cov + damp * unit


def _top_rank(matrix):
  left, sigma, right_t = np.linalg.svd(matrix, full_matrices=False)
  return (left[:, :RANK] * sigma[:RANK]) @ right_t[:RANK]


def test_corda_run_trains_on_the_calibrated_residual_and_exports_residual_plus_delta(
    start, smoke_config, tmp_path
):
  original, make = start
  config = make(smoke_config)
  result = train_and_evaluate(config, str(tmp_path))
  params, frozen = flat(result["state"].params), flat(result["state"].frozen)
  kernel = original["head/kernel"].astype(np.float64)
  loader = train_loader(config)
  start_params = traverse_util.unflatten_dict(original, sep="/")
  inputs = [_head_inputs(config, start_params, loader.batch(i)) for i in range(CALIBRATION_BATCHES)]
  # ipm init: s a0 b0 = C_λ⁻¹ top_r(C_λ K). C_λ⁻¹ amplifies float32 rounding along input directions the
  # calibration hardly excites (dead ReLU units), so compare in the well-conditioned space: C_λ s a0 b0.
  damped = _damped_covariance(inputs)
  init_product = _top_rank(damped @ kernel)
  tolerance = 1e-4 * np.abs(init_product).max()
  # The test can tell CorDA from the data-free SVD (C = I) it would fall back to without calibration.
  assert np.abs(damped @ _top_rank(kernel) - init_product).max() > 100 * tolerance

  # The frozen base is the residual K - s a0 b0; the other leaves are untouched.
  np.testing.assert_allclose(damped @ (kernel - frozen["head/kernel"]), init_product, atol=tolerance)
  others = sorted(set(original) - {"head/kernel"})
  for path in others:
    np.testing.assert_array_equal(frozen[path], original[path])
  scaling = ALPHA / RANK
  a, b = params["adapter/head/kernel/a"].astype(np.float64), params["adapter/head/kernel/b"].astype(np.float64)
  trained_product = damped @ (scaling * a @ b)
  assert np.abs(trained_product - init_product).max() > 10 * tolerance  # the adapter trained

  # The merged export is the original layout: merged - original = s (a b - a0 b0).
  exported = flat(ocp.StandardCheckpointer().restore(str(tmp_path / "export" / "params")))
  assert sorted(exported) == sorted(original)
  np.testing.assert_allclose(
      damped @ (exported["head/kernel"] - kernel), trained_product - init_product, atol=tolerance
  )
  np.testing.assert_allclose(
      exported["head/kernel"], frozen["head/kernel"] + scaling * a @ b, rtol=1e-5, atol=1e-6
  )
  for path in others:
    np.testing.assert_array_equal(exported[path], original[path])
  d_in, d_out = kernel.shape
  assert sorted(params) == ["adapter/head/kernel/a", "adapter/head/kernel/b"]
  assert result["trainable_params"] == RANK * (d_in + d_out)
  # The adapter alone is relative to the residual base, not the original weights: no adapter file.
  assert not (tmp_path / "export" / "adapter.safetensors").exists() and result.get("adapter_bytes") is None


def test_corda_run_resumes_bit_identically_without_recalibrating(start, smoke_config, tmp_path, monkeypatch):
  _, make = start
  full = train_and_evaluate(make(smoke_config), str(tmp_path / "full"))
  for item in ("3", "frozen"):
    shutil.copytree(tmp_path / "full" / "checkpoints" / item, tmp_path / "resumed" / "checkpoints" / item)

  def no_calibration(*args, **kwargs):
    raise AssertionError("a resumed run must restore the residual base, not recalibrate")

  monkeypatch.setattr(Trainable, "calibrate", no_calibration)
  resumed = train_and_evaluate(make(smoke_config), str(tmp_path / "resumed"))
  for tree in ("params", "frozen"):
    expect, got = flat(getattr(full["state"], tree)), flat(getattr(resumed["state"], tree))
    assert sorted(expect) == sorted(got)
    for path in expect:
      np.testing.assert_array_equal(got[path], expect[path])


def test_corda_run_without_calibration_batches_is_a_clear_error(start, smoke_config, tmp_path):
  _, make = start
  with pytest.raises(ValueError, match="calibration_batches"):
    train_and_evaluate(make(smoke_config, adapter__calibration_batches=0), str(tmp_path))


def test_minilm_corda_smoke_config_runs_on_a_tiny_bert(tiny_bert_dir, tiny_minilm_run):
  _, tensors = tiny_bert_dir
  _, result = tiny_minilm_run("corda")
  frozen = flat(result["state"].frozen)
  # The 2 layers' query and value kernels (16 x 16) became residuals; every other encoder leaf is the folder's.
  targets = [p for p in frozen if p.endswith(("attention/query/kernel", "attention/value/kernel"))]
  assert len(targets) == 4
  for path, value in frozen.items():
    hf = tensors[hf_loader.hf_name(path)]
    original = hf.T if path.endswith("/kernel") else hf
    if path in targets:
      assert np.abs(value - original).max() > 1e-3, path
    else:
      np.testing.assert_array_equal(value, original)
  assert result["trainable_params"] == 4 * 8 * (16 + 16) + 16 * 6 + 6
