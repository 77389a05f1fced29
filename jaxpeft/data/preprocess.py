"""Batch preprocessing: raw TFDS batches -> model inputs, one factory per dataset kind.

Each of jaxpeft's datasets has a preprocess factory taking `config.dataset` (so a preprocess can depend on
the config, e.g. the text datasets' tokenizer and `max_len`); TFDS catalog datasets get
`uint8_image_preprocess`. Digits knobs: `config.dataset.shift` applies a deterministic domain shift
(`jaxpeft.data.domain_shift`); `jaxpeft_digits_segmentation` is the digits with per-pixel labels.
"""

from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from jaxpeft.data import digits, digits_segmentation, domain_shift
from jaxpeft.models import hf_loader

Batch = dict[str, np.ndarray]
Preprocess = Callable[[Batch], Batch]
_UINT8_MAX = 255


def _image_and_label(batch: Batch, max_pixel: int) -> Batch:
  """`image` rescaled from integers in [0, max_pixel] to float32 in [0, 1]; `label` as int32."""
  if "image" not in batch or "label" not in batch:
    raise ValueError(
        f"The image preprocess needs features 'image' and 'label'; this batch has {sorted(batch)}. "
        "Pass a preprocess written for this dataset."
    )
  if not np.issubdtype(batch["image"].dtype, np.integer):
    raise ValueError(
        f"The image preprocess expects integer pixels in [0, {max_pixel}]; got dtype "
        f"{batch['image'].dtype}. Pass a preprocess written for this dataset."
    )
  return {
      "image": batch["image"].astype(np.float32) / max_pixel,
      "label": batch["label"].astype(np.int32),
  }


def digits_preprocess(batch: Batch) -> Batch:
  """`jaxpeft_digits` batch -> image float32 in [0, 1] (pixel / 16), label int32."""
  return _image_and_label(batch, digits.MAX_PIXEL)


def uint8_image_preprocess(batch: Batch) -> Batch:
  """Batch with a uint8 `image` (0..255) and a `label` -> image float32 in [0, 1], label int32."""
  return _image_and_label(batch, _UINT8_MAX)


def text_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """A preprocess tokenizing a batch's `text` for BERT-style models.

  The tokenizer is the `tokenizer.json` of `dataset_config.tokenizer` (a Hugging Face folder, or
  'all-MiniLM-L6-v2' for the embedded default; see `jaxpeft.models.hf_loader.resolve_model_dir`),
  loaded once here. Texts become `[CLS] tokens [SEP]`, truncated and right-padded to
  `dataset_config.max_len`.

  Returns:
    `preprocess(batch) -> {input_ids, attention_mask, token_type_ids, label}`, int32 arrays of
    shape (batch, max_len) (label: (batch,)), in the argument order of `BertEncoder.__call__`.
  """
  tokenizer_name = getattr(dataset_config, "tokenizer", None) if dataset_config else None
  max_len = getattr(dataset_config, "max_len", None) if dataset_config else None
  if not tokenizer_name or not max_len:
    raise ValueError(
        "A text dataset needs config.dataset.tokenizer (a Hugging Face folder with tokenizer.json,"
        " or 'all-MiniLM-L6-v2') and config.dataset.max_len (tokens per example); got"
        f" tokenizer={tokenizer_name!r}, max_len={max_len!r}."
    )
  folder = hf_loader.resolve_model_dir(tokenizer_name)
  if not (folder / "tokenizer.json").exists():
    raise FileNotFoundError(f"config.dataset.tokenizer={tokenizer_name!r}: {folder} has no tokenizer.json.")
  tokenizer = hf_loader.Tokenizer(folder / "tokenizer.json")

  def preprocess(batch: Batch) -> Batch:
    if "text" not in batch or "label" not in batch:
      raise ValueError(f"The text preprocess needs features 'text' and 'label'; this batch has {sorted(batch)}.")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text"]]
    return {**tokenizer.encode(texts, int(max_len)), "label": batch["label"].astype(np.int32)}

  return preprocess


def dataset_option(dataset_config: ml_collections.ConfigDict | None, key: str, default: Any) -> Any:
  """`dataset_config.<key>`, or `default` when there is no config or it lacks the key."""
  return default if dataset_config is None else getattr(dataset_config, key, default)


def digits_shift_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """`digits_preprocess`, then the domain shift `dataset_config.shift` ('' for none).

  The shifts are `jaxpeft.data.domain_shift.SHIFTS` (e.g. 'invert', 'rotate90').
  """
  shift = dataset_option(dataset_config, "shift", "")
  domain_shift.check_shift(shift)
  return lambda batch: domain_shift.apply_shift(digits_preprocess(batch), shift)


def digits_segmentation_preprocess(dataset_config: ml_collections.ConfigDict | None) -> Preprocess:
  """Digits as per-pixel labels (`jaxpeft.data.digits_segmentation`), then `dataset_config.shift`.

  The foreground threshold is `dataset_config.foreground_threshold` (default 0.5).
  """
  shift = dataset_option(dataset_config, "shift", "")
  threshold = dataset_option(dataset_config, "foreground_threshold", digits_segmentation.DEFAULT_THRESHOLD)
  domain_shift.check_shift(shift)

  def preprocess(batch: Batch) -> Batch:
    return domain_shift.apply_shift(digits_segmentation.segment(digits_preprocess(batch), threshold), shift)

  return preprocess
