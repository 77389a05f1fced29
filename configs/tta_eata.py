"""Test-time adaptation with `jaxpeft.tta.eata` (authors' defaults); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_eata.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_eata
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base(
      "eata", arg, optimizer={"name": "sgd", "learning_rate": 0.00025, "momentum": 0.9}, clean_images=512
  )
