"""Image corruptions in the spirit of CIFAR-10-C, for grey-scale images (Fashion-MNIST).

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (arXiv:1903.12261). The formulas and the five severities follow the
authors' CIFAR-10-C generator (hendrycks/robustness, `ImageNet-C/create_c/make_cifar_c.py`),
re-written in numpy / scipy.ndimage / PIL for one-channel 28x28 images in [0, 1]:

==================  ==========================================================================
gaussian_noise      clip(x + N(0, c^2)),                 c = .04 .06 .08 .09 .10
shot_noise          clip(Poisson(c x) / c),              c = 500 250 100 75 50
impulse_noise       a fraction c of pixels set to 0 or 1 (even odds; skimage's 's&p'), c = .01 .02 .03 .05 .07
defocus_blur        correlation with a disk of radius r (on a 17x17 grid), anti-aliased by a 3x3 Gaussian
                    of sigma a; (r, a) = (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1); borders reflect-101
gaussian_blur       Gaussian filter, sigma = .4 .6 .7 .8 1 (truncate 4, nearest borders, as skimage)
motion_blur         mean along a line at an angle ~ U(-45, 45) deg, Gaussian weights exp(-t^2 / 2 s^2),
                    t = 0..r-1 pixels; (r, s) = (6,1) (6,1.5) (6,2) (8,2) (9,2.5)
zoom_blur           mean of x and its centre crops zoomed by 1, 1.01, ..., up to 1.05/.10/.15/.20/.25
                    (bilinear, scipy.ndimage.zoom)
brightness          V + c in HSV, which for grey pixels is clip(x + c), c = .05 .1 .15 .2 .3
contrast            (x - mean(x)) c + mean(x),           c = .75 .5 .4 .3 .15
pixelate            box down-sampling to int(28 c) pixels and box up-sampling (PIL), c = .95 .9 .85 .75 .65
jpeg                JPEG round trip at quality c (PIL),  c = 80 65 58 50 40
elastic             random affine (3 points moved by U(-c2, c2)) then a smooth displacement field
                    (U(-1, 1) noise, Gaussian sigma c1, scaled by c0); (c0, c1, c2) as the CIFAR code
                    with its 32 replaced by 28
==================  ==========================================================================

Deviations: ImageMagick's motion blur (the reference calls it through wand) is replaced by the line
kernel above; cv2's `getAffineTransform`/`warpAffine`/`filter2D`/`GaussianBlur` by their scipy
equivalents with the same borders; grey-scale brightness needs no HSV round trip (identical result).

Each corruption is deterministic per (image, corruption, severity): its random draws come from
`rng_for(image, name, severity)`, a numpy Generator seeded by the image's bytes, the corruption's
index in `CORRUPTIONS` and the severity. Results are uint8, truncated as the reference's
`np.uint8(...)`.
"""

import io
import zlib
from collections.abc import Callable

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)
_SIZE = 28

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _gaussian_noise(x, s, rng):
  c = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
  return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def _shot_noise(x, s, rng):
  c = (500, 250, 100, 75, 50)[s - 1]
  return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x, s, rng):
  c = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]
  flipped = rng.random(x.shape) <= c
  salted = rng.random(x.shape) <= 0.5
  return np.where(flipped, salted.astype(x.dtype), x)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """The reference's anti-aliased disk: a normalised 0/1 disk on a 17x17 grid, blurred by a 3x3 Gaussian."""
  half = 8 if radius <= 8 else int(radius)
  size = 3 if radius <= 8 else 5
  grid = np.arange(-half, half + 1)
  disk = (grid[None, :] ** 2 + grid[:, None] ** 2 <= radius**2).astype(np.float64)
  disk /= disk.sum()
  g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * alias_blur**2))
  g /= g.sum()
  return ndi.correlate(disk, np.outer(g, g), mode="mirror")


def _defocus_blur(x, s, rng):
  del rng
  radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[s - 1]
  return np.clip(ndi.correlate(x, disk_kernel(radius, alias), mode="mirror"), 0, 1)


def _gaussian_blur(x, s, rng):
  del rng
  sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[s - 1]
  return np.clip(ndi.gaussian_filter(x, sigma, mode="nearest", truncate=4.0), 0, 1)


def _motion_blur(x, s, rng):
  radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[s - 1]
  angle = np.deg2rad(rng.uniform(-45, 45))
  t = np.arange(radius)
  weights = np.exp(-(t**2) / (2 * sigma**2))
  weights /= weights.sum()
  rows, cols = np.meshgrid(np.arange(x.shape[0]), np.arange(x.shape[1]), indexing="ij")
  out = np.zeros_like(x)
  for ti, w in zip(t, weights):
    coords = [rows - ti * np.sin(angle), cols - ti * np.cos(angle)]
    out += w * ndi.map_coordinates(x, coords, order=1, mode="nearest")
  return np.clip(out, 0, 1)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
  """The centre `ceil(h / factor)` crop of `x`, zoomed by `factor` (bilinear), trimmed back to `h`."""
  h = x.shape[0]
  crop = int(np.ceil(h / factor))
  top = (h - crop) // 2
  zoomed = ndi.zoom(x[top : top + crop, top : top + crop], factor, order=1)
  trim = (zoomed.shape[0] - h) // 2
  return zoomed[trim : trim + h, trim : trim + h]


