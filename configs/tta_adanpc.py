"""Test-time adaptation with `jaxpeft.tta.adanpc` (authors' defaults: k=100, tau=0.1, beta=0.1).

The kNN memory starts with the features of `clean_images` labelled training images; see launch/adapt.py.

  python -m launch.adapt --config=configs/tta_adanpc.py --config.pretrained=workdir/fashion_resnet \
      --workdir=workdir/tta_adanpc
"""

import ml_collections

from configs import tta_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return tta_common.base("adanpc", arg, clean_images=4096)
