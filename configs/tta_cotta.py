"""Test-time adaptation with `jaxpeft.tta.cotta` (CIFAR-10-C defaults), continual setting; see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_cotta.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_cotta
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = tta_common.base(
      "cotta",
      arg,
      optimizer={"name": "adam", "learning_rate": 1e-3},
      options={"num_augmentations": 2 if arg == "smoke" else 32},
  )
  config.stream.setting = "continual"
  return config
