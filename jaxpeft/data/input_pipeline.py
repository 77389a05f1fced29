"""Input pipeline: TFDS random-access sources, deterministic multi-host batches, padded eval.

One module per concept, re-exported here: `jaxpeft.data.sources` (datasets, preparation, class
selection), `jaxpeft.data.preprocess` (raw batches -> model inputs), `jaxpeft.data.batching` (training
and evaluation batches), `jaxpeft.data.label_noise`.

No TensorFlow is needed: datasets are stored as `array_record` and read through
`builder.as_data_source(...)`, which returns numpy examples by index.

* `get_data_source(name, split, data_dir)` gives a random-access source of one split, preparing
  the dataset into `data_dir` on first use. jaxpeft's own builders (`DATASETS`) prepare offline;
  any other name is looked up in the TFDS catalog and downloaded.
* `BatchLoader` is stateless: `batch(step)` depends only on `(seed, step)`, so the global batch is
  the same whatever the number of processes, and resuming at step `k` needs nothing but `k`.
  Epoch `e` visits the examples in the order `numpy.random.default_rng((seed, e)).permutation(n)`,
  in `n // global_batch_size` batches (the last `n % global_batch_size` examples of the
  permutation are skipped that epoch); process `p` of `P` takes rows `[p*B/P, (p+1)*B/P)` of each
  global batch of size `B`.
* `eval_batches` walks a whole split once in split order, padded to full batches, with a boolean
  `mask` of real rows, so metrics summed over `mask` are exact over the split.
* `get_preprocess(name, dataset_config)` turns raw batches into model inputs: each of our datasets
  has a preprocess factory (`DATASETS[name].make_preprocess(dataset_config)`), so a preprocess can
  depend on the config (the text datasets' tokenizer and `max_len`).
* Digits knobs: `config.dataset.classes` keeps and relabels some classes (`select_classes`),
  `config.dataset.shift` applies a deterministic domain shift (`jaxpeft.data.domain_shift`);
  `jaxpeft_digits_segmentation` is the digits with per-pixel labels.
"""

from jaxpeft.data.batching import BatchLoader, eval_batches, fetch_batch, stack_examples
from jaxpeft.data.label_noise import LabelNoiseSource, with_label_noise
from jaxpeft.data.preprocess import (
    Batch,
    Preprocess,
    dataset_option,
    digits_preprocess,
    digits_segmentation_preprocess,
    digits_shift_preprocess,
    text_preprocess,
    uint8_image_preprocess,
)
from jaxpeft.data.sources import (
    DATASETS,
    FILE_FORMAT,
    DatasetEntry,
    DataSource,
    get_data_source,
    get_preprocess,
    resolve_data_dir,
    select_classes,
)

__all__ = [
    "DATASETS",
    "FILE_FORMAT",
    "Batch",
    "BatchLoader",
    "DataSource",
    "DatasetEntry",
    "LabelNoiseSource",
    "Preprocess",
    "dataset_option",
    "digits_preprocess",
    "digits_segmentation_preprocess",
    "digits_shift_preprocess",
    "eval_batches",
    "fetch_batch",
    "get_data_source",
    "get_preprocess",
    "resolve_data_dir",
    "select_classes",
    "stack_examples",
    "text_preprocess",
    "uint8_image_preprocess",
    "with_label_noise",
]