def _zoom_blur(x, s, rng):
  del rng
  factors = np.arange(1, (1.06, 1.11, 1.16, 1.21, 1.26)[s - 1], 0.01)
  x = x.astype(np.float32)
  out = sum(clipped_zoom(x, f) for f in factors)
  return np.clip((x + out) / (len(factors) + 1), 0, 1)


def _brightness(x, s, rng):
  del rng
  return np.clip(x + (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1], 0, 1)


def _contrast(x, s, rng):
  del rng
  c = (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1]
  mean = x.mean()
  return np.clip((x - mean) * c + mean, 0, 1)


def _to_pil(x):
  return Image.fromarray(np.uint8(x * 255), mode="L")


def _pixelate(x, s, rng):
  del rng
  c = (0.95, 0.9, 0.85, 0.75, 0.65)[s - 1]
  small = _to_pil(x).resize((int(x.shape[1] * c), int(x.shape[0] * c)), Image.BOX)
  return np.asarray(small.resize(x.shape[::-1], Image.BOX), np.float64) / 255


def _jpeg(x, s, rng):
  del rng
  buffer = io.BytesIO()
  _to_pil(x).save(buffer, "JPEG", quality=(80, 65, 58, 50, 40)[s - 1])
  return np.asarray(Image.open(buffer), np.float64) / 255


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 matrix `M` with `M @ [p, 1] = q` for three point pairs (x, y) (cv2.getAffineTransform)."""
  a = np.concatenate([src, np.ones((3, 1))], axis=1)
  return np.linalg.solve(a, dst).T


def _elastic(x, s, rng):
  c0, c1, c2 = (
      np.array(((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))[s - 1])
      * _SIZE
  )
  h, w = x.shape
  center = np.float32((h, w)) // 2
  third = min(h, w) // 3
  src = np.float32([center + third, [center[0] + third, center[1] - third], center - third])
  dst = src + rng.uniform(-c2, c2, size=src.shape).astype(np.float32)
  # warpAffine: output pixel (col, row) reads the input at inverse(M) (col, row); borders reflect-101.
  m = np.vstack([affine_from_points(src.astype(np.float64), dst.astype(np.float64)), [0, 0, 1]])
  inverse = np.linalg.inv(m)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  src_cols = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
  src_rows = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
  x = ndi.map_coordinates(x, [src_rows, src_cols], order=1, mode="mirror")
  dx = ndi.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), c1, mode="reflect", truncate=3) * c0
  dy = ndi.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), c1, mode="reflect", truncate=3) * c0
  return np.clip(ndi.map_coordinates(x, [rows + dy, cols + dx], order=1, mode="reflect"), 0, 1)


_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
    "elastic": _elastic,
}
CORRUPTIONS = tuple(_CORRUPTIONS)


def check_corruption(name: str, severity: int = 1) -> None:
  """Raises a ValueError naming the choices when `name` or `severity` is not one of ours."""
  if name not in _CORRUPTIONS:
    raise ValueError(f"Unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}.")
  if severity not in SEVERITIES:
    raise ValueError(f"Corruption severity {severity!r} must be one of {SEVERITIES}.")


def rng_for(image: np.ndarray, name: str, severity: int) -> np.random.Generator:
  """The random generator of one (image, corruption, severity): seeded by the image bytes and both."""
  digest = zlib.crc32(np.ascontiguousarray(image).tobytes())
  return np.random.default_rng((digest, CORRUPTIONS.index(name), severity))


def corrupt(image: np.ndarray, name: str, severity: int) -> np.ndarray:
  """One uint8 image (h, w) or (h, w, 1) corrupted by `name` at `severity` (1..5); same shape, uint8."""
  check_corruption(name, severity)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
    raise ValueError(
        f"corrupt expects one grey-scale uint8 image (h, w) or (h, w, 1); got {image.dtype}" f" {image.shape}."
    )
  x = image.reshape(image.shape[:2]).astype(np.float64) / 255
  out = _CORRUPTIONS[name](x, severity, rng_for(image, name, severity))
  return np.uint8(np.clip(out, 0, 1) * 255).reshape(image.shape)


def corrupt_batch(images: np.ndarray, name: str, severity: int) -> np.ndarray:
  """`corrupt` applied to each image of a uint8 batch (n, h, w[, 1])."""
  check_corruption(name, severity)
  return np.stack([corrupt(im, name, severity) for im in images]) if len(images) else np.asarray(images)
