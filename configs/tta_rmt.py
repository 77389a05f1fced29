"""Test-time adaptation with `jaxpeft.tta.rmt` (CIFAR-10-C defaults), continual setting; see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_rmt.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_rmt

RMT's source data (prototypes, warm-up, replay) are `clean_images` labelled training images; the warm-up
runs `options.warmup_samples // stream.batch_size` steps over them (the authors' 50000 samples).
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  config = tta_common.base(
      "rmt",
      arg,
      optimizer={"name": "adam", "learning_rate": 1e-3},
      options={"warmup_samples": 16 if smoke else 50000},
      clean_images=2048,
  )
  config.stream.setting = "continual"
  if smoke:
    config.clean_images = 64  # every class needs a prototype
  return config
