"""Test-time adaptation with `jaxpeft.tta.sar` (authors' defaults); see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_sar.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_sar
"""

import ml_collections

from configs import tta_common

# SAR adapts the norm layers except the last stage (the reference skips ResNets' layer4); stage2 is the last
# stage of configs/fashion_resnet.py.
PATTERN = r"(?i)(?!stage2_)(.*/)?[^/]*(bn|norm|ln|gn)[^/]*/(scale|bias)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base(
      "sar",
      arg,
      optimizer={"name": "sgd", "learning_rate": 0.00025, "momentum": 0.9},
      options={"pattern": PATTERN},
  )
