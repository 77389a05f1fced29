"""The parts every TTA config shares (configs/tta_*.py): checkpoint, data, stream, optimizer."""

import ml_collections

from jaxpeft.data.corruptions import CORRUPTIONS


def base(
    method: str,
    arg: str | None,
    *,
    optimizer: dict | None = None,
    options: dict | None = None,
    clean_images: int = 0,
) -> ml_collections.ConfigDict:
  """A config adapting with `method` over all corruptions at severity 5, one at a time, batches of 64.

  `arg='smoke'` shrinks it (3 corruptions, 16 images, batches of 8, no progress bar).
  """
  config = ml_collections.ConfigDict()
  config.pretrained = ""  # a launch/train.py workdir (configs/fashion_resnet.py)
  config.method = method
  config.options = ml_collections.ConfigDict(options or {})  # fields of jaxpeft.tta.<method>.Config
  # '' keeps the method's default (the authors'); else a jaxpeft.optim / optax name and its arguments.
  config.optimizer = ml_collections.ConfigDict(optimizer or {"name": ""})
  config.dataset = ml_collections.ConfigDict(
      {"name": "jaxpeft_fashion_mnist", "data_dir": "", "split": "test", "num_images": 0, "clean_split": "train"}
  )
  config.clean_images = clean_images  # clean labelled source images for a method's preparation (EATA, RMT)
  config.stream = ml_collections.ConfigDict(
      {
          "setting": "one_at_a_time",  # one_at_a_time | continual | gradual | mixed
          "corruptions": CORRUPTIONS,
          "severity": 5,
          "batch_size": 64,
          "dirichlet": 0.0,  # > 0: labels ordered by Dirichlet(dirichlet) slots (non-i.i.d.)
          "seed": 0,
      }
  )
  config.progress_bar = True
  if arg == "smoke":
    config.dataset.num_images = 16
    config.stream.corruptions = ("gaussian_noise", "contrast", "jpeg")
    config.stream.batch_size = 8
    config.clean_images = min(clean_images, 16)
    config.progress_bar = False
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use the config alone or with :smoke.")
  return config
