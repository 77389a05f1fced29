"""Corruptions against numpy references of the CIFAR-10-C formulas (explicit loops, closed forms)."""

import numpy as np
import pytest

from jaxpeft.data import corruptions


def _image(seed=0):
  rng = np.random.default_rng(seed)
  image = np.zeros((28, 28, 1), np.uint8)
  image[6:22, 8:20, 0] = rng.integers(60, 256, (16, 12))
  return image


def _correlate_reflect101(x, kernel):
  """Plain-loop 2-D correlation with reflect-101 borders (cv2.filter2D's default)."""
  k = kernel.shape[0] // 2
  padded = np.pad(x, k, mode="reflect")  # numpy 'reflect' does not repeat the edge: reflect-101.
  out = np.zeros_like(x)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      out[i, j] = np.sum(padded[i : i + 2 * k + 1, j : j + 2 * k + 1] * kernel)
  return out


def test_defocus_blur_matches_disk_formula():
  radius, alias = 1.5, 0.1  # severity 5
  grid = np.arange(-8, 9)
  disk = np.array([[float(a * a + b * b <= radius * radius) for b in grid] for a in grid])
  disk /= disk.sum()
  g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias**2))
  kernel = _correlate_reflect101(disk, np.outer(g, g) / g.sum() ** 2)
  np.testing.assert_allclose(corruptions.disk_kernel(radius, alias), kernel, atol=1e-12)
  image = _image()
  expected = np.uint8(np.clip(_correlate_reflect101(image[..., 0] / 255.0, kernel), 0, 1) * 255)
  got = corruptions.corrupt(image, "defocus_blur", 5)[..., 0]
  assert np.abs(got.astype(int) - expected).max() <= 1  # float rounding at the uint8 truncation


def test_gaussian_blur_matches_separable_kernel():
  sigma = 1.0  # severity 5; skimage: truncate 4, 'nearest' borders
  radius = int(4 * sigma + 0.5)
  t = np.arange(-radius, radius + 1)
  g = np.exp(-(t**2) / (2 * sigma**2))
  g /= g.sum()
  x = np.pad(_image()[..., 0] / 255.0, radius, mode="edge")
  rows = np.array([[np.dot(x[i, j : j + 2 * radius + 1], g) for j in range(28)] for i in range(x.shape[0])])
  out = np.array([[np.dot(rows[i : i + 2 * radius + 1, j], g) for j in range(28)] for i in range(28)])
  expected = np.uint8(np.clip(out, 0, 1) * 255)
  got = corruptions.corrupt(_image(), "gaussian_blur", 5)[..., 0]
  assert np.abs(got.astype(int) - expected).max() <= 1  # float rounding at the uint8 truncation


@pytest.mark.parametrize("severity", [1, 5])
def test_contrast_and_brightness_closed_forms(severity):
  x = _image()[..., 0] / 255.0
  c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
  expected = np.uint8(np.clip((x - x.mean()) * c + x.mean(), 0, 1) * 255)
  np.testing.assert_array_equal(corruptions.corrupt(_image(), "contrast", severity)[..., 0], expected)
  b = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
  np.testing.assert_array_equal(
      corruptions.corrupt(_image(), "brightness", severity)[..., 0], np.uint8(np.clip(x + b, 0, 1) * 255)
  )


def test_gaussian_noise_uses_the_images_own_draws():
  image = _image()
  rng = corruptions.rng_for(image, "gaussian_noise", 3)
  expected = np.uint8(np.clip(image[..., 0] / 255.0 + rng.normal(size=(28, 28), scale=0.08), 0, 1) * 255)
  np.testing.assert_array_equal(corruptions.corrupt(image, "gaussian_noise", 3)[..., 0], expected)


def test_impulse_noise_sets_a_fraction_to_black_or_white():
  image = np.full((28, 28, 1), 128, np.uint8)
  out = corruptions.corrupt(image, "impulse_noise", 5)
  changed = out != 128
  assert set(np.unique(out[changed])) <= {0, 255}
  assert 0.03 < changed.mean() < 0.12  # c = 0.07 of 784 pixels


def test_motion_blur_spreads_a_point_along_a_line_with_gaussian_weights():
  image = np.zeros((28, 28), np.uint8)
  image[14, 14] = 255
  out = corruptions.corrupt(image, "motion_blur", 1) / 255.0
  w = np.exp(-np.arange(6) ** 2 / 2.0)
  assert out.sum() == pytest.approx(1.0, abs=0.05)
  assert out.max() == pytest.approx(w.max() / w.sum(), abs=0.02)


def test_affine_from_points_recovers_a_known_map():
  m = np.array([[1.1, -0.2, 3.0], [0.3, 0.9, -1.0]])
  src = np.array([[1.0, 2.0], [5.0, 1.0], [2.0, 7.0]])
  dst = src @ m[:, :2].T + m[:, 2]
  np.testing.assert_allclose(corruptions.affine_from_points(src, dst), m, atol=1e-12)


def test_zoom_by_one_is_identity():
  x = _image()[..., 0].astype(np.float64)
  np.testing.assert_allclose(corruptions.clipped_zoom(x, 1.0), x)


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_every_corruption_is_deterministic_and_changes_the_image(name):
  image = _image()
  out = corruptions.corrupt(image, name, 5)
  assert out.dtype == np.uint8 and out.shape == image.shape
  np.testing.assert_array_equal(out, corruptions.corrupt(image.copy(), name, 5))
  assert not np.array_equal(out, image)


def test_unknown_corruption_or_severity():
  with pytest.raises(ValueError, match="Unknown corruption 'fog'.*gaussian_noise"):
    corruptions.corrupt(_image(), "fog", 1)
  with pytest.raises(ValueError, match="severity 6"):
    corruptions.corrupt(_image(), "contrast", 6)
